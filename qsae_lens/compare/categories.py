"""Latent categories by firing frequency: dead, rare, common, frequent.

A latent "fires" on a token when its code is non-zero (SAELens's convention in training and
``run_evals``: ``feature_acts.bool()`` / ``!= 0``, which also counts negative codes of
bidirectional architectures). Categories (methodology):

- dead: max |activation| < 1e-6 over the evaluated tokens;
- rare: fires on < 1% of tokens;  common: 1% to < 50%;  frequent: >= 50%.

When only frequencies are known (SAELens's ``sparsity.safetensors``, no activations), "dead" means
frequency exactly 0 over SAELens's last sparsity window.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "CATEGORY_NAMES",
    "DEAD",
    "RARE",
    "COMMON",
    "FREQUENT",
    "category_counts",
    "category_transition_table",
    "firing_frequency_from_log_sparsity",
    "firing_frequency_from_sparsity_file",
    "firing_stats_from_codes",
    "latent_categories",
    "TransitionTables",
    "seed_and_precision_transition_tables",
]

DEAD, RARE, COMMON, FREQUENT = 0, 1, 2, 3
CATEGORY_NAMES: tuple[str, ...] = ("dead", "rare", "common", "frequent")
DEAD_MAX_ACTIVATION = 1e-6
RARE_BELOW = 0.01
FREQUENT_FROM = 0.5

# SAELens writes log10(feature_sparsity + 1e-10) (sae_lens.training.sae_trainer._log_feature_sparsity).
_SAELENS_LOG_EPS = 1e-10


def _check_vector(t: Tensor, name: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch Tensor; got {type(t).__name__}.")
    if t.ndim != 1:
        raise ValueError(f"{name} must be 1-D (Tensor[d_sae]); got shape {tuple(t.shape)}.")
    if torch.isnan(t).any():
        raise ValueError(f"{name} contains NaN.")
    return t.detach()


def latent_categories(firing_frequency: Tensor, max_activation: Tensor | None = None) -> Tensor:
    """Category code (DEAD=0, RARE=1, COMMON=2, FREQUENT=3) of each latent, Tensor[d_sae] int64.

    ``firing_frequency``: Tensor[d_sae], fraction of tokens on which each latent fires, in [0, 1].
    ``max_activation``: Tensor[d_sae], max |activation| over the same tokens; a latent whose max is
    below 1e-6 is dead even if its (tiny) code is technically non-zero. Without it, dead = frequency 0.
    Names: ``CATEGORY_NAMES[code]``.
    """
    freq = _check_vector(firing_frequency, "firing_frequency")
    # Compare in the input's own float dtype: float32(0.01) < 0.01 in float64, which would make a
    # latent at exactly "1%" rare.
    if not freq.is_floating_point():
        freq = freq.to(torch.float64)
    if ((freq < 0) | (freq > 1)).any():
        raise ValueError("firing_frequency must lie in [0, 1] (a fraction of tokens, not a log10 sparsity).")
    cats = torch.full(freq.shape, COMMON, dtype=torch.int64, device=freq.device)
    cats[freq < RARE_BELOW] = RARE
    cats[freq >= FREQUENT_FROM] = FREQUENT
    dead = freq == 0
    if max_activation is not None:
        max_act = _check_vector(max_activation, "max_activation")
        if max_act.shape != freq.shape:
            raise ValueError(
                f"max_activation has shape {tuple(max_act.shape)}, firing_frequency {tuple(freq.shape)}; they must match."
            )
        dead = dead | (max_act.to(freq.device).abs() < DEAD_MAX_ACTIVATION)
    cats[dead] = DEAD
    return cats


def category_counts(categories: Tensor) -> dict[str, int]:
    """Number of latents per category, ``{"dead": .., "rare": .., "common": .., "frequent": ..}``."""
    cats = _check_vector(categories, "categories")
    counts = torch.bincount(cats.to(torch.int64).cpu(), minlength=len(CATEGORY_NAMES))
    if counts.numel() != len(CATEGORY_NAMES):
        raise ValueError("categories must be codes 0..3 as returned by latent_categories.")
    return dict(zip(CATEGORY_NAMES, counts.tolist()))


def firing_stats_from_codes(codes_iter: Iterable[Tensor]) -> tuple[Tensor, Tensor]:
    """Stream over batches of SAE codes (each Tensor[b, d_sae]) → (frequency, max |activation|).

    Returns two Tensor[d_sae] float64 (on CPU): fraction of tokens where the code is non-zero, and
    max |code|. Memory is one batch plus O(d_sae), so codes of millions of tokens never coexist.
    """
    fired: Tensor | None = None
    max_act: Tensor | None = None
    n = 0
    for i, codes in enumerate(codes_iter):
        if not isinstance(codes, Tensor) or codes.ndim != 2:
            raise ValueError(f"batch {i} of codes must be a Tensor[b, d_sae]; got {getattr(codes, 'shape', type(codes))}.")
        codes = codes.detach()
        if fired is None:
            fired = torch.zeros(codes.shape[1], dtype=torch.float64)
            max_act = torch.zeros(codes.shape[1], dtype=torch.float64)
        elif codes.shape[1] != fired.numel():
            raise ValueError(f"batch {i} has {codes.shape[1]} latents; earlier batches had {fired.numel()}.")
        if codes.shape[0] == 0:
            continue
        if torch.isnan(codes).any():
            raise ValueError(f"batch {i} of codes contains NaN.")
        fired += (codes != 0).sum(dim=0).to("cpu", torch.float64)
        max_act = torch.maximum(max_act, codes.abs().amax(dim=0).to("cpu", torch.float64))
        n += codes.shape[0]
    if fired is None or n == 0:
        raise ValueError("codes_iter yielded no tokens; firing statistics need at least one batch of codes.")
    return fired / n, max_act


def firing_frequency_from_sparsity_file(path: str | Path) -> Tensor:
    """Firing frequency (Tensor[d_sae] float64, in [0, 1]) from SAELens's ``sparsity.safetensors``.

    The file is float32, so frequencies come back to ~1e-7 relative: a latent sitting exactly on a
    category threshold (e.g. 0.5) may land on either side of it.

    SAELens saves ``{"sparsity": log10(freq + 1e-10)}`` (float32) for the last sparsity window of
    training. We invert it in float64 and snap values that are zero up to float32 rounding of the
    log (|error| <~ 1e-15) to exactly 0, so ``latent_categories`` marks those latents dead. With only
    this file, "dead" can only mean frequency 0 (no max activation is stored).
    ``path``: the file, or a SAELens checkpoint folder containing it.
    """
    from safetensors import safe_open

    p = Path(path)
    if p.is_dir():
        p = p / "sparsity.safetensors"
    if not p.is_file():
        raise FileNotFoundError(f"no sparsity file at {p}; SAELens writes sparsity.safetensors next to the SAE weights.")
    try:
        with safe_open(str(p), framework="pt") as f:
            if "sparsity" not in f.keys():
                raise KeyError(f"{p} has tensors {list(f.keys())}, not SAELens's 'sparsity'.")
            log_sparsity = f.get_tensor("sparsity")
    except KeyError:
        raise
    except Exception as exc:
        raise ValueError(f"could not read {p} as safetensors: {exc}") from exc
    return firing_frequency_from_log_sparsity(log_sparsity, source=str(p))


def firing_frequency_from_log_sparsity(log_sparsity: Tensor, *, source: str = "log_sparsity") -> Tensor:
    """Invert SAELens's log10(freq + 1e-10) (Tensor[d_sae], as in ``sparsity.safetensors`` or returned by
    ``SAE.from_pretrained_with_cfg_and_sparsity``) to firing frequency, Tensor[d_sae] float64 in [0, 1].

    Plain ``10 ** log_sparsity`` would leave never-firing latents at 1e-10 (rare, not dead): the
    1e-10 offset is subtracted, and values that are zero up to float32 rounding of the log are
    snapped to exactly 0.
    """
    log_sparsity = torch.as_tensor(log_sparsity).detach().to("cpu", torch.float64).reshape(-1)
    if torch.isnan(log_sparsity).any() or (log_sparsity > 1e-6).any():
        raise ValueError(f"{source}: should hold log10 firing frequencies (<= 0) with no NaN.")
    freq = torch.pow(10.0, log_sparsity) - _SAELENS_LOG_EPS
    # float32 rounding of log10(1e-10) = -10 leaves |10^x - 1e-10| ~ 1e-16: snap it to exact zero.
    freq[freq < 1e-13] = 0.0
    return freq.clamp_(max=1.0)


def category_transition_table(cat_a: Tensor, cat_b: Tensor) -> Tensor:
    """Counts of (category in a, category in b) over matched pairs: Tensor[4, 4] int64.

    ``cat_a``, ``cat_b``: Tensor[m] category codes of the a-side and b-side latent of each matched
    pair (e.g. ``latent_categories(...)[rows]`` and ``[cols]``). Entry [i, j] = pairs whose a-latent
    is in category i and b-latent in category j (rows and columns in ``CATEGORY_NAMES`` order).
    """
    a = _check_vector(cat_a, "cat_a").to(torch.int64).cpu()
    b = _check_vector(cat_b, "cat_b").to(torch.int64).cpu()
    if a.shape != b.shape:
        raise ValueError(f"cat_a and cat_b must have one entry per matched pair; got {a.numel()} and {b.numel()}.")
    k = len(CATEGORY_NAMES)
    if a.numel() and (a.min() < 0 or a.max() >= k or b.min() < 0 or b.max() >= k):
        raise ValueError("categories must be codes 0..3 as returned by latent_categories.")
    return torch.bincount(a * k + b, minlength=k * k).reshape(k, k)


class TransitionTables(NamedTuple):
    """Category transitions of matched latents: seed to seed (the yardstick) beside baseline to precision."""

    names: tuple[str, ...]
    """Category names, the row/column order of both tables."""
    seed: Tensor
    """Tensor[C, C] int64: baseline seed s (rows) -> baseline seed s' (columns), matched latents."""
    precision: Tensor
    """Tensor[C, C] int64: baseline seed s (rows) -> precision SAE (columns), matched latents."""


def seed_and_precision_transition_tables(
    cat_base: Tensor,
    cat_other_seed: Tensor,
    seed_matching: tuple[Tensor, Tensor],
    cat_precision: Tensor,
    precision_matching: tuple[Tensor, Tensor],
) -> TransitionTables:
    """The precision's transition table beside the seed-to-seed one, so "dead at nf4" is read against how
    many latents change category between two baseline seeds anyway.

    ``cat_*``: Tensor[d_sae] category codes (:func:`latent_categories`); ``*_matching``: ``(rows, cols)``
    Tensor[m] int64 of a one-to-one matching with the baseline SAE's latents as rows.
    """
    rows_s, cols_s = seed_matching
    rows_p, cols_p = precision_matching
    return TransitionTables(
        tuple(CATEGORY_NAMES),
        category_transition_table(cat_base[rows_s], cat_other_seed[cols_s]),
        category_transition_table(cat_base[rows_p], cat_precision[cols_p]),
    )
