"""Gated SAE (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated Sparse
Autoencoders"), registered with SAELens as ``"gated_frozen_aux"``.

Taken from SAELens's ``GatedTrainingSAE`` unchanged (this class subclasses it), because it is
faithful to the paper:
- gate f_gate = 1[W_gate(x − b_dec) + b_gate > 0] (W_gate is SAELens's ``W_enc``), magnitude
  f_mag = ReLU(W_mag(x − b_dec) + b_mag) with weight sharing W_mag = exp(r_mag) ⊙ W_gate
  (``r_mag`` per latent), z = f_gate ⊙ f_mag, x̂ = W_dec z + b_dec;
- sparsity loss λ Σ_i ReLU(π_gate)_i ‖W_dec,i‖ (L1 on the gate path weighted by decoder norms),
  with SAELens's λ warm-up (``l1_coefficient``, ``l1_warm_up_steps``);
- the inference form, SAELens's ``GatedSAE``: the trained SAE is saved as ``architecture: "gated"``
  and loads with plain ``sae_lens``.

Added here, where SAELens departs from the paper or lacks a piece:
- the auxiliary reconstruction ‖x − (ReLU(π_gate) W_dec + b_dec)‖² goes through a FROZEN copy
  of the decoder (``W_dec`` and ``b_dec`` detached in that path), as the paper specifies: it
  trains the gate to reconstruct without pulling the decoder toward the gate's magnitudes.
  SAELens sends this term's gradient into W_dec and b_dec. (b_dec still gets gradient through the
  encoder input x − b_dec, which the paper does not freeze.)
- decoder rows kept at unit norm in training (as in the paper; the L1's decoder-norm weight is then 1):
  with the auxiliary term's decoder frozen, nothing else holds the norms up against the norm-weighted
  L1, and without this they collapsed (0.017 mean row norm, L0 38, 4/64 planted directions recovered where
  SAELens's gated recovered 64/64; with it 64/64, tests/test_gated.py). Renormalised by
  ``UnitNormSAETrainer``'s optimizer hook or, under SAELens's plain ``SAETrainer``, at each training
  forward; the encoder starts as the decoder's transpose scaled by ``decoder_init_norm``.
- initial weights from a local ``torch.Generator`` seeded by ``init_seed`` (SAELens's scheme:
  Kaiming-uniform decoder rows scaled to ``decoder_init_norm``, encoder = decoder transpose,
  zero biases and r_mag), recorded in ``metadata.init_seed``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from sae_lens.saes.gated_sae import GatedSAE, GatedSAEConfig, GatedTrainingSAE, GatedTrainingSAEConfig
from sae_lens.saes.sae import SAEConfig, TrainStepInput, TrainStepOutput
from torch import nn
from typing_extensions import override

from qsae_lens.training.common import (
    keep_rows_unit_norm,
    renormalize_rows_,
    renormalized_by_optimizer,
    resolve_init_seed,
)

ARCHITECTURE = "gated_frozen_aux"


@dataclass
class GatedFrozenAuxSAEConfig(GatedSAEConfig):
    """Inference config under the ``gated_frozen_aux`` name, used only to load *training*
    checkpoints (final SAEs are saved as plain ``gated``)."""

    @override
    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE


@dataclass
class GatedFrozenAuxTrainingSAEConfig(GatedTrainingSAEConfig):
    """Training config: SAELens's Gated config (``l1_coefficient``, ``l1_warm_up_steps``,
    ``decoder_init_norm``) plus ``init_seed`` (None → drawn from torch's RNG; recorded in
    ``metadata.init_seed``)."""

    init_seed: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.l1_coefficient < 0:
            raise ValueError(f"l1_coefficient must be >= 0, got {self.l1_coefficient}")

    @override
    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE

    @override
    def get_inference_config_class(self) -> type[SAEConfig]:
        # Inference is exactly SAELens's GatedSAE: save as "gated" so sae_lens alone loads it.
        return GatedSAEConfig


class GatedFrozenAuxTrainingSAE(GatedTrainingSAE):
    """SAELens's ``GatedTrainingSAE`` with the paper's frozen-decoder auxiliary loss and seeded init."""

    cfg: GatedFrozenAuxTrainingSAEConfig  # type: ignore[assignment]

    def __init__(self, cfg: GatedFrozenAuxTrainingSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        keep_rows_unit_norm(self.W_dec, renormalize_now=False)

    @override
    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        # Unit-norm decoder rows, as the paper trains them. Without them the frozen-decoder auxiliary term
        # leaves nothing to hold the decoder norms up against the norm-weighted L1: measured on planted
        # data (64 directions in 32 dims, SAELens's SAETrainer, 1500 steps, l1 1.0, lr 3e-3) the norms fell
        # to 0.017 (min 0.001), L0 rose to 38 and 4/64 directions were recovered; SAELens's gated: 64/64.
        keep_rows_unit_norm(self.W_dec, renormalize_now=False)
        if not renormalized_by_optimizer(self.W_dec):
            renormalize_rows_(self.W_dec.data)
        return super().training_forward_pass(step_input)

    @override
    def initialize_weights(self) -> None:
        seed = resolve_init_seed(self.cfg.init_seed)
        self.cfg.init_seed = seed
        self.cfg.metadata.init_seed = seed
        shape = (self.cfg.d_sae, self.cfg.d_in)
        if self.device.type == "meta":
            w_dec = torch.empty(shape, dtype=self.dtype, device="meta")
        else:
            # SAELens's base init (kaiming-uniform, rows scaled to decoder_init_norm), but drawn
            # from a local generator on CPU so init_seed alone fixes it on any device.
            generator = torch.Generator(device="cpu").manual_seed(seed)
            w_dec = nn.init.kaiming_uniform_(torch.empty(shape, dtype=torch.float32), generator=generator)
            # unit-norm rows (kept so in training); the encoder = transpose scaled by decoder_init_norm
            w_dec = w_dec / w_dec.norm(dim=-1, keepdim=True)
            w_dec = w_dec.to(dtype=self.dtype, device=self.device)
        self.W_dec = nn.Parameter(w_dec)
        enc_scale = self.cfg.decoder_init_norm if self.cfg.decoder_init_norm is not None else 1.0
        self.W_enc = nn.Parameter((w_dec.T * enc_scale).contiguous())
        self.b_dec = nn.Parameter(torch.zeros(self.cfg.d_in, dtype=self.dtype, device=self.device))
        zeros = {"dtype": self.dtype, "device": self.device}
        self.b_gate = nn.Parameter(torch.zeros(self.cfg.d_sae, **zeros))
        self.r_mag = nn.Parameter(torch.zeros(self.cfg.d_sae, **zeros))
        self.b_mag = nn.Parameter(torch.zeros(self.cfg.d_sae, **zeros))

    @property
    def W_mag(self) -> torch.Tensor:
        """Tensor[d_in, d_sae]: the magnitude path's weights, exp(r_mag) ⊙ W_gate (shared, not a parameter)."""
        return self.W_enc * self.r_mag.exp()

    @override
    def calculate_aux_loss(
        self,
        step_input: TrainStepInput,
        feature_acts: torch.Tensor,
        hidden_pre: torch.Tensor,
        sae_out: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        sae_in = step_input.sae_in
        pi_gate_act = torch.relu(
            (sae_in.to(self.dtype) - self.b_dec * self.cfg.apply_b_dec_to_input) @ self.W_enc + self.b_gate
        )
        # Sparsity: SAELens's decoder-norm-weighted L1 on the gate path (as the paper).
        l1_loss = step_input.coefficients["l1"] * (pi_gate_act * self.W_dec.norm(dim=1)).sum(dim=-1).mean()
        # Auxiliary reconstruction through a frozen decoder copy: gradient reaches the gate only.
        via_gate = pi_gate_act @ self.W_dec.detach() + self.b_dec.detach()
        aux_recon_loss = (via_gate - sae_in.to(self.dtype)).pow(2).sum(dim=-1).mean()
        return {"l1_loss": l1_loss, "auxiliary_reconstruction_loss": aux_recon_loss}


__all__ = [
    "ARCHITECTURE",
    "GatedFrozenAuxSAEConfig",
    "GatedFrozenAuxTrainingSAE",
    "GatedFrozenAuxTrainingSAEConfig",
    "GatedSAE",
]
