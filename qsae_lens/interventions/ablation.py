"""Ablation of SAE latents (through the spliced SAE, error term kept) or of a direction, and its cost.

``ablate`` replaces chosen latents' activations by zero, their mean, or values resampled from a
pool of codes (means and pools come from a given activation cache ``Tensor[n, d_model]``), and
keeps the SAE's error term so that only the chosen latents change. ``ablate_direction`` projects a
direction out of the activation (or sets its coefficient to the cache mean). ``intervention_effect``
measures any intervention's cost: change of next-token CE and KL from the clean model over a token
set, each with a bootstrap CI over sequences.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager as ContextManager
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from qsae_lens.compare.stats import Estimate, bootstrap_ci
from qsae_lens.interventions.steering import _check_hook, sae_hook_name, splice


@contextlib.contextmanager
def ablate(model: Any, sae: Any, latents: Tensor | list[int] | int | None, *,
           mode: Literal["zero", "mean", "resample"] = "zero", cache: Tensor | None = None,
           hook_name: str | None = None, seed: int = 0) -> Iterator[None]:
    """While active, splice ``sae`` at its hook keeping the error term, with ``latents`` (None = all)
    set to zero, to their mean over ``cache`` (``Tensor[n, d_model]`` activations at that hook), or
    to codes of random ``cache`` rows (one row per position, drawn with ``seed``)."""
    name = sae_hook_name(sae, hook_name)
    _check_hook(model, name)
    idx = (torch.arange(sae.cfg.d_sae) if latents is None
           else torch.as_tensor(latents, dtype=torch.long).reshape(-1))
    if mode not in ("zero", "mean", "resample"):
        raise ValueError(f"mode must be 'zero', 'mean' or 'resample'; got {mode!r}.")
    pool = None
    if mode != "zero":
        if cache is None:
            raise ValueError(f"mode={mode!r} needs cache=Tensor[n, d_model] activations at {name} to take values from.")
        with torch.no_grad():
            pool = torch.cat([sae.encode(c.to(sae.W_dec.dtype))[:, idx] for c in cache.split(4096)])
    mean = None if pool is None else pool.mean(0)
    gen = torch.Generator().manual_seed(seed)

    def edit(codes: Tensor) -> Tensor:
        out = codes.clone()
        if mode == "zero":
            out[..., idx] = 0.0
        elif mode == "mean":
            out[..., idx] = mean.to(out.dtype)  # type: ignore[union-attr]
        else:
            rows = torch.randint(0, pool.shape[0], codes.shape[:-1], generator=gen)  # type: ignore[union-attr]
            out[..., idx] = pool[rows].to(out.dtype)  # type: ignore[index]
        return out

    def hook(act: Tensor, hook: Any) -> Tensor:  # noqa: ARG001
        with torch.no_grad():
            return splice(sae, act, edit)

    with model.hooks(fwd_hooks=[(name, hook)]):
        yield


@contextlib.contextmanager
def ablate_direction(model: Any, direction: Tensor, *, hook_name: str, mode: Literal["zero", "mean"] = "zero",
                     cache: Tensor | None = None) -> Iterator[None]:
    """While active, remove ``direction`` (``Tensor[d_model]``, normalized here) from the activation at
    ``hook_name``: ``x - (x.u) u``, or with "mean" ``x - (x.u - m) u`` where ``m`` is the mean of
    ``x.u`` over ``cache`` (``Tensor[n, d_model]``)."""
    _check_hook(model, hook_name)
    u = torch.as_tensor(direction).detach().float()
    if u.ndim != 1 or u.shape[0] != model.cfg.d_model or float(u.norm()) == 0.0:
        raise ValueError(f"direction must be a nonzero Tensor[d_model={model.cfg.d_model}].")
    u = u / u.norm()
    if mode == "mean":
        if cache is None:
            raise ValueError("mode='mean' needs cache=Tensor[n, d_model] activations at the hook.")
        m = float((cache.float() @ u).mean())
    elif mode == "zero":
        m = 0.0
    else:
        raise ValueError(f"mode must be 'zero' or 'mean'; got {mode!r}.")

    def hook(act: Tensor, hook: Any) -> Tensor:  # noqa: ARG001
        uu = u.to(act.device, torch.float32)
        coef = act.float() @ uu
        return (act.float() - (coef - m)[..., None] * uu).to(act.dtype)

    with model.hooks(fwd_hooks=[(hook_name, hook)]):
        yield


class InterventionEffect(NamedTuple):
    """Cost of an intervention over a token set (next-token CE and KL from the clean model)."""

    delta_ce: Estimate
    """Mean over sequences of (intervened - clean) mean next-token CE (nats/token), bootstrap CI."""
    kl: Estimate
    """Mean over sequences of the mean per-token KL(clean || intervened) (nats), bootstrap CI."""
    clean_ce: float
    """Mean clean next-token CE (nats/token)."""
    n_sequences: int

    def __repr__(self) -> str:
        d, k = self.delta_ce, self.kl
        return (f"InterventionEffect(delta_ce={d.value:+.4f} [{d.ci_low:+.4f}, {d.ci_high:+.4f}], "
                f"kl={k.value:.4f} [{k.ci_low:.4f}, {k.ci_high:.4f}], clean_ce={self.clean_ce:.3f}, "
                f"n={self.n_sequences})")


@torch.no_grad()
def intervention_effect(model: Any, tokens: Tensor, intervention: Callable[[], ContextManager[Any]], *,
                        n_resamples: int = 1000, seed: int = 0, batch_size: int = 4) -> InterventionEffect:
    """CE and KL cost of ``intervention`` (a no-argument callable returning a context manager, e.g.
    ``lambda: ablate(model, sae, [3])``) over ``tokens`` (``Tensor[n_seq, pos]``).

    Memory: the clean log-probs are kept per batch only (``batch_size * pos * d_vocab`` floats)."""
    from qsae_lens.metrics import kl_per_token, next_token_ce

    clean_ce, ce, kl = [], [], []
    for start in range(0, tokens.shape[0], batch_size):
        chunk = tokens[start:start + batch_size]
        clean = model(chunk).float().log_softmax(-1).cpu()
        with intervention():
            hit = model(chunk).float().log_softmax(-1).cpu()
        clean_ce.append(next_token_ce(clean, chunk.cpu()).mean(1))
        ce.append(next_token_ce(hit, chunk.cpu()).mean(1))
        kl.append(kl_per_token(clean, hit).mean(1))
    c0, c1, k = torch.cat(clean_ce), torch.cat(ce), torch.cat(kl)
    return InterventionEffect(bootstrap_ci((c1 - c0).double(), n_resamples=n_resamples, seed=seed),
                              bootstrap_ci(k.double().clamp_min(0), n_resamples=n_resamples, seed=seed),
                              float(c0.mean()), int(tokens.shape[0]))
