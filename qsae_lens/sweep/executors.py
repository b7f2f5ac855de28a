"""Where the sweep's independent jobs run: anything with ``submit(fn, *args, **kwargs) -> future``.

``concurrent.futures`` executors (``ProcessPoolExecutor``), submitit's ``AutoExecutor`` (SLURM or its
local executor) and a thin Ray adapter all serve. Jobs receive paths and settings, never live
models, and each writes its result folder atomically into the shared output folder, so a killed
job's cell is simply redone by the next run. submitit and ray are optional extras
(``pip install qsae-lens[slurm]`` / ``[ray]``), imported only when chosen.
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

EXECUTORS = ("serial", "local", "slurm", "ray")


class Executor(Protocol):
    """The one protocol the sweep needs (``concurrent.futures.Executor.submit``)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any: ...


class SerialExecutor:
    """Runs each job at once in this process; returns a finished ``concurrent.futures.Future``."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as e:  # the caller sees it through .result(), as with a pool
            future.set_exception(e)
        return future


class RayExecutor:
    """A thin adapter: ``submit`` -> ``ray.remote(fn).remote(...)``; ``.result()`` -> ``ray.get``."""

    class _Future:
        def __init__(self, ref: Any) -> None:
            self._ref = ref

        def result(self, timeout: float | None = None) -> Any:
            import ray

            return ray.get(self._ref, timeout=timeout)

    def __init__(self, num_cpus: int | None = None, num_gpus: float = 0) -> None:
        ray = _import_extra("ray", "ray")
        if not ray.is_initialized():
            ray.init(ignore_reinit_error=True)
        self._options = {"num_cpus": num_cpus or 1, "num_gpus": num_gpus}

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        import ray

        return self._Future(ray.remote(**self._options)(fn).remote(*args, **kwargs))


def _import_extra(module: str, extra: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(f"--executor needs the optional dependency {module!r}: pip install 'qsae-lens[{extra}]'.") from None


def make_executor(name: str, *, workers: int | None = None, log_dir: str | os.PathLike[str] | None = None,
                  slurm: dict[str, Any] | None = None) -> Executor:
    """``"serial"`` | ``"local"`` (ProcessPoolExecutor, ``workers`` processes) | ``"slurm"`` (submitit
    AutoExecutor with ``slurm`` parameters, logs under ``log_dir``) | ``"ray"``."""
    if name == "serial":
        return SerialExecutor()
    if name == "local":
        import multiprocessing

        # spawn: a forked child would inherit torch's thread pools and any loaded model
        return concurrent.futures.ProcessPoolExecutor(max_workers=workers or 2,
                                                      mp_context=multiprocessing.get_context("spawn"))
    if name == "slurm":
        submitit = _import_extra("submitit", "slurm")
        ex = submitit.AutoExecutor(folder=str(Path(log_dir or "qsae_runs/slurm_logs")))
        ex.update_parameters(**{"timeout_min": 120, "gpus_per_node": 1, **(slurm or {})})
        return ex
    if name == "ray":
        return RayExecutor()
    raise ValueError(f"Unknown executor {name!r}: choose one of {list(EXECUTORS)}.")
