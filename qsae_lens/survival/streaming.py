"""Bounded-memory per-latent accumulators: a running top-k, a uniform reservoir and a fixed-bin histogram.

All three consume ``codes: Tensor[b, d_sae]`` blocks with tensor ops only (no Python loop over
latents or tokens), so a pass over ``n`` tokens costs ``O(d_sae * (k + r + n_bins))`` memory
whatever ``n`` is. They are written by hand because torch, numpy and SAELens keep no *running*
per-column top-k or histogram; each update is a ``torch.topk`` / ``scatter_add_`` over one block.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["RunningTopK", "FixedBinHistogram", "HIST_EDGES"]

HIST_EDGES: Tensor = torch.logspace(-4, 4, 81)
"""Fixed log-spaced bin edges (1e-4 .. 1e4, 80 bins) of activation histograms: fixed, so one pass
suffices; positive activations below 1e-4 land in the first bin and above 1e4 in the last."""


class RunningTopK:
    """Per-latent top-k of a score over a stream of token blocks, with each entry's global row index.

    Memory: ``values``/``index`` are ``Tensor[d_sae, k]``; one update builds ``[d_sae, k + b]``
    (``b`` rows of the block), so peak extra memory is ``O(d_sae * (k + b))``. Ties keep the
    lower row index first (entries are concatenated in stream order and ``torch.topk`` is
    stable enough for the ties that matter; the equality test compares values, not indices).
    """

    def __init__(self, d_sae: int, k: int, *, device: str | torch.device = "cpu") -> None:
        self.k = int(k)
        self.values = torch.full((d_sae, self.k), -torch.inf, device=device)
        """Tensor[d_sae, k] float32: best scores per latent, descending (-inf where fewer than k)."""
        self.index = torch.full((d_sae, self.k), -1, dtype=torch.long, device=device)
        """Tensor[d_sae, k] int64: global row of each kept score (-1 where fewer than k)."""

    payload: Tensor | None = None
    """Tensor[d_sae, k] float32 carried along with each kept entry (e.g. the activation when the score
    is a random key: a uniform reservoir sample), when updates pass ``payload``."""

    def update(self, scores: Tensor, row0: int, *, keep: Tensor | None = None,
               payload: Tensor | None = None) -> None:
        """Merge a block ``scores: Tensor[b, d_sae]`` whose rows are global rows ``row0 .. row0+b-1``.

        ``keep: Tensor[b, d_sae]`` bool (optional): entries that may enter (others are -inf).
        ``payload: Tensor[b, d_sae]`` (optional): values carried with the kept entries.
        """
        b = scores.shape[0]
        s = scores.float().T  # [d_sae, b]
        if keep is not None:
            s = s.masked_fill(~keep.T, -torch.inf)
        rows = torch.arange(row0, row0 + b, device=s.device).expand_as(s)
        vals = torch.cat([self.values, s], dim=1)
        idx = torch.cat([self.index, rows], dim=1)
        top = vals.topk(min(self.k, vals.shape[1]), dim=1)
        self.values = top.values
        self.index = idx.gather(1, top.indices)
        if payload is not None:
            old = self.payload if self.payload is not None else torch.zeros_like(self.values)
            self.payload = torch.cat([old, payload.float().T], dim=1).gather(1, top.indices)
        self.index = self.index.masked_fill(self.values == -torch.inf, -1)


class FixedBinHistogram:
    """Per-latent histogram of positive activations over :data:`HIST_EDGES` (fixed log-spaced bins).

    Memory ``Tensor[d_sae, n_bins]`` int64; an update touches only the firing entries of a block.
    """

    def __init__(self, d_sae: int, edges: Tensor = HIST_EDGES, *, device: str | torch.device = "cpu") -> None:
        self.edges = edges.to(device)
        self.n_bins = len(edges) - 1
        self.counts = torch.zeros((d_sae, self.n_bins), dtype=torch.long, device=device)
        """Tensor[d_sae, n_bins] int64: firing counts per bin."""

    def update(self, codes: Tensor) -> None:
        """Add the positive entries of ``codes: Tensor[b, d_sae]``."""
        rows, lat = (codes > 0).nonzero(as_tuple=True)
        if lat.numel() == 0:
            return
        v = codes[rows, lat].float()
        b = (torch.bucketize(v, self.edges) - 1).clamp_(0, self.n_bins - 1)
        self.counts.view(-1).scatter_add_(0, lat * self.n_bins + b, torch.ones_like(b))
