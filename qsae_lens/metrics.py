"""The one definition of the reconstruction and next-token metrics shared by ``evals`` and ``compare``.

* :class:`ExplainedVariance`: streaming explained variance with **SAELens's definition** (the
  ``"explained_variance"`` of ``sae_lens.evals.run_evals``, its ``ExplainedVarianceCalculator``)::

      EV = 1 - E||x - x_hat||^2 / (E||x||^2 - ||E x||^2)

  i.e. 1 - sum of squared residuals / total sum of squares about the mean, summed over all
  dimensions and rows (not a per-dimension or per-token average). Sums are float64 on the CPU:
  the total variance is a difference of two large, nearly equal numbers. Edge cases, decided here
  once: **no rows** -> ``compute()`` raises ValueError (there is nothing to score; callers that
  may legitimately see none check ``n`` first); **zero total variance** (< 1e-10) -> 1.0 when the
  residual is also < 1e-10 else 0.0, as SAELens does.
  Re-implemented rather than imported so that ``compare`` and ``evals`` do not pay
  ``import sae_lens`` (~14 s); ``tests/test_evals.py`` checks it against SAELens's class.
* :func:`next_token_ce` and :func:`kl_per_token`: per-position cross-entropy and KL divergence
  from log-probabilities, the building blocks of the transfer matrix's CE/KL numbers.
"""

from __future__ import annotations

import torch
from torch import Tensor

_ZERO_VARIANCE = 1e-10


def explained_variance_from_sums(n: Tensor | float, sum_x: Tensor, sum_sq_norm: Tensor | float,
                                 sum_sq_resid: Tensor | float) -> Tensor:
    """EV from the four running sums; every argument may carry the same leading batch shape ``[*b]``.

    ``n`` rows, ``sum_x`` Tensor[*b, d] (sum of rows), ``sum_sq_norm`` (sum of ||x||^2),
    ``sum_sq_resid`` (sum of ||x - x_hat||^2). Vectorised so a bootstrap over windows computes all
    its resamples at once. Returns Tensor[*b] float64 (NaN where n == 0).
    """
    n = torch.as_tensor(n, dtype=torch.float64)
    sum_x = torch.as_tensor(sum_x, dtype=torch.float64)
    sum_sq_norm = torch.as_tensor(sum_sq_norm, dtype=torch.float64)
    sum_sq_resid = torch.as_tensor(sum_sq_resid, dtype=torch.float64)
    safe_n = n.clamp_min(1)
    mean = sum_x / safe_n[..., None]
    total_var = sum_sq_norm / safe_n - (mean * mean).sum(-1)
    mse = sum_sq_resid / safe_n
    ev = 1.0 - mse / total_var.where(total_var >= _ZERO_VARIANCE, torch.ones_like(total_var))
    flat = (mse < _ZERO_VARIANCE).to(torch.float64)
    ev = ev.where(total_var >= _ZERO_VARIANCE, flat)
    return ev.where(n > 0, torch.full_like(ev, float("nan")))


class ExplainedVariance:
    """Streaming explained variance over batches of rows (SAELens's definition; see the module doc).

    ``ev = ExplainedVariance(); ev.update(x, x_hat, mask); ev.compute()``. Memory: one float64
    vector of length d plus three scalars, whatever the number of rows.
    """

    def __init__(self) -> None:
        self.n = 0
        self.sum_x: Tensor | None = None
        """Tensor[d] float64: sum of the rows seen."""
        self.sum_sq_norm = 0.0
        self.sum_sq_resid = 0.0

    def update(self, x: Tensor, x_hat: Tensor, mask: Tensor | None = None) -> ExplainedVariance:
        """Add rows: ``x``, ``x_hat`` Tensor[n, d]; ``mask`` Tensor[n] bool keeps only those rows."""
        if x.ndim != 2 or x.shape != x_hat.shape:
            raise ValueError(f"x and x_hat must both be [n, d] of one shape; got {tuple(x.shape)} and "
                             f"{tuple(x_hat.shape)}.")
        if mask is not None:
            if mask.shape != x.shape[:1]:
                raise ValueError(f"mask must be [n]={tuple(x.shape[:1])}, got {tuple(mask.shape)}.")
            mask = mask.to(x.device, torch.bool)
            x, x_hat = x[mask], x_hat[mask]
        x64 = x.detach().to("cpu", torch.float64)
        r64 = x64 - x_hat.detach().to("cpu", torch.float64)
        s = x64.sum(0)
        self.sum_x = s if self.sum_x is None else self.sum_x + s
        self.sum_sq_norm += float((x64 * x64).sum())
        self.sum_sq_resid += float((r64 * r64).sum())
        self.n += int(x.shape[0])
        return self

    def merge(self, other: ExplainedVariance) -> ExplainedVariance:
        """Add another accumulator's rows (e.g. per-window accumulators into a total)."""
        if other.sum_x is not None:
            self.sum_x = other.sum_x.clone() if self.sum_x is None else self.sum_x + other.sum_x
        self.sum_sq_norm += other.sum_sq_norm
        self.sum_sq_resid += other.sum_sq_resid
        self.n += other.n
        return self

    def compute(self) -> float:
        """The explained variance of all rows added (ValueError when none were)."""
        if self.n == 0 or self.sum_x is None:
            raise ValueError("explained variance needs at least one row; none were added.")
        return float(explained_variance_from_sums(self.n, self.sum_x, self.sum_sq_norm, self.sum_sq_resid))

    def __repr__(self) -> str:
        value = f"{self.compute():.4f}" if self.n else "n/a"
        return f"ExplainedVariance(n={self.n}, value={value})"


def explained_variance(x: Tensor, x_hat: Tensor, mask: Tensor | None = None) -> float:
    """One-shot EV of ``x_hat`` against ``x`` (Tensor[n, d]); see :class:`ExplainedVariance`."""
    return ExplainedVariance().update(x, x_hat, mask).compute()


def next_token_ce(logp: Tensor, tokens: Tensor) -> Tensor:
    """Per-position CE Tensor[b, t-1] (nats) of predicting ``tokens[:, 1:]`` from ``logp[:, :-1]``.

    ``logp`` Tensor[b, t, vocab] log-probabilities, ``tokens`` LongTensor[b, t].
    """
    return -logp[:, :-1].gather(-1, tokens[:, 1:, None].to(logp.device)).squeeze(-1)


def kl_per_token(logp_ref: Tensor, logp: Tensor) -> Tensor:
    """Per-position KL(ref || other) Tensor[b, t-1] (nats) at the positions that predict a next token.

    Both Tensor[b, t, vocab] log-probabilities.
    """
    return (logp_ref[:, :-1].exp() * (logp_ref[:, :-1] - logp[:, :-1])).sum(-1)


__all__ = ["ExplainedVariance", "explained_variance", "explained_variance_from_sums", "kl_per_token",
           "next_token_ce"]
