"""Sweep step 4: the transfer matrix (every SAE spliced into every precision's model) and SAELens's
``run_evals`` on the diagonal. Both reuse the SAEs and models already in memory."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

from qsae_lens.evals import ModelEval, SpliceEval, flatten_run_evals
from qsae_lens.sweep.plan import CellKey, SweepPlan
from qsae_lens.sweep.reuse import run_or_reuse


@dataclasses.dataclass
class TrainingSummary:
    """Per (precision, hook name): the mean of the vectors SAEs train on and the sink norm limit."""

    means: dict[tuple[str, str], torch.Tensor]
    """Tensor[d_in]: the mean-ablation baseline of the transfer matrix."""
    limits: dict[tuple[str, str], float | None]


def summarise_training_vectors(plan: SweepPlan) -> TrainingSummary:
    """Read each training cache once: the mean and sink limit of the vectors SAEs train on."""
    from qsae_lens.sweep.train import training_vectors

    means, limits = {}, {}
    for p in plan.precision_names:
        for layer in plan.layers:
            hook = plan.hook_name(layer)
            acts, _, limit = training_vectors(plan.cache_dir(p, "train", layer), hook, plan.config.max_norm_ratio)
            means[(p, hook)], limits[(p, hook)] = acts.mean(0), limit
            del acts
    return TrainingSummary(means, limits)


def scoring_limits(plan: SweepPlan, summary: TrainingSummary) -> dict[str, float | None]:
    """Hook name -> the baseline's sink limit, applied to every cell's scoring (see :mod:`.sinks`)."""
    return {plan.hook_name(layer): summary.limits[(plan.baseline, plan.hook_name(layer))] for layer in plan.layers}


@dataclasses.dataclass
class TransferResult:
    """The transfer matrix: each model's own cost and every (SAE, model) cell, with window-bootstrap CIs."""

    models: dict[str, ModelEval]
    cells: dict[tuple[str, str], SpliceEval]
    """(SAE cell label, model precision) -> SpliceEval."""
    max_norms: dict[str, float | None]
    seconds: float
    """Time of the run that computed it (kept on reuse)."""

    def cell(self, sae: CellKey, model: str) -> SpliceEval | None:
        return self.cells.get((sae.label, model))

    def __repr__(self) -> str:
        return f"TransferResult({len(self.models)} models x {len(self.cells) // max(len(self.models), 1)} SAEs)"


def evaluate_transfer_step(plan: SweepPlan, models: dict[str, Any], saes: dict[CellKey, Any],
                           identities: dict[CellKey, str], eval_tokens: torch.Tensor, tokenizer: Any,
                           summary: TrainingSummary, data_ids: dict[str, Any], *, progress: bool = True
                           ) -> TransferResult:
    """Compute (or reuse) ``transfer/transfer.json``; reused when SAEs, data and settings are the same."""
    from qsae_lens.activations import special_token_ids
    from qsae_lens.evals import evaluate_transfer

    cfg = plan.config
    max_norms = {h: v for h, v in scoring_limits(plan, summary).items() if v is not None}
    folder = plan.step_dir("transfer")
    inputs = {"saes": {k.label: identities[k] for k in saes}, "data": data_ids, "max_norms": max_norms,
              "n_bootstrap": cfg.n_bootstrap, "seed": cfg.seed}

    def compute(tmp: Path) -> None:
        t0 = time.time()
        model_evals, cells = evaluate_transfer(
            models, {k.label: sae for k, sae in saes.items()}, eval_tokens, baseline=plan.baseline,
            mean_activations=summary.means, special_token_ids=special_token_ids(tokenizer), max_norms=max_norms,
            n_bootstrap=cfg.n_bootstrap, seed=cfg.seed, progress=progress)
        from qsae_lens._io import atomic_write_json

        atomic_write_json(tmp / "transfer.json", {
            "max_norms": max_norms, "seconds": time.time() - t0,
            "models": {k: dataclasses.asdict(v) for k, v in model_evals.items()},
            "cells": [dataclasses.asdict(v) for v in cells.values()]})

    run_or_reuse(folder, inputs, compute)
    data = json.loads((folder / "transfer.json").read_text())
    cells = {}
    for c in data["cells"]:
        for name in ("explained_variance_ci", "ce_increase_ci"):
            c[name] = tuple(c[name]) if c[name] is not None else None
        cells[(c["sae"], c["model"])] = SpliceEval(**{k: (float("nan") if v is None and k not in
                                                         ("explained_variance_ci", "ce_increase_ci") else v)
                                                      for k, v in c.items()})
    model_evals = {k: ModelEval(**v) for k, v in data["models"].items()}
    return TransferResult(model_evals, cells, data["max_norms"], data["seconds"])


def saelens_diagonal_step(plan: SweepPlan, models: dict[str, Any], saes: dict[CellKey, Any],
                          identities: dict[CellKey, str], eval_ds: Any, data_ids: dict[str, Any]) -> dict[str, Any]:
    """SAELens's own ``run_evals`` for each SAE on its own precision's model, flattened
    (:func:`qsae_lens.evals.flatten_run_evals`): numbers comparable with other SAELens work.

    CE/KL there are relative to zero ablation and drawn from other batches than the variance
    metrics; the transfer matrix is the like-for-like comparison. Run for the first seed's cells only
    (~20 s each on a 2-core CPU; the transfer matrix already scores every seed). Returns
    ``{cell label: {metric: value}}``.
    """
    saes = {k: sae for k, sae in saes.items() if k.seed == min(plan.seeds)}
    folder = plan.step_dir("saelens_run_evals")
    inputs = {"saes": {k.label: identities[k] for k in saes}, "data": data_ids}

    def compute(tmp: Path) -> None:
        from qsae_lens._io import atomic_write_json

        atomic_write_json(tmp / "run_evals.json", {k.label: _run_evals_one(plan, models[k.precision], sae, eval_ds)
                                                   for k, sae in saes.items()})

    run_or_reuse(folder, inputs, compute)
    return json.loads((folder / "run_evals.json").read_text())


def _run_evals_one(plan: SweepPlan, model: Any, sae: Any, eval_ds: Any) -> dict[str, float]:
    from sae_lens import ActivationsStore
    from sae_lens.evals import EvalConfig, run_evals
    from sae_lens.training.activation_scaler import ActivationScaler

    n_batches = max(1, min(4, len(eval_ds) // 4))
    eval_cfg = EvalConfig(
        batch_size_prompts=4, n_eval_reconstruction_batches=n_batches, n_eval_sparsity_variance_batches=n_batches,
        compute_ce_loss=True, compute_kl=True, compute_variance_metrics=True, compute_sparsity_metrics=True,
        compute_l2_norms=False, compute_featurewise_density_statistics=False,
        compute_featurewise_weight_based_metrics=False)
    if sae.cfg.metadata.prepend_bos is None:
        sae.cfg.metadata.prepend_bos = False  # windows already start with BOS
    ctx = plan.config.context_size
    store = ActivationsStore.from_sae(model=model, sae=sae, dataset=eval_ds, context_size=ctx, streaming=False,
                                      store_batch_size_prompts=4, n_batches_in_buffer=4,
                                      train_batch_size_tokens=4 * ctx, device=str(sae.W_dec.device))
    metrics, _ = run_evals(sae, store, model, ActivationScaler(), eval_cfg, exclude_special_tokens=True)
    return flatten_run_evals(metrics)
