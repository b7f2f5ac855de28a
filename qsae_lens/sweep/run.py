"""The main job: a precision sweep. Do this model's SAE features survive quantization?

:func:`run_precision_sweep` reads top to bottom: validate and plan (no file written before the
settings are known good) -> lock the output folder -> tokenize -> load each precision and cache its
activations -> train every (precision, layer, seed) cell as an executor job -> the transfer matrix
-> SAELens's run_evals on the diagonal -> pairwise comparisons against the seed-to-seed ceiling and
a random floor -> the analyses asked for -> the report. Every step's result folder records the
identities of its inputs and is reused only when they are the same (:mod:`qsae_lens.sweep.reuse`),
so an interrupted or extended sweep redoes exactly what changed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

from qsae_lens.sweep.config import SweepConfig, validate_config
from qsae_lens.sweep.plan import CellKey, CoreResults, SweepPlan

SWEEP_SCHEMA_VERSION = "2.0"
DATA_SETTINGS = ("model", "corpus", "hook", "train_tokens", "eval_windows", "context_size", "seed")
"""Settings the activation caches depend on: a folder made with others is refused, not mixed."""


@dataclasses.dataclass
class SweepResult:
    """Where a sweep's outputs are, and its report as plain values."""

    out_dir: Path
    report: dict[str, Any]
    """The content of ``report.json`` (see :mod:`qsae_lens.report.sweep_report`)."""

    @property
    def markdown_path(self) -> Path:
        return self.out_dir / "report.md"

    @property
    def html_path(self) -> Path:
        return self.out_dir / "report.html"


def plan_sweep(config: SweepConfig, out_dir: str | os.PathLike[str]) -> SweepPlan:
    """Validate ``config`` (ValueError/FileNotFoundError before any work) and resolve the plan."""
    from qsae_lens.precision import parse_precision

    v = validate_config(config, out_dir)
    cfg = v.config
    precisions = tuple(parse_precision(p) for p in cfg.precisions)
    cells = tuple(CellKey(p.name, layer, s) for p in precisions for layer in v.layers for s in cfg.seeds)
    return SweepPlan(config=cfg, out_dir=Path(out_dir), model_path=v.model_path, n_layers=v.n_layers,
                     layers=v.layers, hook=cfg.hook, precisions=precisions, baseline=cfg.resolved_baseline(),
                     seeds=cfg.seeds, cells=cells, device=v.device)


def _config_record(plan: SweepPlan) -> dict[str, Any]:
    from qsae_lens.sweep.data import corpus_label

    return {**dataclasses.asdict(plan.config), "corpus": corpus_label(plan.config.corpus),
            "model_path": plan.model_path, "n_layers": plan.n_layers, "layers_resolved": list(plan.layers),
            "baseline": plan.baseline, "device": plan.device, "schema_version": SWEEP_SCHEMA_VERSION}


def prepare_output_folder(plan: SweepPlan) -> None:
    """Under the lock: refuse a folder made with other data settings, clear temporaries, write the config."""
    from qsae_lens._io import atomic_write_json, remove_stale_temporaries

    record = _config_record(plan)
    path = plan.out_dir / "sweep_config.json"
    if path.exists():
        old = json.loads(path.read_text())
        keys = [k for k in DATA_SETTINGS if k in old] + ["model_path"]
        changed = [k for k in keys if old.get(k) != json.loads(json.dumps(record.get(k)))]
        if changed:
            details = ", ".join(f"{k}: {old.get(k)!r} -> {record.get(k)!r}" for k in changed)
            raise ValueError(f"{plan.out_dir} holds a sweep of other data ({details}); its caches cannot be reused: "
                             "choose another output folder, or delete this one.")
    for folder in [plan.out_dir, *plan.out_dir.glob("saes/*/layer*"), plan.step_dir("compare")]:
        remove_stale_temporaries(folder)
    atomic_write_json(path, record)


def load_saes(plan: SweepPlan) -> tuple[dict[CellKey, Any], dict[CellKey, str]]:
    """Every cell's trained SAE (eval mode) and its content hash (what later steps are keyed by)."""
    from sae_lens import SAE

    import qsae_lens.training  # noqa: F401 - registers the architectures for loading
    from qsae_lens.sweep.reuse import sae_identity

    saes = {k: SAE.load_from_disk(str(k.dir(plan.out_dir)), device=plan.device).eval() for k in plan.cells}
    return saes, {k: sae_identity(k.dir(plan.out_dir)) for k in plan.cells}


def run_analyses(plan: SweepPlan, core: CoreResults) -> list[Any]:
    """Run each analysis named in ``config.analyses``; returns their report sections."""
    import importlib

    from qsae_lens.sweep.steps import ANALYSES

    sections = []
    for name in plan.config.resolved_analyses():
        module = importlib.import_module(ANALYSES[name])
        sections.append(module.report_section(module.run_step(plan, core)))
    return sections


def run_precision_sweep(config: SweepConfig | None = None, out_dir: str | os.PathLike[str] = "qsae_runs/sweep", *,
                        executor: Any = None, threads: int | None = None, progress: bool = True,
                        **overrides: Any) -> SweepResult:
    """Train SAEs at several precisions and report how their features and reconstructions transfer.

    ``config`` (or keyword ``overrides`` of :class:`SweepConfig` fields) says what to run; results go
    to ``out_dir`` (re-running reuses every step whose inputs are unchanged). ``executor``: any
    ``concurrent.futures``-style object (``submit(fn, *args) -> future``) that runs the training
    cells, e.g. a ``ProcessPoolExecutor`` or submitit's ``AutoExecutor`` (default: in this process).
    ``threads`` fixes torch's thread count in each training job (equal counts: bit-identical weights).
    """
    from qsae_lens._io import FolderLock
    from qsae_lens.report.sweep_report import SweepParts, write_report
    from qsae_lens.sweep import comparisons, data, evaluate, executors, train

    plan = plan_sweep(dataclasses.replace(config or SweepConfig(), **overrides), out_dir)
    with FolderLock(plan.out_dir):
        prepare_output_folder(plan)
        t = Timer()
        sweep_data = t.run("tokenize", data.prepare_data, plan)
        cached = t.run("load_and_cache", data.cache_precisions, plan, sweep_data, progress=progress)
        data_ids = {p: data.data_identity(plan, p, sweep_data.corpus_label) for p in plan.precision_names}
        trained = t.run("train", train.train_cells, plan, cached.metadata, data_ids,
                        executor or executors.SerialExecutor(), threads)
        saes, identities = load_saes(plan)
        summary = evaluate.summarise_training_vectors(plan)
        transfer = t.run("transfer", evaluate.evaluate_transfer_step, plan, cached.models, saes, identities,
                         sweep_data.eval_tokens, sweep_data.tokenizer, summary, data_ids, progress=progress)
        diagonal = (t.run("saelens_run_evals", evaluate.saelens_diagonal_step, plan, cached.models, saes, identities,
                          sweep_data.splits["test"], data_ids) if plan.config.saelens_evals else {})
        max_norms = evaluate.scoring_limits(plan, summary)
        compared = t.run("compare", comparisons.run_comparisons, plan, saes, identities, max_norms, data_ids,
                         progress=progress)
        core = CoreResults(models=cached.models, tokenizer=sweep_data.tokenizer, eval_tokens=sweep_data.eval_tokens,
                           saes=saes, max_norms=max_norms, transfer=transfer, comparisons=compared)
        extra_sections = t.run("analyses", run_analyses, plan, core)
        parts = SweepParts(config=_config_record(plan), model_metadata=cached.metadata, trained=trained,
                           transfer=transfer, saelens_evals=diagonal, comparisons=compared, timings=t.seconds,
                           extra_sections=extra_sections, plan=plan)
        report = write_report(parts, plan.out_dir)
    print(f"[qsae sweep] report written to {plan.out_dir / 'report.html'}", flush=True)
    return SweepResult(out_dir=plan.out_dir, report=report)


class Timer:
    """Wall time of each step run in this process (``seconds``: step name -> s)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def run(self, name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        t0 = time.time()
        try:
            return fn(*args, **kwargs)
        finally:
            self.seconds[name] = time.time() - t0


# --------------------------------------------------------------------------------------------
# CLI: qsae sweep


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``qsae sweep``: one per SweepConfig field, plus where and how to run."""
    from qsae_lens.sweep.config import add_config_arguments
    from qsae_lens.sweep.executors import EXECUTORS

    add_config_arguments(parser)
    parser.add_argument("--out", default="qsae_runs/sweep", help="output folder (re-running resumes)")
    parser.add_argument("--executor", default="serial", choices=EXECUTORS,
                        help="where training cells run: serial (here), local (process pool), slurm (submitit), ray")
    parser.add_argument("--workers", type=int, default=None, help="processes for --executor local (default 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per training job")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run_sweep_command(args: argparse.Namespace) -> int:
    """``qsae sweep``: validate every flag first (exit 2 on a bad one), then run and print the summary."""
    from qsae_lens.sweep.config import config_from_args
    from qsae_lens.sweep.executors import make_executor

    cfg = config_from_args(args)
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers must be a positive integer; got {args.workers}.")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be a positive integer; got {args.threads}.")
    plan_sweep(cfg, args.out)  # every input error before any work or folder
    executor = make_executor(args.executor, workers=args.workers, log_dir=Path(args.out) / "jobs")
    result = run_precision_sweep(cfg, args.out, executor=executor, threads=args.threads, progress=not args.no_progress)
    print(result.markdown_path.read_text())
    return 0
