"""Latent-wise two-sample tests with family-wise (Holm) or false-discovery (Benjamini-Hochberg) control.

One test per SAE latent of "is this latent's activation different between the two classes?". At a
per-test confidence of 99.999% over 16,384 latents the family-wise confidence is only ~85%
(0.99999^16384), so the p-values are always corrected. The tests run through scipy vectorised over
the latent axis (``axis=0``), in column blocks so memory stays ``n x block`` float64.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor

from qsae_lens.compare.stats import benjamini_hochberg, holm


class LatentTests(NamedTuple):
    """Per-latent tests of class 1 vs class 0; every tensor is ``Tensor[d]`` over latents."""

    statistic: Tensor
    """Welch t (class 1 minus class 0) or the Mann-Whitney U of class 1; 0 for constant latents."""
    p_value: Tensor
    """Two-sided raw p-value (1 for latents constant over all rows)."""
    p_corrected: Tensor
    """Holm- or BH-adjusted p-value over all latents."""
    effect_size: Tensor
    """Cohen's d: (mean_1 - mean_0) / pooled standard deviation (0 where that sd is 0)."""
    rejected: Tensor
    """bool: p_corrected <= alpha."""
    test: str
    correction: str
    alpha: float

    def __repr__(self) -> str:
        return (f"LatentTests({self.test}, {self.correction} at alpha={self.alpha}: "
                f"{int(self.rejected.sum())}/{self.rejected.numel()} latents rejected)")


def cohens_d(x1: np.ndarray, x0: np.ndarray) -> np.ndarray:
    """Cohen's d per column with the pooled (n-1)-weighted standard deviation, ``float64[d]``."""
    n1, n0 = len(x1), len(x0)
    pooled = np.sqrt(((n1 - 1) * x1.var(0, ddof=1) + (n0 - 1) * x0.var(0, ddof=1)) / (n1 + n0 - 2))
    diff = x1.mean(0) - x0.mean(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(pooled > 0, diff / np.where(pooled > 0, pooled, 1.0), 0.0)


def latent_tests(codes: Tensor | np.ndarray, labels: Tensor | np.ndarray | Sequence[int], *,
                 test: Literal["welch", "mannwhitney"] = "welch",
                 correction: Literal["holm", "bh"] = "holm", alpha: float = 0.05,
                 block: int = 4096) -> LatentTests:
    """Test every latent of ``codes: Tensor[n, d]`` for a difference between ``labels`` 1 and 0.

    ``test="welch"``: ``scipy.stats.ttest_ind(equal_var=False)``; ``"mannwhitney"``: the rank test,
    better for sparse, skewed codes (``scipy.stats.mannwhitneyu``, two-sided, asymptotic with tie
    correction). ``correction``: "holm" controls the family-wise error rate, "bh" the false
    discovery rate, both at ``alpha``.
    """
    from scipy import stats

    if test not in ("welch", "mannwhitney"):
        raise ValueError(f"test must be 'welch' or 'mannwhitney', got {test!r}.")
    if correction not in ("holm", "bh"):
        raise ValueError(f"correction must be 'holm' or 'bh', got {correction!r}.")
    x = codes.detach().to("cpu", torch.float64).numpy() if isinstance(codes, Tensor) else np.asarray(codes, np.float64)
    y = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"codes must be Tensor[n, d] and labels int[n]; got {x.shape} and {y.shape}.")
    if not set(np.unique(y).tolist()) <= {0, 1}:
        raise ValueError("labels must be 0/1 (for a multiclass task, pass labels == c for one class c).")
    g1, g0 = y == 1, y == 0
    if g1.sum() < 2 or g0.sum() < 2:
        raise ValueError("each class needs at least 2 rows to be tested.")
    d = x.shape[1]
    stat, pval, eff = np.zeros(d), np.ones(d), np.zeros(d)
    for start in range(0, d, block):
        cols = slice(start, min(start + block, d))
        x1, x0 = x[g1, cols], x[g0, cols]
        varying = (x[:, cols].max(0) > x[:, cols].min(0))
        if not varying.any():
            continue
        if test == "welch":
            r = stats.ttest_ind(x1[:, varying], x0[:, varying], axis=0, equal_var=False)
        else:
            r = stats.mannwhitneyu(x1[:, varying], x0[:, varying], axis=0, alternative="two-sided")
        s, p = np.asarray(r.statistic, np.float64), np.asarray(r.pvalue, np.float64)
        # a latent constant within each class but different between them: Welch's t is infinite,
        # scipy's p is NaN for zero variance; the difference is certain, so p = 0.
        p = np.where(np.isnan(p), 0.0, p)
        idx = np.arange(cols.start, cols.stop)[varying]
        stat[idx], pval[idx] = s, p
        eff[cols] = cohens_d(x1, x0)
    p_t = torch.from_numpy(pval)
    adj = holm(p_t) if correction == "holm" else benjamini_hochberg(p_t)
    return LatentTests(torch.from_numpy(stat), p_t, adj, torch.from_numpy(eff), adj <= alpha,
                       test, correction, float(alpha))
