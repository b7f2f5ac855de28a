"""Sweep step 3: train one SAE per (precision, layer, seed) cell, each cell an independent job.

A job (:func:`train_cell`) receives paths and settings only (:class:`CellJob`), loads its training
vectors from the activation cache, trains with SAELens's trainer and writes its SAELens checkpoint
folder whole (built under a temporary name, renamed into place; the inputs record ``_done.json``
last inside it). So jobs can run in other processes or on other machines sharing the output folder,
and a killed job's cell is simply trained again on the next run.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, NamedTuple

from qsae_lens.sweep.plan import CellKey, SweepPlan
from qsae_lens.sweep.reuse import run_or_reuse

TRAIN_STATS = "train_stats.json"
TRAINING_SETTINGS = ("architecture", "d_sae", "k", "dead_tokens_threshold", "training_samples", "batch_size", "lr",
                     "max_norm_ratio")
"""The SweepConfig fields a trained SAE depends on (besides its data, precision, layer and seed)."""


class CellJob(NamedTuple):
    """Everything one training job needs, as plain values (picklable; no live model)."""

    folder: str
    """The cell's checkpoint folder (written atomically)."""
    cache_dir: str
    """The activation cache holding ``hook_name`` at this cell's precision."""
    hook_name: str
    seed: int
    training: dict[str, Any]
    """The :data:`TRAINING_SETTINGS` values."""
    metadata: dict[str, Any]
    """Provenance written into the SAE's cfg.metadata (precision keys, hook, model, init seed, ...)."""
    inputs: dict[str, Any]
    """The reuse record: the cell is retrained when these differ from the folder's."""
    device: str
    threads: int | None = None
    """torch threads in the job (None: torch's default); equal counts give bit-identical weights."""
    wandb: dict[str, Any] | None = None
    """``WandbSettings`` fields when the job logs to wandb (one run per cell), else None."""


class CellTraining(NamedTuple):
    """One trained cell: where it is and how it was trained."""

    key: CellKey
    folder: Path
    stats: dict[str, Any]
    """``train_stats.json``: seconds (of the run that trained it), samples/s, vectors, outliers, dead fraction."""
    computed: bool
    """True when trained in this run, False when reused."""


@dataclasses.dataclass
class TrainResult:
    """Every cell of the sweep, trained or reused."""

    cells: dict[CellKey, CellTraining]

    @property
    def n_trained(self) -> int:
        return sum(c.computed for c in self.cells.values())

    def __repr__(self) -> str:
        return f"TrainResult({len(self.cells)} cells, {self.n_trained} trained in this run)"


def training_vectors(cache_dir: str | Path, hook_name: str, max_norm_ratio: float | None) -> tuple[Any, int, float | None]:
    """The cached vectors SAEs train on (special tokens excluded by the cache, sinks dropped).

    Returns ``(Tensor[n, d], vectors before dropping sinks, the sink norm limit or None)``.
    """
    from qsae_lens.activations import load_activations
    from qsae_lens.sweep.sinks import non_sink_rows, sink_norm_limit

    acts = load_activations(cache_dir, hook_name)
    limit = sink_norm_limit(acts, max_norm_ratio)
    return acts[non_sink_rows(acts, limit)], int(acts.shape[0]), limit


def _sae_config(training: dict[str, Any], d_in: int, seed: int, hook_name: str) -> Any:
    from qsae_lens.training import ARCHITECTURES

    cls = ARCHITECTURES[training["architecture"]]
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {"d_in": d_in, "d_sae": training["d_sae"], "init_seed": seed}
    kwargs |= {k: training[k] for k in ("k", "dead_tokens_threshold") if k in fields}
    sae_cfg = cls(**kwargs)
    sae_cfg.metadata.hook_name = hook_name
    return sae_cfg


def train_cell(job: CellJob) -> dict[str, Any]:
    """Train one cell into ``job.folder`` unless it holds a checkpoint made from ``job.inputs``.

    Returns ``{"computed": bool, "stats": train_stats}``. Runs in any process (executor job).
    """
    import torch

    from qsae_lens.training.common import WandbSettings
    from qsae_lens.training.fit import train_sae_on_activations

    threads_before = torch.get_num_threads()
    if job.threads is not None:
        torch.set_num_threads(job.threads)

    def compute(tmp: Path) -> None:
        acts, n_cached, _ = training_vectors(job.cache_dir, job.hook_name, job.training["max_norm_ratio"])
        t0 = time.time()
        result = train_sae_on_activations(
            _sae_config(job.training, acts.shape[1], job.seed, job.hook_name), acts,
            total_tokens=job.training["training_samples"], batch_size=job.training["batch_size"],
            lr=job.training["lr"], data_seed=job.seed, device=job.device, out_dir=tmp / "sae", metadata=job.metadata,
            wandb=WandbSettings(**job.wandb) if job.wandb else None,
        )
        for f in (tmp / "sae").iterdir():
            f.rename(tmp / f.name)
        (tmp / "sae").rmdir()
        seconds = time.time() - t0
        stats = {"seconds": seconds, "samples_per_s": job.training["training_samples"] / seconds,
                 "cached_vectors": n_cached, "outliers_dropped": n_cached - int(acts.shape[0]),
                 "epochs": job.training["training_samples"] / acts.shape[0],
                 "dead_fraction_train": result.dead_fraction}
        from qsae_lens._io import atomic_write_json

        atomic_write_json(tmp / TRAIN_STATS, stats)

    try:
        computed = run_or_reuse(job.folder, job.inputs, compute)
    finally:  # a serial job runs in the caller's process: leave its thread count as it was
        torch.set_num_threads(threads_before)
    return {"computed": computed, "stats": json.loads((Path(job.folder) / TRAIN_STATS).read_text())}


def cell_job(plan: SweepPlan, key: CellKey, metadata: dict[str, Any], data_id: dict[str, Any],
             threads: int | None = None) -> CellJob:
    """The job of one cell, with its reuse record (cell, training settings, data identity)."""
    cfg = plan.config
    training = {name: getattr(cfg, name) for name in TRAINING_SETTINGS}
    hook = plan.hook_name(key.layer)
    meta = {**metadata, "hook_name": hook, "model_name": plan.model_path, "init_seed": key.seed,
            "dataset_path": f"qsae_lens corpus:{data_id['corpus']}", "context_size": cfg.context_size,
            "exclude_special_tokens": True, "prepend_bos": False}  # windows already start with BOS
    inputs = {"cell": key.label, "training": training, "data": data_id}
    # wandb is not among the inputs: switching logging on must not retrain a finished cell
    wandb = ({"project": cfg.wandb_project, "name": key.label, "config": {**training, "cell": key.label}}
             if cfg.wandb else None)
    return CellJob(str(key.dir(plan.out_dir)), str(plan.cache_dir(key.precision, "train", key.layer)), hook,
                   key.seed, training, meta, inputs, plan.device, threads, wandb)


def train_cells(plan: SweepPlan, metadata: dict[str, dict[str, Any]], data_ids: dict[str, dict[str, Any]],
                executor: Any, threads: int | None = None) -> TrainResult:
    """Submit every cell's job to ``executor`` (``submit(fn, *args) -> future``) and collect them.

    ``metadata``/``data_ids``: per precision name. Cells already trained from the same inputs are
    reused by the job itself (cheap: it compares ``_done.json`` and returns).
    """
    jobs = {key: cell_job(plan, key, metadata[key.precision], data_ids[key.precision], threads) for key in plan.cells}
    futures = {key: executor.submit(train_cell, job) for key, job in jobs.items()}
    cells = {}
    for key, future in futures.items():
        out = future.result()
        print(f"[qsae sweep] {key.label}: {'trained' if out['computed'] else 'reused'} "
              f"({out['stats']['seconds']:.0f} s)", flush=True)
        cells[key] = CellTraining(key, key.dir(plan.out_dir), out["stats"], out["computed"])
    return TrainResult(cells)
