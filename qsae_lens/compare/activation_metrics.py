"""Activation-based comparison metrics: matched-latent correlation, explained variance, cross-reconstruction.

These need model activations of the same tokens for both SAEs. The module knows nothing of
SAELens objects except through ``sae_codes`` / ``iter_sae_codes`` (which only call ``sae.encode``);
cross-reconstruction takes plain ``encode`` / ``decode`` callables.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "ExplainedVarianceAccumulator",
    "PairCorrelationAccumulator",
    "cross_reconstruction_explained_variance",
    "explained_variance",
    "iter_sae_codes",
    "latent_activation_correlation",
    "sae_codes",
]


def _check_2d(t: Tensor, name: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch Tensor; got {type(t).__name__}.")
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D (Tensor[n, d]); got shape {tuple(t.shape)}.")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN/Inf.")


class PairCorrelationAccumulator:
    """Streaming Pearson correlation across tokens for matched latent pairs (rows[j] of a, cols[j] of b).

    Accumulates Σa, Σb, Σa², Σb², Σab per pair in float64 over batches of codes, so codes of
    millions of tokens never need to be in memory together. Memory: 5 × m float64.
    """

    def __init__(self, rows: Tensor, cols: Tensor) -> None:
        rows, cols = torch.as_tensor(rows), torch.as_tensor(cols)
        if rows.ndim != 1 or rows.shape != cols.shape:
            raise ValueError(f"rows and cols must be 1-D of equal length (one entry per pair); got {tuple(rows.shape)} and {tuple(cols.shape)}.")
        if rows.is_floating_point() or cols.is_floating_point():
            raise TypeError("rows and cols must be integer latent indices.")
        self.rows, self.cols = rows.to(torch.int64), cols.to(torch.int64)
        m = rows.numel()
        self.n = 0
        self._shift: tuple[Tensor, Tensor] | None = None
        self._sums = torch.zeros(5, m, dtype=torch.float64)  # Σa, Σb, Σa², Σb², Σab

    def update(self, codes_a: Tensor, codes_b: Tensor) -> None:
        """Add a batch: codes_a Tensor[b, d_sae_a], codes_b Tensor[b, d_sae_b] for the same b tokens."""
        _check_2d(codes_a, "codes_a")
        _check_2d(codes_b, "codes_b")
        if codes_a.shape[0] != codes_b.shape[0]:
            raise ValueError(f"codes_a and codes_b must cover the same tokens; got {codes_a.shape[0]} and {codes_b.shape[0]} rows.")
        if self.rows.numel() and (
            self.rows.min() < 0 or self.rows.max() >= codes_a.shape[1] or self.cols.min() < 0 or self.cols.max() >= codes_b.shape[1]
        ):
            raise IndexError(f"rows/cols out of range for d_sae_a={codes_a.shape[1]}, d_sae_b={codes_b.shape[1]}.")
        a = codes_a.detach()[:, self.rows.to(codes_a.device)].to("cpu", torch.float64)
        b = codes_b.detach()[:, self.cols.to(codes_b.device)].to("cpu", torch.float64)
        if a.shape[0] == 0:
            return
        if self._shift is None:
            # A per-pair shift (the first batch's mean) keeps Σa² - n·mean² away from cancellation.
            self._shift = (a.mean(0), b.mean(0))
        a = a - self._shift[0]
        b = b - self._shift[1]
        self._sums += torch.stack([a.sum(0), b.sum(0), (a * a).sum(0), (b * b).sum(0), (a * b).sum(0)])
        self.n += a.shape[0]

    def compute(self, *, constant: float = float("nan")) -> Tensor:
        """Pearson r of each pair, Tensor[m] float64. Pairs where either latent is constant over the
        tokens (e.g. dead: always 0) have no defined correlation and get ``constant`` (default NaN;
        average with ``torch.nanmean`` and report how many were NaN)."""
        if self.n < 2:
            raise ValueError(f"a correlation needs at least 2 tokens; got {self.n}.")
        sa, sb, saa, sbb, sab = self._sums
        n = self.n
        cov = sab - sa * sb / n
        var_a = (saa - sa * sa / n).clamp_(min=0)
        var_b = (sbb - sb * sb / n).clamp_(min=0)
        denom = (var_a * var_b).sqrt()
        # Relative tolerance: variance that is rounding noise of the sums counts as constant.
        tiny = 1e-12 * (saa.abs() + sbb.abs() + 1e-300)
        ok = (var_a > tiny) & (var_b > tiny)
        r = torch.full_like(cov, constant)
        r[ok] = (cov[ok] / denom[ok]).clamp_(-1.0, 1.0)
        return r


def latent_activation_correlation(
    codes_a: Tensor, codes_b: Tensor, rows: Tensor, cols: Tensor, *, constant: float = float("nan")
) -> Tensor:
    """Pearson correlation across tokens of matched latents: Tensor[m] float64.

    codes_a Tensor[n, d_sae_a], codes_b Tensor[n, d_sae_b] (SAE codes of the same n tokens),
    rows/cols Tensor[m] int: pair j is latent rows[j] of a with latent cols[j] of b (e.g. from a
    one-to-one matching). Why correlation and not cosine of decoders: two latents can point the same
    way yet fire on different tokens. Constant latents (dead on these tokens) → ``constant`` (NaN).
    For codes that do not fit in memory use ``PairCorrelationAccumulator``.
    """
    acc = PairCorrelationAccumulator(rows, cols)
    acc.update(codes_a, codes_b)
    return acc.compute(constant=constant)


class ExplainedVarianceAccumulator:
    """Streaming explained variance, the definition of SAELens's ``run_evals`` ("explained_variance").

    1 - E||x - x̂||² / (E||x||² - ||E x||²), sums in float64; like SAELens's
    ``ExplainedVarianceCalculator``, returns 1.0 (perfect) or 0.0 when the total variance is < 1e-10.
    Re-implemented (rather than imported) so ``compare`` does not pay ``import sae_lens`` (~14 s);
    the tests check it against SAELens's class.
    """

    def __init__(self) -> None:
        self.n = 0
        self.sum_x: Tensor | None = None
        self.sum_sq_norm = 0.0
        self.sum_sq_resid = 0.0

    def update(self, x: Tensor, x_hat: Tensor) -> None:
        """Add a batch: x, x_hat Tensor[b, d]."""
        _check_2d(x, "x")
        _check_2d(x_hat, "x_hat")
        if x.shape != x_hat.shape:
            raise ValueError(f"x and x_hat must have the same shape; got {tuple(x.shape)} and {tuple(x_hat.shape)}.")
        x64 = x.detach().to("cpu", torch.float64)
        xh64 = x_hat.detach().to("cpu", torch.float64)
        s = x64.sum(0)
        self.sum_x = s if self.sum_x is None else self.sum_x + s
        self.sum_sq_norm += float((x64 * x64).sum())
        self.sum_sq_resid += float(((x64 - xh64) ** 2).sum())
        self.n += x.shape[0]

    def compute(self) -> float:
        if self.n == 0 or self.sum_x is None:
            raise ValueError("explained variance needs at least one token.")
        mean = self.sum_x / self.n
        total_var = self.sum_sq_norm / self.n - float(mean @ mean)
        mse = self.sum_sq_resid / self.n
        if total_var < 1e-10:
            return 1.0 if mse < 1e-10 else 0.0
        return 1.0 - mse / total_var


def explained_variance(x: Tensor, x_hat: Tensor) -> float:
    """1 - Σ||x - x̂||² / Σ||x - mean(x)||² over tokens, x and x_hat Tensor[n, d] (SAELens's definition)."""
    acc = ExplainedVarianceAccumulator()
    acc.update(x, x_hat)
    return acc.compute()


def cross_reconstruction_explained_variance(
    encode: Callable[[Tensor], Tensor],
    decode: Callable[[Tensor], Tensor],
    x: Tensor,
    *,
    rotation: Tensor | None = None,
    batch_size: int = 4096,
) -> float:
    """Explained variance of one SAE (``encode``/``decode``) reconstructing other activations x Tensor[n, d].

    E.g. SAE a (bf16) on the nf4 model's activations: how much of the quantized model's residual
    stream a's dictionary still explains. ``rotation`` Tensor[d, d] (orthogonal) maps x into the
    SAE's model space first: the SAE sees ``x @ rotation`` and is scored there (for an orthogonal
    map this equals scoring ``x̂ @ rotation.T`` against x). With an alignment rotation R fitted as
    ``W_dec_a @ R ≈ W_dec_b`` (a's directions into b's space), apply SAE a to b's activations with
    ``rotation=R.T``. Streams in ``batch_size`` rows under ``torch.no_grad``; inputs are cast to
    the SAE's input dtype by the callables themselves.
    """
    _check_2d(x, "x")
    d = x.shape[1]
    if rotation is not None:
        if rotation.shape != (d, d):
            raise ValueError(f"rotation must be Tensor[{d}, {d}] (x has d={d}); got {tuple(rotation.shape)}.")
        eye = torch.eye(d, dtype=torch.float64)
        err = float((rotation.detach().to("cpu", torch.float64).T @ rotation.detach().to("cpu", torch.float64) - eye).abs().max())
        if err > 1e-3:
            raise ValueError(f"rotation is not orthogonal (max |RᵀR - I| = {err:.2g}); pass an orthogonal Procrustes map.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}.")
    acc = ExplainedVarianceAccumulator()
    with torch.no_grad():
        for start in range(0, x.shape[0], batch_size):
            xb = x[start : start + batch_size]
            if rotation is not None:
                xb = xb @ rotation.to(device=xb.device, dtype=xb.dtype)
            x_hat = decode(encode(xb))
            if x_hat.shape != xb.shape:
                raise ValueError(f"decode(encode(x)) returned shape {tuple(x_hat.shape)} for input {tuple(xb.shape)}.")
            acc.update(xb, x_hat)
    return acc.compute()


def iter_sae_codes(sae: Any, x: Tensor, batch_size: int = 4096) -> Iterator[Tensor]:
    """Yield ``sae.encode`` of x (Tensor[n, d_in]) in batches of Tensor[b, d_sae], under no_grad.

    Batches are moved to the SAE's device and dtype when it has them (SAELens SAEs do).
    """
    _check_2d(x, "x")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}.")
    device = getattr(sae, "device", None)
    dtype = getattr(sae, "dtype", None)
    with torch.no_grad():
        for start in range(0, x.shape[0], batch_size):
            xb = x[start : start + batch_size]
            if device is not None or dtype is not None:
                xb = xb.to(device=device, dtype=dtype if isinstance(dtype, torch.dtype) else None)
            yield sae.encode(xb)


def sae_codes(sae: Any, x: Tensor, batch_size: int = 4096) -> Tensor:
    """All codes ``sae.encode(x)``, Tensor[n, d_sae] (memory n × d_sae: stream with
    ``iter_sae_codes`` when that is too large)."""
    return torch.cat(list(iter_sae_codes(sae, x, batch_size)), dim=0)
