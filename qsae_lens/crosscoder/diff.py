"""Model diffing with a two-source crosscoder: which latents are shared, reference-only or other-only.

Per latent ``j`` (source 0 = reference, source 1 = the other, e.g. fp32 and nf4):

* ``relative_norm = ||d_1|| / (||d_0|| + ||d_1||)`` (Lindsey et al. 2024): near 0 → reference-only,
  near 1 → other-only, around 0.5 → shared. Norms in the sources' raw units.
* ``decoder_cosine``: cosine between the two decoder directions.
* Latent Scaling (Minder et al. 2025): with ``u_j`` the decoder of the source the latent leans to
  (its "own" source ``e``), fit per source ``s`` the closed-form least squares
  ``β_s = argmin_β Σ_t ||β f_j(t) u_j − y_s(t)||² = Σ_t f_j(t) <u_j, y_s(t)> / (||u_j||² Σ_t f_j(t)²)``
  for two targets: the error ``y = x_s − x̂_s + f_j d_{j,s}`` (the reconstruction error without latent
  j; high for the *other* source = Complete Shrinkage: the other model needs the latent but its
  decoder was shrunk away) and the reconstruction ``y = x̂_s − b_s − f_j d_{j,s}`` (what the other
  latents reconstruct; high = Latent Decoupling: the other model carries the concept elsewhere).
  ``beta_ratio[j, t] = β_other / β_own_activation`` where the denominator is β of the own source
  fitted on its full centred activation ``x_e − b_e`` (= the sum of both targets, so it is ≈1 for a
  live latent). Minder et al. divide by the own β of the same target; dividing by the own
  activation's β instead keeps the reconstruction ratio finite for truly exclusive latents, whose
  own reconstruction-without-j has no component along ``u_j``.

A latent is exclusive when its relative norm is within ``threshold`` of 0 or 1, with ``threshold``
calibrated on a crosscoder of two identical sources (:func:`calibrate_threshold`), and dead when it
never fires on the given tokens. Exclusive latents whose error beta ratio exceeds ``artefact_ratio`` are
flagged as L1 artefacts (``artefact``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from qsae_lens.crosscoder.model import CrossCoder, stack_sources

SHARED = -1
DEAD = -2
DEFAULT_THRESHOLD = 0.1
"""Default exclusivity cut on the relative norm (Lindsey et al. / Minder et al. use 0.1 and 0.9)."""
DEFAULT_ARTEFACT_RATIO = 0.1
"""Error-β ratio above which an exclusive latent is flagged: planted exclusive features give ~0 (-0.05..0.05
typical), a shared feature 0.3x weaker in the other source that an L1 crosscoder shrank away gives ~0.2."""


class LatentDiff(NamedTuple):
    """Per-latent diffing of a two-source crosscoder (source 0 = reference)."""

    relative_norm: Tensor
    """Tensor[d_sae]: ||d_1|| / (||d_0|| + ||d_1||) (raw units); NaN for a latent with zero decoders."""
    decoder_cosine: Tensor
    """Tensor[d_sae]: cosine between the two decoder directions."""
    beta: Tensor
    """Tensor[d_sae, 2 sources, 3 targets]: Latent Scaling β for targets (error, reconstruction, activation)."""
    beta_ratio: Tensor
    """Tensor[d_sae, 2]: β_other / β_own(activation) for targets (error, reconstruction)."""
    firing_rate: Tensor
    """Tensor[d_sae]: fraction of tokens where the latent is active."""
    exclusive_to: Tensor
    """Tensor[d_sae] int64: -1 shared, -2 dead, else the index of the only source using the latent."""
    artefact: Tensor
    """Tensor[d_sae] bool: exclusive latents whose error β ratio exceeds the cut (the other source's error still
    needs them: Complete Shrinkage)."""
    threshold: float
    """Exclusivity cut used: exclusive when relative_norm <= threshold or >= 1 - threshold."""

    @property
    def n_alive(self) -> int:
        return int((self.exclusive_to != DEAD).sum())

    def count(self, source: int) -> int:
        """Number of latents exclusive to ``source``."""
        return int((self.exclusive_to == source).sum())

    def __repr__(self) -> str:
        n = self.exclusive_to.numel()
        return (f"LatentDiff(d_sae={n}, alive={self.n_alive}, shared={int((self.exclusive_to == SHARED).sum())}, "
                f"only_0={self.count(0)}, only_1={self.count(1)}, artefacts={int(self.artefact.sum())}, "
                f"threshold={self.threshold:.3f})")


def classify(relative_norm: Tensor, alive: Tensor, threshold: float) -> Tensor:
    """Tensor[d_sae] int64 labels from relative norms: 0 / 1 exclusive, -1 shared, -2 dead."""
    labels = torch.full(relative_norm.shape, SHARED, dtype=torch.long)
    labels[relative_norm <= threshold] = 0
    labels[relative_norm >= 1 - threshold] = 1
    labels[~alive | relative_norm.isnan()] = DEAD
    return labels


def _latent_scaling_sums(model: CrossCoder, x_all: Tensor, own: Tensor, block: int) -> tuple[Tensor, Tensor, Tensor]:
    """Blockwise sums for Latent Scaling: (num Tensor[d_sae, S, 3], Σ_t f², n_fired Tensor[d_sae]).

    Memory: one block of Tensor[block, d_sae] activations and Tensor[block, S, d] at a time."""
    s = x_all.shape[1]
    w_raw = model.W_dec * model.input_scale[None, :, None]          # Tensor[d_sae, S, d] raw decoders
    b_raw = model.b_dec * model.input_scale[:, None]                 # Tensor[S, d]
    u = w_raw[torch.arange(w_raw.shape[0]), own]                     # Tensor[d_sae, d] own direction
    ud = torch.einsum("md,msd->ms", u, w_raw)                        # <u_j, d_{j,s}>
    num = torch.zeros(w_raw.shape[0], s, 3, dtype=torch.float64)
    f2 = torch.zeros(w_raw.shape[0], dtype=torch.float64)
    fired = torch.zeros(w_raw.shape[0], dtype=torch.float64)
    with torch.no_grad():
        for i in range(0, x_all.shape[0], block):
            x = x_all[i:i + block]
            f = model.encode(x)                                      # Tensor[b, d_sae]
            x_hat = model.decode(f)                                  # Tensor[b, S, d]
            f2_block = f.double().pow(2).sum(0)
            for src in range(s):  # S is 2: a loop over sources, not latents or tokens
                err_proj = (x[:, src] - x_hat[:, src]) @ u.T        # <u_j, e_s(t)>  Tensor[b, d_sae]
                rec_proj = (x_hat[:, src] - b_raw[src]) @ u.T       # <u_j, x̂_s(t) − b_s>
                fe = (f * err_proj).double().sum(0)
                fr = (f * rec_proj).double().sum(0)
                own_term = f2_block * ud[:, src].double()            # Σ_t f_j² <u_j, d_{j,s}>
                num[:, src, 0] += fe + own_term
                num[:, src, 1] += fr - own_term
                num[:, src, 2] += fe + fr
            f2 += f2_block
            fired += (f > 0).double().sum(0)
    den = u.double().pow(2).sum(-1) * f2
    return num / den.clamp_min(1e-30)[:, None, None], f2, fired


def diff_latents(model: CrossCoder, sources: Sequence[Tensor], *, threshold: float = DEFAULT_THRESHOLD,
                 artefact_ratio: float = DEFAULT_ARTEFACT_RATIO, block: int = 4096) -> LatentDiff:
    """Classify every latent of a two-source crosscoder as shared, exclusive or dead, with Latent Scaling.

    ``sources``: the two aligned Tensor[n, d] (held-out tokens preferably) the firing rates and
    Latent Scaling fits are computed on. ``threshold``: from :func:`calibrate_threshold` on a
    crosscoder of identical sources, or the literature's 0.1.
    """
    if model.cfg.n_sources != 2:
        raise ValueError(f"diff_latents compares two sources; this crosscoder has {model.cfg.n_sources}")
    if not 0 < threshold < 0.5:
        raise ValueError(f"threshold must be in (0, 0.5), got {threshold}")
    x_all = stack_sources(list(sources)).float()
    with torch.no_grad():
        norms = model.decoder_norms()                                # Tensor[d_sae, 2]
        relative = norms[:, 1] / norms.sum(-1)
        w = model.W_dec
        cosine = torch.nn.functional.cosine_similarity(w[:, 0], w[:, 1], dim=-1)
    own = (relative > 0.5).long()                                    # source the latent leans to
    beta, _, fired = _latent_scaling_sums(model, x_all, own, block)
    other = 1 - own
    idx = torch.arange(beta.shape[0])
    own_act = beta[idx, own, 2]
    ratio = beta[idx, other, :2] / own_act.clamp_min(1e-12)[:, None]
    ratio[own_act <= 1e-12] = float("nan")
    labels = classify(relative, fired > 0, threshold)
    # flagged on the error ratio (Complete Shrinkage): the reconstruction ratio is reported but not used to
    # flag, because co-firing latents with overlapping directions give it a noise floor of ~0.1-0.25 even
    # for planted exclusive features (tests/test_crosscoder.py)
    artefact = (labels >= 0) & (ratio[:, 0].nan_to_num(0.0) > artefact_ratio)
    return LatentDiff(relative_norm=relative, decoder_cosine=cosine, beta=beta.float(), beta_ratio=ratio.float(),
                      firing_rate=(fired / x_all.shape[0]).float(), exclusive_to=labels, artefact=artefact,
                      threshold=float(threshold))


class Calibration(NamedTuple):
    """Exclusivity threshold calibrated on a crosscoder of two identical sources."""

    threshold: float
    """Cut to use in :func:`diff_latents`."""
    null_rate: float
    """Fraction of the null crosscoder's live latents exclusive at that cut (≤ ``max_null_rate``)."""
    null_spread: Tensor
    """Tensor[n_alive]: |relative_norm − 0.5| of the null's live latents (its spread from optimisation noise)."""


def calibrate_threshold(null_model: CrossCoder, null_sources: Sequence[Tensor], *, max_null_rate: float = 0.01,
                        max_threshold: float = DEFAULT_THRESHOLD, block: int = 4096) -> Calibration:
    """The exclusivity cut at which a crosscoder of two *identical* sources has at most
    ``max_null_rate`` exclusive latents, and no looser than ``max_threshold``.

    Why: with identical sources every latent is truly shared, so any relative norm far from 0.5
    is optimisation noise (decoders initialised independently per source drift apart); the cut
    must sit beyond that noise to call a latent of a real pair exclusive.
    """
    x = stack_sources(list(null_sources)).float()
    with torch.no_grad():
        norms = null_model.decoder_norms()
        relative = norms[:, 1] / norms.sum(-1)
        fired = torch.zeros(relative.shape, dtype=torch.bool)
        for i in range(0, x.shape[0], block):  # memory: one Tensor[block, d_sae] at a time
            fired |= (null_model.encode(x[i:i + block]) > 0).any(0)
        alive = fired & ~relative.isnan()
    edge = torch.minimum(relative, 1 - relative)[alive]              # distance to the nearest end
    if edge.numel() == 0:
        raise ValueError("the null crosscoder has no live latent on these tokens: train it longer or on more rows")
    # largest cut keeping the null's exclusive fraction <= max_null_rate: just below the q-quantile of edge
    q = torch.quantile(edge.double(), max_null_rate).item()
    cut = min(max_threshold, q * (1 - 1e-6))
    rate = float((edge <= cut).float().mean())
    return Calibration(threshold=float(max(cut, 1e-6)), null_rate=rate, null_spread=(0.5 - edge))
