"""Linear CKA between two sets of activations of the same tokens, in feature space and streamed.

Linear CKA (Kornblith et al. 2019) of centred X (Tensor[n, d1]) and Y (Tensor[n, d2]) is

    CKA = ||XᵀY||²_F / (||XᵀX||_F ||YᵀY||_F),

which equals the Gram-matrix form HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with K = XXᵀ, L = YYᵀ,
without ever building an n×n matrix: memory is O((d1 + d2)²) whatever the number of tokens.

The debiased variant replaces HSIC by the unbiased estimator of Song et al. (2012)

    HSIC_u = [tr(K̃L̃) + 1ᵀK̃1·1ᵀL̃1 / ((n-1)(n-2)) - 2/(n-2)·1ᵀK̃L̃1] / (n(n-3)),   K̃ = K - diag(K).

For centred X (K1 = 0) every term is a feature-space quantity: with k_i = ||x_i||², l_i = ||y_i||²,
tr(K̃L̃) = ||XᵀY||²_F - kᵀl, 1ᵀK̃1 = -Σk, 1ᵀK̃L̃1 = kᵀl, so

    n(n-3)·HSIC_u = ||XᵀY||²_F - n/(n-2)·kᵀl + Σk·Σl / ((n-1)(n-2))

(the form of Kornblith et al.'s reference code). ``CKAAccumulator`` streams minibatches: it keeps
XᵀY, XᵀX, YᵀY and the first/second moments needed to centre at the end, in float64, after
subtracting a fixed shift (the first batch's mean) to avoid cancellation when activations have a
large mean component. ``gram_linear_cka`` is the textbook n×n reference for tests and small data.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qsae_lens.compare.stats import PermutationResult, _permutation_p_value

__all__ = ["CKAAccumulator", "cka_permutation_null", "gram_linear_cka", "linear_cka"]

# Largest feature width for which CKAAccumulator's d×d float64 matrices are allowed (16,384² float64 =
# 2 GiB each). Past that, compute CKA on a token subsample with ``gram_linear_cka`` or reduce width.
MAX_FEATURE_DIM = 16_384


def _check_pair(x: Tensor, y: Tensor) -> None:
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise TypeError(f"x and y must be torch Tensors; got {type(x).__name__} and {type(y).__name__}.")
    if x.ndim != 2 or y.ndim != 2:
        raise ValueError(f"x and y must be 2-D (Tensor[n, d]); got shapes {tuple(x.shape)} and {tuple(y.shape)}.")
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"x and y must hold the same tokens (same number of rows); got {x.shape[0]} and {y.shape[0]} rows."
        )
    for name, t in (("x", x), ("y", y)):
        if t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"{name} must be real-valued; got dtype {t.dtype}.")
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} contains NaN/Inf; CKA is undefined. Drop or fix those rows first.")


class CKAAccumulator:
    """Streaming linear CKA over minibatches of paired activations (same tokens, same order).

    Why: activations of 10⁶ tokens do not fit in memory, and CKA needs centring by the *global*
    mean. Cross-products of shifted data are accumulated in float64; centring is applied
    algebraically in ``compute`` (XcᵀYc = XᵀY - n·μxμyᵀ). Memory: (d1 + d2)² float64.

    >>> acc = CKAAccumulator()
    >>> for xb, yb in batches: acc.update(xb, yb)      # Tensor[b, d1], Tensor[b, d2]
    >>> acc.compute(), acc.compute(debiased=True)
    """

    def __init__(self, *, shift_x: Tensor | None = None, shift_y: Tensor | None = None) -> None:
        """``shift_x`` (Tensor[d1]), ``shift_y`` (Tensor[d2]): a fixed point subtracted from every row
        before accumulating (CKA is translation-invariant). Default: the first batch's mean; pass the
        exact global means when known to make the final centring exact."""
        self.n = 0
        self._shift_x = None if shift_x is None else shift_x.detach().to("cpu", torch.float64)
        self._shift_y = None if shift_y is None else shift_y.detach().to("cpu", torch.float64)
        self._started = False

    def update(self, x: Tensor, y: Tensor) -> None:
        """Add a batch of paired rows: x Tensor[b, d1], y Tensor[b, d2] (any float dtype/device)."""
        _check_pair(x, y)
        x = x.detach().to("cpu", torch.float64)
        y = y.detach().to("cpu", torch.float64)
        if not self._started:
            for name, d in (("x", x.shape[1]), ("y", y.shape[1])):
                if d > MAX_FEATURE_DIM:
                    raise ValueError(
                        f"{name} has {d} features; feature-space CKA keeps d×d float64 matrices and is limited to "
                        f"{MAX_FEATURE_DIM}. Use gram_linear_cka on a token subsample instead."
                    )
            if x.shape[0] == 0:
                return
            if self._shift_x is None:
                self._shift_x = x.mean(0)
            if self._shift_y is None:
                self._shift_y = y.mean(0)
            if self._shift_x.shape != (x.shape[1],) or self._shift_y.shape != (y.shape[1],):
                raise ValueError("shift_x / shift_y must be Tensor[d1] / Tensor[d2] matching the batches' widths.")
            self._started = True
            d1, d2 = x.shape[1], y.shape[1]
            z = torch.zeros
            self.sx, self.sy = z(d1, dtype=torch.float64), z(d2, dtype=torch.float64)
            self.xty = z(d1, d2, dtype=torch.float64)
            self.xtx = z(d1, d1, dtype=torch.float64)
            self.yty = z(d2, d2, dtype=torch.float64)
            # moments of k_i = ||x_i||², l_i = ||y_i||² for the debiased estimator
            self.sk, self.sl = 0.0, 0.0
            self.skl, self.skk, self.sll = 0.0, 0.0, 0.0
            self.skx, self.sly = z(d1, dtype=torch.float64), z(d2, dtype=torch.float64)
            self.sky, self.slx = z(d2, dtype=torch.float64), z(d1, dtype=torch.float64)
        elif x.shape[1] != self._shift_x.numel() or y.shape[1] != self._shift_y.numel():
            raise ValueError(
                f"batch widths ({x.shape[1]}, {y.shape[1]}) differ from earlier batches "
                f"({self._shift_x.numel()}, {self._shift_y.numel()})."
            )
        x = x - self._shift_x
        y = y - self._shift_y
        k, ell = (x * x).sum(1), (y * y).sum(1)
        self.n += x.shape[0]
        self.sx += x.sum(0)
        self.sy += y.sum(0)
        self.xty += x.T @ y
        self.xtx += x.T @ x
        self.yty += y.T @ y
        self.sk += float(k.sum())
        self.sl += float(ell.sum())
        self.skl += float(k @ ell)
        self.skk += float(k @ k)
        self.sll += float(ell @ ell)
        self.skx += k @ x
        self.sly += ell @ y
        self.sky += k @ y
        self.slx += ell @ x

    def _stats(self, which: str) -> tuple[float, float, float, float]:
        """(||AcᵀBc||²_F, Σk_c, Σl_c, k_cᵀl_c) for the pair (A, B) = which ∈ {xy, xx, yy}."""
        n = self.n
        mx, my = self.sx / n, self.sy / n
        if which == "xy":
            a_mean, b_mean, ab = mx, my, self.xty
            sk, sl, skl, s_ka_b, s_kb_a = self.sk, self.sl, self.skl, self.sky, self.slx
        elif which == "xx":
            a_mean, b_mean, ab = mx, mx, self.xtx
            sk, sl, skl, s_ka_b, s_kb_a = self.sk, self.sk, self.skk, self.skx, self.skx
        else:
            a_mean, b_mean, ab = my, my, self.yty
            sk, sl, skl, s_ka_b, s_kb_a = self.sl, self.sl, self.sll, self.sly, self.sly
        cross = ab - n * torch.outer(a_mean, b_mean)
        fro2 = float((cross * cross).sum())
        ma2, mb2 = float(a_mean @ a_mean), float(b_mean @ b_mean)
        sum_a = a_mean * n  # Σ a_i
        sum_b = b_mean * n
        # Σ_i (k_i - 2a_iᵀμa + |μa|²)(l_i - 2b_iᵀμb + |μb|²), expanded into accumulated sums:
        ktl = (
            skl
            - 2 * float(s_ka_b @ b_mean)
            + mb2 * sk
            - 2 * float(s_kb_a @ a_mean)
            + 4 * float(a_mean @ ab @ b_mean)
            - 2 * mb2 * float(sum_a @ a_mean)
            + ma2 * sl
            - 2 * ma2 * float(sum_b @ b_mean)
            + n * ma2 * mb2
        )
        return fro2, sk - n * ma2, sl - n * mb2, ktl

    def compute(self, *, debiased: bool = False) -> float:
        """Linear CKA of everything added so far (float in [0, 1] for the biased form).

        ``debiased=True`` needs n >= 4 and may return slightly negative values for unrelated data
        (it is an unbiased estimate of a population quantity that is 0 there); it is NaN when the
        unbiased self-similarity of x or y is not positive (tiny n, degenerate data).
        """
        if self.n < 2:
            raise ValueError(f"CKA needs at least 2 tokens; got {self.n}.")
        if debiased and self.n < 4:
            raise ValueError(f"debiased CKA needs at least 4 tokens; got {self.n}.")
        vals = {}
        for which in ("xy", "xx", "yy"):
            fro2, sk, sl, ktl = self._stats(which)
            if debiased:
                n = self.n
                vals[which] = fro2 - n / (n - 2) * ktl + sk * sl / ((n - 1) * (n - 2))
            else:
                vals[which] = fro2
        denom_sq = vals["xx"] * vals["yy"]
        if not denom_sq > 0:
            if debiased:
                return float("nan")
            raise ValueError("x or y is constant across tokens (zero variance); CKA is undefined.")
        return vals["xy"] / denom_sq**0.5


def linear_cka(x: Tensor, y: Tensor, *, debiased: bool = False, batch_size: int = 8192) -> float:
    """Linear CKA of x (Tensor[n, d1]) and y (Tensor[n, d2]), rows = the same tokens.

    Feature-space form, streamed over ``batch_size`` rows, centred exactly (the mean is taken
    first, so no cancellation). Invariant to orthogonal transforms and isotropic scaling of
    either side; 1 for identical inputs; near 0 for independent data when n >> d (the biased form
    is inflated by about d/n at small n: prefer ``debiased=True`` there).
    """
    _check_pair(x, y)
    if x.shape[0] < 2:
        raise ValueError(f"CKA needs at least 2 tokens; got {x.shape[0]}.")
    mx = x.detach().to(torch.float64).mean(0).cpu()
    my = y.detach().to(torch.float64).mean(0).cpu()
    # Exact global centring up front: the accumulator's algebraic centring then only removes
    # rounding-level means, so no cancellation whatever the activations' mean component.
    acc = CKAAccumulator(shift_x=mx, shift_y=my)
    for start in range(0, x.shape[0], batch_size):
        acc.update(x[start : start + batch_size], y[start : start + batch_size])
    return acc.compute(debiased=debiased)


def gram_linear_cka(x: Tensor, y: Tensor, *, debiased: bool = False, max_n: int = 10_000) -> float:
    """Reference linear CKA through n×n Gram matrices (tests and small data only; O(n²) memory).

    Biased: HSIC(K, L) = tr(K H L H) with H = I - 11ᵀ/n. Debiased: Song et al.'s unbiased HSIC
    computed literally on the *uncentred* linear kernels K = XXᵀ, L = YYᵀ with zeroed diagonals,
    an independent route to the feature-space formula in ``linear_cka``.
    """
    _check_pair(x, y)
    n = x.shape[0]
    if n > max_n:
        raise ValueError(f"gram_linear_cka builds n×n matrices; n={n} > max_n={max_n}. Use linear_cka.")
    if n < (4 if debiased else 2):
        raise ValueError(f"{'debiased ' if debiased else ''}CKA needs more tokens; got {n}.")
    x = x.detach().to("cpu", torch.float64)
    y = y.detach().to("cpu", torch.float64)
    gram_x, gram_y = x @ x.T, y @ y.T

    def hsic(a: Tensor, b: Tensor) -> float:
        if not debiased:
            h = torch.eye(n, dtype=torch.float64) - 1.0 / n
            return float(torch.trace(a @ h @ b @ h))
        a = a - torch.diag(torch.diag(a))
        b = b - torch.diag(torch.diag(b))
        one = torch.ones(n, dtype=torch.float64)
        term = torch.trace(a @ b) + (one @ a @ one) * (one @ b @ one) / ((n - 1) * (n - 2))
        term = term - 2.0 / (n - 2) * (one @ a @ b @ one)
        return float(term / (n * (n - 3)))

    kk, ll = hsic(gram_x, gram_x), hsic(gram_y, gram_y)
    if not kk * ll > 0:
        return float("nan")
    return hsic(gram_x, gram_y) / (kk * ll) ** 0.5


def cka_permutation_null(
    x: Tensor,
    y: Tensor,
    n_permutations: int = 200,
    seed: int = 0,
    *,
    debiased: bool = False,
    max_elements: int = 1 << 24,
) -> PermutationResult:
    """CKA under random re-pairing of tokens: the chance level of ``linear_cka(x, y)``.

    x Tensor[n, d1], y Tensor[n, d2]. Shuffling the rows of y breaks the token correspondence and
    keeps each side's own structure, so the null distribution says how much CKA two unrelated
    representations of these shapes and spectra would show (the biased form is far from 0 when
    n is not >> d). Vectorised: ||XᵀX||, ||YᵀY||, Σk, Σl do not change under a permutation, so
    only XᵀP Y (and kᵀP l for the debiased form) is recomputed, for a chunk of permutations per
    batched matmul. p-value: (b + 1)/(m + 1) for "CKA at least as large as observed".
    """
    _check_pair(x, y)
    n = x.shape[0]
    if n < (4 if debiased else 2):
        raise ValueError(f"{'debiased ' if debiased else ''}CKA needs more tokens; got {n}.")
    if n_permutations < 1:
        raise ValueError(f"n_permutations must be >= 1; got {n_permutations}.")
    xc = x.detach().to("cpu", torch.float64)
    yc = y.detach().to("cpu", torch.float64)
    xc = xc - xc.mean(0)
    yc = yc - yc.mean(0)
    k, ell = (xc * xc).sum(1), (yc * yc).sum(1)
    sk, sl = float(k.sum()), float(ell.sum())

    def corrected(fro2: Tensor, ktl: Tensor, s_a: float, s_b: float) -> Tensor:
        if not debiased:
            return fro2
        return fro2 - n / (n - 2) * ktl + s_a * s_b / ((n - 1) * (n - 2))

    xx = corrected(((xc.T @ xc) ** 2).sum(), k @ k, sk, sk)
    yy = corrected(((yc.T @ yc) ** 2).sum(), ell @ ell, sl, sl)
    denom = float(xx * yy) ** 0.5 if float(xx * yy) > 0 else float("nan")
    observed = float(corrected(((xc.T @ yc) ** 2).sum(), k @ ell, sk, sl)) / denom

    gen = torch.Generator().manual_seed(seed)
    null = torch.empty(n_permutations, dtype=torch.float64)
    chunk = max(1, max_elements // (n * yc.shape[1] + xc.shape[1] * yc.shape[1]))
    for start in range(0, n_permutations, chunk):
        m = min(n_permutations, start + chunk) - start
        perms = torch.stack([torch.randperm(n, generator=gen) for _ in range(m)])  # [m, n]
        cross = torch.einsum("nd,mne->mde", xc, yc[perms])  # [m, d1, d2]
        fro2 = (cross * cross).sum(dim=(1, 2))
        ktl = ell[perms] @ k
        null[start : start + m] = corrected(fro2, ktl, sk, sl) / denom
    return PermutationResult(observed, null, _permutation_p_value(observed, null, "greater"))
