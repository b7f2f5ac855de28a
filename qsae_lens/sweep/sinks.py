"""The attention-sink rule, defined once.

A few ordinary tokens become attention sinks whose residual norm is ~100x the median (on SmolLM2
layer 16, 13 of 24,380 cached vectors reach ~18,500 against a median of ~184). One of them in a
batch decides its normalised MSE, and one in an evaluation decides explained variance and CKA.
The rule: **a vector is a sink when its norm exceeds ``max_norm_ratio`` x the median norm of the
training vectors at that precision and hook** (special tokens are excluded before, by the caches).

Which limit applies where:

* **training**: each precision's SAEs train without the sinks of *that precision's* training cache
  (its own median);
* **scoring** (transfer matrix, comparisons' activation metrics): the *baseline's* limit is applied
  to the *baseline's* activations, and the positions it drops are dropped for every model and SAE,
  so every cell of a table is scored on the same tokens.
"""

from __future__ import annotations

import torch


def sink_norm_limit(x: torch.Tensor, max_norm_ratio: float | None) -> float | None:
    """The norm above which a row of ``x`` Tensor[n, d] is an attention sink; None when the rule is off."""
    if max_norm_ratio is None or x.shape[0] == 0:
        return None
    return float(max_norm_ratio) * float(x.norm(dim=-1).median())


def non_sink_rows(x: torch.Tensor, limit: float | None) -> torch.Tensor:
    """Tensor[n] bool: rows of ``x`` Tensor[n, d] kept under ``limit`` (all when None)."""
    if limit is None:
        return torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    return x.norm(dim=-1) <= limit
