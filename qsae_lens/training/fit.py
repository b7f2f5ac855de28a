"""Train a registered SAE from an in-memory activation tensor with SAELens's own ``SAETrainer``.

Why this exists beside ``LanguageModelSAETrainingRunner``: the runner streams activations from
the language model for every SAE it trains. A precision sweep trains several SAEs (seeds, a
ceiling) on the same activations of one model, and on a CPU the LM forward is ~3/4 of a runner
cell's time. Caching once (``qsae_lens.activations.cache_activations``) and training every SAE
from the cached tensor, for several epochs if the corpus is small, removes that cost. The
optimiser, schedules, dead-latent bookkeeping, sparsity file and save format are still SAELens's.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAETrainer
from sae_lens.config import SAETrainerConfig
from sae_lens.constants import SPARSITY_FILENAME
from sae_lens.saes.sae import TrainingSAE, TrainingSAEConfig
from safetensors.torch import save_file

from qsae_lens._io import atomic_dir, atomic_write_json
from qsae_lens.training.common import (
    SAE_PROVENANCE_KEYS,
    WandbSettings,
    attach_precision_metadata,
    renormalize_after_steps,
    safe_logging_config,
    unit_norm_parameters,
    wandb_run,
)

LOSS_HISTORY_FILENAME = "loss_history.json"


def shuffled_batches(acts: torch.Tensor, batch_size: int, *, seed: int) -> Iterator[torch.Tensor]:
    """Endless iterator over ``acts`` (``Tensor[n, d]``) in batches, reshuffled every epoch.

    The permutation comes from a local generator seeded with ``seed``, so the data order of a
    run is reproducible and independent of global RNG state.
    """
    if acts.ndim != 2 or acts.shape[0] < batch_size:
        raise ValueError(
            f"Need a Tensor[n, d] with n >= batch_size={batch_size} activations, got shape {tuple(acts.shape)}."
        )
    gen = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(acts.shape[0], generator=gen)
        for start in range(0, acts.shape[0] - batch_size + 1, batch_size):
            yield acts[perm[start : start + batch_size]]


class UnitNormSAETrainer(SAETrainer):
    """SAELens's ``SAETrainer`` whose own optimizer renormalises the SAE's unit-norm decoder rows
    (those marked by ``keep_rows_unit_norm``, e.g. openai_topk's W_dec) after each of its steps.

    The hook is registered on this trainer's optimizer only (``renormalize_after_steps``), so it
    acts on no other optimizer or SAE in the process. An SAE with no unit-norm rows trains exactly
    as under ``SAETrainer``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        weights = unit_norm_parameters(self.sae)
        self.unit_norm_hook = renormalize_after_steps(self.optimizer, weights) if weights else None


class _LossRecordingTrainer(UnitNormSAETrainer):
    """The unit-norm trainer, recording the loss terms every ``record_every`` steps for loss curves."""

    def __init__(self, *args: Any, record_every: int = 10, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.record_every = max(1, record_every)
        self.loss_history: list[dict[str, float]] = []

    def step(self, batch: torch.Tensor):  # type: ignore[override]
        out = super().step(batch)
        if self.n_training_steps % self.record_every == 0:
            row = {"step": float(self.n_training_steps), "tokens": float(self.n_training_samples)}
            row["loss"] = float(out.loss.detach())
            row.update({k: float(v.detach()) for k, v in out.losses.items()})
            self.loss_history.append(row)
        return out


@dataclasses.dataclass
class FitResult:
    """What :func:`train_sae_on_activations` produced."""

    sae: TrainingSAE
    """The trained SAE (training form)."""
    path: Path | None
    """Folder of the saved SAELens checkpoint (inference form), if ``out_dir`` was given."""
    loss_history: list[dict[str, float]]
    """Rows of ``{"step", "tokens", "loss", <loss terms>}`` every few steps."""
    dead_fraction: float
    """Fraction of latents that did not fire within SAELens's dead-feature window at the end."""


def train_sae_on_activations(
    sae_cfg: TrainingSAEConfig,
    activations: torch.Tensor,
    *,
    total_tokens: int,
    batch_size: int = 1024,
    lr: float = 4e-4,
    lr_end_fraction: float = 0.2,
    adam_betas: tuple[float, float] = (0.9, 0.999),
    data_seed: int = 0,
    device: str = "cpu",
    out_dir: str | os.PathLike[str] | None = None,
    metadata: dict[str, Any] | None = None,
    b_dec_sample: int = 16384,
    record_every: int = 10,
    wandb: WandbSettings | None = None,
) -> FitResult:
    """Train the registered SAE described by ``sae_cfg`` on ``activations`` (``Tensor[n, d_in]``).

    ``total_tokens`` may exceed ``n`` (several epochs, reshuffled each time). The learning rate
    follows SAELens's cosine-annealing schedule down to ``lr * lr_end_fraction``. When the SAE
    class has ``initialize_b_dec(activations)`` (qsae_lens's architectures do), ``b_dec`` is set
    from a sample of ``b_dec_sample`` activations before the first step. ``metadata`` (plain
    JSON: precision, hook, model...) is written into ``cfg.metadata`` and saved with the SAE.
    When ``out_dir`` is given the SAE is saved there as a SAELens checkpoint (cfg.json,
    sae_weights.safetensors, sparsity.safetensors, loss_history.json), written into a temporary
    folder and renamed, so an interrupted run leaves no half-written checkpoint.

    wandb logging is off unless ``wandb`` is given: then this job gets its own wandb run (project,
    name, config and mode from the settings; the mode defaults to ``$WANDB_MODE``), logged to every
    ``wandb.log_frequency`` steps and finished on success and on failure. Credentials alone never
    switch it on, and ``os.environ`` is not changed.
    """
    if activations.shape[-1] != sae_cfg.d_in:
        raise ValueError(
            f"activations have d={activations.shape[-1]} but the SAE expects d_in={sae_cfg.d_in}."
        )
    if total_tokens < batch_size:
        raise ValueError(
            f"total_tokens={total_tokens} is smaller than one batch ({batch_size}): the budget is too small to train."
        )
    if not torch.isfinite(activations).all():
        raise ValueError("activations contain NaN or Inf values; refusing to train on them.")

    sae = _initialized_sae(sae_cfg, activations, device=device, data_seed=data_seed, b_dec_sample=b_dec_sample,
                           metadata=metadata)  # fmt: skip
    trainer_cfg = SAETrainerConfig(
        total_training_samples=total_tokens,
        train_batch_size_samples=batch_size,
        lr=lr,
        lr_end=lr * lr_end_fraction,
        lr_scheduler_name="cosineannealing",
        adam_beta1=adam_betas[0],
        adam_beta2=adam_betas[1],
        device=device,
        dead_feature_window=max(1, min(1000, total_tokens // batch_size // 4)),
        feature_sampling_window=max(1, total_tokens // batch_size),
        logger=_logging_config(wandb),
    )
    trainer = _LossRecordingTrainer(
        cfg=trainer_cfg,
        sae=sae,
        data_provider=shuffled_batches(activations, batch_size, seed=data_seed),
        record_every=record_every,
    )
    with wandb_run(wandb):
        trained = trainer.fit()
    dead_fraction = float(trainer.dead_neurons.float().mean())

    path = None
    if out_dir is not None:
        path = Path(out_dir)
        with atomic_dir(path, replace=True) as tmp:
            trained.save_inference_model(str(tmp))
            save_file({"sparsity": trainer.log_feature_sparsity.contiguous()}, tmp / SPARSITY_FILENAME)
            atomic_write_json(tmp / LOSS_HISTORY_FILENAME, trainer.loss_history, indent=None)
    return FitResult(sae=trained, path=path, loss_history=trainer.loss_history, dead_fraction=dead_fraction)


def _initialized_sae(sae_cfg: TrainingSAEConfig, activations: torch.Tensor, *, device: str, data_seed: int,
                     b_dec_sample: int, metadata: dict[str, Any] | None) -> TrainingSAE:
    """The training SAE of ``sae_cfg`` on ``device``: ``b_dec`` from a seeded sample of ``b_dec_sample``
    activations when the class has ``initialize_b_dec``, and ``metadata`` in ``cfg.metadata``."""
    sae = TrainingSAE.from_dict(sae_cfg.to_dict())
    sae.to(device)
    if hasattr(sae, "initialize_b_dec"):
        gen = torch.Generator().manual_seed(data_seed)
        idx = torch.randperm(activations.shape[0], generator=gen)[:b_dec_sample]
        sae.initialize_b_dec(activations[idx].to(device))
    if metadata:
        attach_precision_metadata(sae, metadata)  # the precision keys, checked to be plain JSON
        for key, value in metadata.items():  # the rest (hook, model, dataset...) as SAELens's runner sets them
            if key not in SAE_PROVENANCE_KEYS:
                sae.cfg.metadata[key] = value
    return sae


def _logging_config(wandb: WandbSettings | None) -> Any:
    """SAELens's LoggingConfig for one job: off without settings; with them, on at their frequency."""
    if wandb is None:
        return safe_logging_config()
    if wandb.resolved_mode() == "disabled":
        return safe_logging_config()
    # The run is started by wandb_run with an explicit mode, so no credential check is needed here.
    from sae_lens import LoggingConfig

    return LoggingConfig(
        log_to_wandb=True, wandb_project=wandb.project, run_name=wandb.name, wandb_log_frequency=wandb.log_frequency
    )
