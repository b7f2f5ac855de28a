"""TopK SAE trained as in Gao et al. 2024 ("Scaling and evaluating sparse autoencoders", OpenAI),
registered with SAELens as ``"openai_topk"``.

Inference is SAELens's plain ``topk`` (z = TopK(ReLU(W_enc(x − b_dec) + b_enc)), x̂ = W_dec z + b_dec):
the final SAE is saved with ``architecture: "topk"`` and loads with plain ``sae_lens``.
Training differs from SAELens's ``TopKTrainingSAE`` (which this subclasses for its encoder,
hooks and inference conversion) where SAELens departs from the paper:

- aux-k loss: the top ``k_aux`` pre-activations among *dead* latents are decoded WITHOUT b_dec
  and regress the main residual e = x − x̂; the loss is normalised,
  ‖e − ê‖² / ‖e − mean(e)‖², and weighted by ``aux_loss_coefficient`` (1/32). SAELens's own
  has coefficient 1.0, no normalisation, k_aux fixed at d_in/2 and a step-counted window.
- dead latents are counted in TOKENS (``dead_tokens_threshold``, 10M in the paper) in a buffer
  saved with training checkpoints, so SAELens's ``resume_from_checkpoint`` restores it.
- the main loss is the normalised MSE (fraction of variance unexplained) as in the paper, so
  that α = 1/32 weighs the two terms as published (``normalized_mse=False`` gives SAELens's
  summed MSE).
- decoder rows are unit-norm: the gradient component parallel to each row is projected out
  (gradient hook on W_dec) and rows are renormalised after every step of the optimizer that
  trains this SAE (``UnitNormSAETrainer``, used by ``train_sae_on_activations``); under SAELens's
  plain ``SAETrainer`` the SAE renormalises them itself before each forward pass and before saving;
  the encoder starts as the decoder's transpose; initial weights come from a local generator
  seeded by ``init_seed`` (recorded in the metadata).
- b_dec starts at the geometric median (or mean) of the first training batch (``b_dec_init``),
  or of a sample you pass to ``initialize_b_dec``.
- the k active latents are decoded sparsely (``embedding_bag``), not by a dense d_sae matmul.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from sae_lens.saes.sae import SAEConfig, TrainCoefficientConfig, TrainStepInput, TrainStepOutput
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig
from torch import nn
from typing_extensions import override

from qsae_lens.training.common import (
    B_DEC_INITS,
    b_dec_from_activations,
    keep_rows_unit_norm,
    renormalize_rows_,
    renormalized_by_optimizer,
    resolve_init_seed,
    seeded_unit_rows,
)

ARCHITECTURE = "openai_topk"

# Buffers that exist only while training; stripped from the inference checkpoint.
_TRAINING_BUFFERS = ("tokens_since_fired", "b_dec_initialized")


@dataclass
class OpenAITopKSAEConfig(TopKSAEConfig):
    """Inference config under the ``openai_topk`` name, used only to load *training* checkpoints
    (final SAEs are saved as plain ``topk``)."""

    @override
    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE


class OpenAITopKSAE(TopKSAE):
    """SAELens's ``TopKSAE``, loading a training checkpoint of ``openai_topk`` (drops its
    training-only buffers)."""

    @override
    def process_state_dict_for_loading(self, state_dict: dict[str, Any]) -> None:
        for name in _TRAINING_BUFFERS:
            state_dict.pop(name, None)
        super().process_state_dict_for_loading(state_dict)


@dataclass
class OpenAITopKTrainingSAEConfig(TopKTrainingSAEConfig):
    """Training config for the OpenAI TopK SAE.

    Args:
        k: active latents per token (inherited from SAELens's TopK config).
        aux_loss_coefficient: α, weight of the normalised aux-k loss (paper: 1/32; 0 disables it).
        k_aux: dead latents decoded by the aux-k loss per token; None → d_in // 2 (paper).
        dead_tokens_threshold: a latent is dead after this many training tokens without firing
            (paper: 10M). Scale it with your budget: a 300k-token run never sees a 10M window.
        normalized_mse: main loss as ‖x − x̂‖² / ‖x − mean(x)‖² per batch (paper) instead of
            SAELens's per-token summed MSE.
        b_dec_init: "geometric_median" (paper), "mean" or "zeros": b_dec from the first batch.
        init_seed: seed of the initial weights (None → drawn from torch's RNG); recorded in
            ``metadata.init_seed``.
        rescale_acts_by_decoder_norm: must stay False: rows are kept unit-norm instead.
        decoder_init_norm: must be None or 1.0 (rows start unit-norm).
    """

    aux_loss_coefficient: float = 1.0 / 32.0
    rescale_acts_by_decoder_norm: bool = False
    decoder_init_norm: float | None = 1.0
    k_aux: int | None = None
    dead_tokens_threshold: int = 10_000_000
    normalized_mse: bool = True
    b_dec_init: str = "geometric_median"
    init_seed: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.k <= self.d_sae:
            raise ValueError(f"k must be in [1, d_sae={self.d_sae}], got {self.k}")
        if self.k_aux is not None and not 0 < self.k_aux <= self.d_sae:
            raise ValueError(f"k_aux must be None or in [1, d_sae={self.d_sae}], got {self.k_aux}")
        if self.aux_loss_coefficient < 0:
            raise ValueError(f"aux_loss_coefficient must be >= 0, got {self.aux_loss_coefficient}")
        if self.dead_tokens_threshold <= 0:
            raise ValueError(
                f"dead_tokens_threshold must be a positive token count, got {self.dead_tokens_threshold}"
            )
        if self.b_dec_init not in B_DEC_INITS:
            raise ValueError(f"b_dec_init must be one of {B_DEC_INITS}, got {self.b_dec_init!r}")
        if self.rescale_acts_by_decoder_norm:
            raise ValueError(
                "openai_topk keeps decoder rows unit-norm, so rescale_acts_by_decoder_norm must be False "
                "(use SAELens's 'topk' architecture for the rescaled variant)"
            )
        if self.decoder_init_norm not in (None, 1.0):
            raise ValueError(
                f"openai_topk decoder rows start unit-norm: decoder_init_norm must be None or 1.0, got {self.decoder_init_norm}"
            )
        if self.use_sparse_activations:
            raise ValueError("openai_topk decodes sparsely itself; leave use_sparse_activations=False")
        if self.normalize_activations in ("constant_norm_rescale", "layer_norm"):
            raise ValueError(
                f"openai_topk's aux-k loss regresses the residual in input space, which per-token "
                f"normalize_activations={self.normalize_activations!r} breaks; use 'none' or 'expected_average_only_in'"
            )

    @override
    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE

    @override
    def get_inference_config_class(self) -> type[SAEConfig]:
        # The trained SAE *is* a plain SAELens TopK SAE: saving it as "topk" lets anyone load it
        # with sae_lens alone.
        return TopKSAEConfig

    @property
    def effective_k_aux(self) -> int:
        return self.k_aux if self.k_aux is not None else max(1, self.d_in // 2)


class OpenAITopKTrainingSAE(TopKTrainingSAE):
    """TopK SAE with OpenAI's training recipe; see the module docstring for what differs from
    SAELens's ``TopKTrainingSAE``.

    Buffers (saved in training checkpoints, not in the inference SAE):
        tokens_since_fired: Tensor[d_sae] int64, training tokens since each latent last fired.
        b_dec_initialized: Tensor[] bool, whether b_dec has been set from data.
    """

    cfg: OpenAITopKTrainingSAEConfig  # type: ignore[assignment]
    tokens_since_fired: torch.Tensor
    b_dec_initialized: torch.Tensor

    def __init__(self, cfg: OpenAITopKTrainingSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        device = self.W_dec.device
        self.register_buffer("tokens_since_fired", torch.zeros(cfg.d_sae, dtype=torch.int64, device=device))
        self.register_buffer("b_dec_initialized", torch.tensor(cfg.b_dec_init == "zeros", device=device))
        keep_rows_unit_norm(self.W_dec, renormalize_now=False)

    @override
    def initialize_weights(self) -> None:
        seed = resolve_init_seed(self.cfg.init_seed)
        self.cfg.init_seed = seed
        self.cfg.metadata.init_seed = seed
        # Sparse-autoencoder initialisation (Gao et al.): unit-norm decoder rows, encoder = transpose.
        w_dec = seeded_unit_rows(self.cfg.d_sae, self.cfg.d_in, seed, dtype=self.dtype, device=self.device)
        self.W_dec = nn.Parameter(w_dec)
        self.W_enc = nn.Parameter(w_dec.T.clone().contiguous())
        self.b_dec = nn.Parameter(torch.zeros(self.cfg.d_in, dtype=self.dtype, device=self.device))
        self.b_enc = nn.Parameter(torch.zeros(self.cfg.d_sae, dtype=self.dtype, device=self.device))

    @torch.no_grad()
    def initialize_b_dec(self, activations: torch.Tensor) -> None:
        """Set b_dec from a sample Tensor[n, d_in] of activations with ``cfg.b_dec_init``."""
        if activations.shape[-1] != self.cfg.d_in:
            raise ValueError(
                f"activations must be Tensor[n, {self.cfg.d_in}], got {tuple(activations.shape)}"
            )
        sample = activations.reshape(-1, self.cfg.d_in).to(self.W_dec.device, torch.float32)
        self.b_dec.data.copy_(b_dec_from_activations(sample, self.cfg.b_dec_init).to(self.dtype))
        self.b_dec_initialized.fill_(True)

    def decode_sparse(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Σ_j values[..., j] · W_dec[indices[..., j]] without b_dec: Tensor[..., d_in].

        values, indices: Tensor[..., k]. One ``embedding_bag`` gathers only the k rows per token,
        O(n·k·d_in) instead of the dense O(n·d_sae·d_in) matmul; its backward scatters into
        W_dec's rows the same way.
        """
        lead = values.shape[:-1]
        k = values.shape[-1]
        out = F.embedding_bag(
            indices.reshape(-1, k),
            self.W_dec,
            per_sample_weights=values.reshape(-1, k).to(self.W_dec.dtype),
            mode="sum",
        )
        return out.reshape(*lead, self.cfg.d_in)

    def encode_topk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(values Tensor[n, k] ≥ 0, indices Tensor[n, k], hidden_pre Tensor[n, d_sae]) for Tensor[n, d_in] input."""
        sae_in = self.process_sae_in(x)
        hidden_pre = self.hook_sae_acts_pre(sae_in @ self.W_enc + self.b_enc)
        values, indices = hidden_pre.topk(self.cfg.k, dim=-1, sorted=False)
        return values.relu(), indices, hidden_pre

    @override
    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        sae_in = step_input.sae_in
        # Cheap flag check; re-attaches the unit-norm hooks when W_dec is a new Parameter
        # (SAELens's load_from_disk assigns loaded tensors, copy.deepcopy drops tensor hooks).
        keep_rows_unit_norm(self.W_dec, renormalize_now=False)
        if not renormalized_by_optimizer(self.W_dec):
            # No optimizer renormalises after its steps (SAELens's plain SAETrainer, e.g. inside
            # LanguageModelSAETrainingRunner): renormalise the rows the previous step moved here.
            renormalize_rows_(self.W_dec.data)
        if not bool(self.b_dec_initialized):
            self.initialize_b_dec(sae_in)

        values, indices, hidden_pre = self.encode_topk(sae_in)
        sae_out = self.decode_sparse(values, indices) + self.b_dec
        sae_out = self.hook_sae_recons(sae_out)
        sae_out = self.run_time_activation_norm_fn_out(sae_out)

        residual = sae_in.to(sae_out.dtype) - sae_out
        if self.cfg.normalized_mse:
            mse_loss = residual.pow(2).sum() / _total_variance(sae_in.to(sae_out.dtype))
        else:
            mse_loss = residual.pow(2).sum(dim=-1).mean()

        with torch.no_grad():
            # Dead mask from the window *before* this batch (as OpenAI), then update the window.
            dead_mask = self.tokens_since_fired >= self.cfg.dead_tokens_threshold
            fired = torch.zeros(self.cfg.d_sae, dtype=torch.bool, device=indices.device)
            fired[indices[values > 0]] = True
            self.tokens_since_fired += sae_in.shape[0]
            self.tokens_since_fired[fired] = 0
            # The trainer's firing statistics need dense activations; they carry no gradient.
            feature_acts = torch.zeros_like(hidden_pre).scatter_(-1, indices, values)

        aux_loss = self.openai_aux_loss(residual.detach(), hidden_pre, dead_mask)
        n_dead = int(dead_mask.sum())
        return TrainStepOutput(
            sae_in=sae_in,
            sae_out=sae_out,
            feature_acts=feature_acts,
            hidden_pre=hidden_pre,
            loss=mse_loss + aux_loss,
            losses={"mse_loss": mse_loss, "auxiliary_reconstruction_loss": aux_loss},
            metrics={"dead_latents_token_window": n_dead},
        )

    def openai_aux_loss(
        self, residual: torch.Tensor, hidden_pre: torch.Tensor, dead_mask: torch.Tensor
    ) -> torch.Tensor:
        """α · ‖e − ê‖² / ‖e − mean(e)‖², ê = Σ top-k_aux dead latents' activations · W_dec rows (no b_dec).

        residual: Tensor[n, d_in] (detached e = x − x̂); hidden_pre: Tensor[n, d_sae];
        dead_mask: Tensor[d_sae] bool. Zero (and no extra work) when no latent is dead or α = 0.
        """
        n_dead = int(dead_mask.sum())
        if n_dead == 0 or self.cfg.aux_loss_coefficient == 0:
            return hidden_pre.new_zeros(())
        k_aux = min(self.cfg.effective_k_aux, n_dead)
        dead_pre = hidden_pre.masked_fill(~dead_mask, float("-inf"))
        values, indices = dead_pre.topk(k_aux, dim=-1, sorted=False)
        recon = self.decode_sparse(values.relu(), indices)
        aux = (recon - residual).pow(2).sum() / _total_variance(residual)
        return self.cfg.aux_loss_coefficient * aux

    @override
    def calculate_aux_loss(
        self,
        step_input: TrainStepInput,
        feature_acts: torch.Tensor,
        hidden_pre: torch.Tensor,
        sae_out: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        # Only reached through SAELens's base training_forward_pass, which this class replaces;
        # kept consistent (token-window dead mask, no window update) for callers that use it.
        dead_mask = self.tokens_since_fired >= self.cfg.dead_tokens_threshold
        residual = (step_input.sae_in - sae_out).detach()
        return {"auxiliary_reconstruction_loss": self.openai_aux_loss(residual, hidden_pre, dead_mask)}

    @override
    def get_coefficients(self) -> dict[str, TrainCoefficientConfig | float]:
        return {}

    @override
    def process_state_dict_for_saving_inference(self, state_dict: dict[str, Any]) -> None:
        if not renormalized_by_optimizer(self.W_dec) and self.W_dec.device.type != "meta":
            # Without an optimizer hook the last step's drift is still there: remove it, in place,
            # so the saved and the in-memory SAE stay the same.
            renormalize_rows_(self.W_dec.data)
            if "W_dec" in state_dict:
                state_dict["W_dec"] = self.W_dec.data
        super().process_state_dict_for_saving_inference(state_dict)
        for name in _TRAINING_BUFFERS:
            state_dict.pop(name, None)


def _total_variance(x: torch.Tensor) -> torch.Tensor:
    """‖x − mean(x)‖² over a batch Tensor[n, d] (mean over tokens), floored to avoid 0/0."""
    return (x - x.mean(dim=0)).pow(2).sum().clamp_min(torch.finfo(x.dtype).tiny)
