"""Steering: add a direction to a hook point, or set one SAE latent through the spliced SAE.

``steer`` adds ``strength * direction`` at ``hook_name``; ``steer_feature`` either adds a latent's
decoder row ("add") or splices the SAE and *clamps* the latent's activation while keeping the SAE's
error term ("clamp": ``x' = decode(f') + (x - decode(f))``), so a clamp that changes nothing leaves
the model exactly as it was, up to float round-off (the methodology's h_bias idea, written as a hook
so that it works on any precision). Both are context managers built on TransformerLens's
``hooks()`` context, so they nest with each other and with ``run_with_hooks``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch import Tensor

Positions = Literal["all", "prompt", "generated"] | slice


def position_mask(model: Any, n_pos: int, positions: Positions, device: torch.device) -> Tensor | None:
    """``Tensor[n_pos]`` bool of the positions (of the activation a hook sees now) to modify, or None for all.

    During ``generate`` the hook sees positions ``generation_offset ..`` of the (left-padded) sequence;
    "prompt" selects absolute positions ``< generation_prompt_len``, "generated" the rest, a slice
    absolute positions. Outside ``generate`` every position is a prompt position.
    """
    if positions == "all":
        return None
    offset = int(getattr(model, "generation_offset", 0) or 0)
    prompt_len = getattr(model, "generation_prompt_len", None)
    absolute = torch.arange(offset, offset + n_pos, device=device)
    if positions == "prompt":
        return absolute < prompt_len if prompt_len is not None else torch.ones(n_pos, dtype=torch.bool, device=device)
    if positions == "generated":
        return absolute >= prompt_len if prompt_len is not None else torch.zeros(n_pos, dtype=torch.bool, device=device)
    if isinstance(positions, slice):
        chosen = torch.zeros(offset + n_pos, dtype=torch.bool, device=device)
        chosen[positions] = True
        return chosen[offset:]
    raise ValueError(f"positions must be 'all', 'prompt', 'generated' or a slice; got {positions!r}.")


def _check_hook(model: Any, hook_name: str) -> None:
    if hook_name not in model.hook_dict:
        raise KeyError(f"Unknown hook name {hook_name!r}; valid names come from model.hook_dict / model.hook_names().")


@contextlib.contextmanager
def steer(model: Any, direction: Tensor, strength: float, *, hook_name: str,
          positions: Positions = "all") -> Iterator[None]:
    """While active, add ``strength * direction`` (``Tensor[d_model]``) to the activation at ``hook_name``.

    Why a context manager: the same steering then applies to ``forward``, ``run_with_cache`` and
    ``generate`` (prefix and every new token) and nests with other interventions.
    """
    _check_hook(model, hook_name)
    direction = torch.as_tensor(direction).detach()
    if direction.ndim != 1 or direction.shape[0] != model.cfg.d_model:
        raise ValueError(f"direction must be Tensor[d_model={model.cfg.d_model}]; got shape {tuple(direction.shape)}.")

    def hook(act: Tensor, hook: Any) -> Tensor:  # noqa: ARG001
        add = (float(strength) * direction).to(device=act.device, dtype=act.dtype)
        mask = position_mask(model, act.shape[1], positions, act.device)
        if mask is None:
            return act + add
        return act + mask[None, :, None].to(act.dtype) * add

    with model.hooks(fwd_hooks=[(hook_name, hook)]):
        yield


def sae_hook_name(sae: Any, hook_name: str | None) -> str:
    """The hook an SAE reads (``sae.cfg.metadata.hook_name``) unless one is given."""
    if hook_name is not None:
        return hook_name
    name = getattr(getattr(sae.cfg, "metadata", None), "hook_name", None)
    if not name:
        raise ValueError("The SAE's cfg.metadata.hook_name is not set: pass hook_name='blocks.L.hook_resid_post'.")
    return str(name)


def splice(sae: Any, act: Tensor, edit: Any) -> Tensor:
    """``decode(edit(f)) + (act - decode(f))`` with ``f = encode(act)``: the SAE spliced in with its
    error term kept, after ``edit`` changed the codes ``Tensor[..., d_sae]``. Returns ``act``'s shape/dtype."""
    x = act.to(sae.W_dec.dtype)
    codes = sae.encode(x)
    error = x - sae.decode(codes)
    return (sae.decode(edit(codes)) + error).to(act.dtype)


@torch.no_grad()
def typical_max_activation(model: Any, sae: Any, tokens: Tensor, latents: Tensor | list[int] | None = None, *,
                           hook_name: str | None = None, top: int = 10, batch_size: int = 8) -> Tensor:
    """``Tensor[n_latents]``: mean of each latent's ``top`` largest activations over ``tokens``
    (``Tensor[batch, pos]``, BOS/special positions excluded).

    Why the mean of the top few rather than the maximum: one outlier token would set the scale of
    every strength; the top-10 mean is the "typical max" steering strengths are quoted in.
    """
    name = sae_hook_name(sae, hook_name)
    layer = int(name.split(".")[1]) if name.startswith("blocks.") else None
    idx = None if latents is None else torch.as_tensor(latents, dtype=torch.long)
    special = torch.tensor(sorted(set(model.tokenizer.all_special_ids)), dtype=torch.long)
    best: Tensor | None = None
    for start in range(0, tokens.shape[0], batch_size):
        chunk = tokens[start:start + batch_size]
        _, cache = model.run_with_cache(chunk, names_filter=[name],
                                        stop_at_layer=None if layer is None else layer + 1)
        codes = sae.encode(cache[name].to(sae.W_dec.dtype))
        codes = codes if idx is None else codes[..., idx]
        keep = ~torch.isin(chunk.to(codes.device), special.to(codes.device))
        flat = codes[keep]  # [n_tokens, n_latents]
        merged = flat if best is None else torch.cat([best, flat])
        best = merged.topk(min(top, merged.shape[0]), dim=0).values
    if best is None:
        raise ValueError("tokens is empty: pass Tensor[batch, pos] with at least one non-special token.")
    return best.mean(0)


@contextlib.contextmanager
def steer_feature(model: Any, sae: Any, latent: int, strength: float, *, mode: Literal["add", "clamp"] = "add",
                  hook_name: str | None = None, positions: Positions = "all",
                  max_activation: float | None = None) -> Iterator[None]:
    """Steer along SAE latent ``latent``.

    "add": add ``strength * W_dec[latent]`` at the SAE's hook. "clamp": splice the SAE keeping its
    error term and set the latent's activation to ``strength``. With ``max_activation`` (e.g. from
    :func:`typical_max_activation`) ``strength`` is in units of it (1.0 = the typical max).
    """
    name = sae_hook_name(sae, hook_name)
    if not 0 <= latent < sae.cfg.d_sae:
        raise ValueError(f"latent must be in 0..{sae.cfg.d_sae - 1}; got {latent}.")
    value = float(strength) * (1.0 if max_activation is None else float(max_activation))
    if mode == "add":
        with steer(model, sae.W_dec[latent].detach(), value, hook_name=name, positions=positions):
            yield
        return
    if mode != "clamp":
        raise ValueError(f"mode must be 'add' or 'clamp'; got {mode!r}.")

    def set_latent(codes: Tensor) -> Tensor:
        out = codes.clone()
        out[..., latent] = value
        return out

    def hook(act: Tensor, hook: Any) -> Tensor:  # noqa: ARG001
        with torch.no_grad():
            edited = splice(sae, act, set_latent)
        mask = position_mask(model, act.shape[1], positions, act.device)
        return edited if mask is None else torch.where(mask[None, :, None], edited, act)

    with model.hooks(fwd_hooks=[(name, hook)]):
        yield
