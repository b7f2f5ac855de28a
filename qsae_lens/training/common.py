"""Pieces shared by qsae_lens's SAE architectures: seeded initialisation, the decoder-bias
initialisation from data (mean / geometric median), unit-norm decoder rows kept through any
optimizer, precision metadata on SAELens configs, and a wandb logging config that never blocks.

Nothing here imports SAELens at module level except where a SAELens type is returned, so the
architectures' files stay the only heavy imports of ``qsae_lens.training``.
"""

from __future__ import annotations

import netrc
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import torch

from qsae_lens.precision import PRECISION_METADATA_KEYS as _MODEL_PRECISION_KEYS

if TYPE_CHECKING:
    from sae_lens import LoggingConfig
    from sae_lens.saes.sae import SAE, SAEConfig

#: The exact metadata keys DEVELOPERS.md reserves for precision provenance on an SAE.
PRECISION_METADATA_KEYS: tuple[str, ...] = (*_MODEL_PRECISION_KEYS, "init_seed")

BDecInit = Literal["geometric_median", "mean", "zeros"]
B_DEC_INITS: tuple[str, ...] = ("geometric_median", "mean", "zeros")


# --------------------------------------------------------------------------- initialisation


def resolve_init_seed(init_seed: int | None) -> int:
    """The seed for an SAE's initial weights: the given one, or one drawn from torch's global RNG.

    SAELens's ``cfg.seed`` seeds data order but not the SAE's initial weights, so every
    qsae_lens architecture draws its weights from a local ``torch.Generator`` seeded here
    and records the seed (drawn or given) in its metadata.
    """
    if init_seed is None:
        return int(torch.randint(0, 2**31 - 1, (1,)).item())
    if not isinstance(init_seed, int) or isinstance(init_seed, bool) or init_seed < 0:
        raise ValueError(f"init_seed must be a non-negative int or None, got {init_seed!r}")
    return init_seed


def seeded_unit_rows(
    n_rows: int, n_cols: int, seed: int, *, dtype: torch.dtype, device: torch.device | str
) -> torch.Tensor:
    """Tensor[n_rows, n_cols] of rows drawn uniformly on the unit sphere, from a local generator.

    Drawn on CPU (so the same seed gives the same weights on every device), then moved.
    On the ``meta`` device (SAELens's loaders build the module there before assigning the
    saved weights) nothing is drawn.
    """
    if torch.device(device).type == "meta":
        return torch.empty(n_rows, n_cols, dtype=dtype, device="meta")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    rows = torch.randn(n_rows, n_cols, generator=generator, dtype=torch.float64)
    rows /= rows.norm(dim=-1, keepdim=True)
    return rows.to(dtype=dtype, device=device)


def geometric_median(
    points: torch.Tensor, *, max_iter: int = 200, tol: float = 1e-6, eps: float = 1e-8
) -> torch.Tensor:
    """Tensor[d]: the geometric median of ``points`` (Tensor[n, d]) by Weiszfeld's algorithm.

    The point minimising the summed Euclidean distance to the samples; OpenAI initialised b_dec
    with it because, unlike the mean, it is not dragged by the few huge-norm activations.
    Written here because torch/scipy have no geometric median; each iteration is one vectorised
    pass over all points (the loop runs over iterations, not points). Computed in float64.
    """
    if points.ndim != 2 or points.shape[0] == 0:
        raise ValueError(f"geometric_median needs a non-empty Tensor[n, d], got shape {tuple(points.shape)}")
    x = points.detach().to(torch.float64)
    median = x.mean(dim=0)
    for _ in range(max_iter):
        dist = (x - median).norm(dim=-1).clamp_min(eps)
        weights = 1.0 / dist
        new_median = (weights[:, None] * x).sum(dim=0) / weights.sum()
        shift = (new_median - median).norm()
        median = new_median
        if shift <= tol * (median.norm() + eps):
            break
    return median.to(points.dtype)


def b_dec_from_activations(activations: torch.Tensor, method: str) -> torch.Tensor:
    """Tensor[d]: the decoder-bias initialisation ``method`` computes from Tensor[n, d] activations."""
    if method == "geometric_median":
        return geometric_median(activations)
    if method == "mean":
        return activations.detach().to(torch.float64).mean(dim=0).to(activations.dtype)
    if method == "zeros":
        return torch.zeros(activations.shape[-1], dtype=activations.dtype, device=activations.device)
    raise ValueError(f"b_dec_init must be one of {B_DEC_INITS}, got {method!r}")


# --------------------------------------------------------------------------- unit-norm decoder rows


def project_out_parallel(grad: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """grad − (Σ_j W_ij g_ij) W_i for each row i: the gradient with its component along each
    (unit-norm) decoder row removed, so a step moves rows tangentially to the unit sphere.
    Shapes: grad, rows Tensor[d_sae, d_in]."""
    parallel = (grad * rows).sum(dim=-1, keepdim=True)
    return grad - parallel * rows


# SAELens's SAETrainer (and LanguageModelSAETrainingRunner around it) offers no SAE method between
# ``loss.backward()`` and ``optimizer.step()``, nor after the step. So: the projection is a gradient
# hook on W_dec (it runs when backward produces W_dec's gradient, before clipping and the step), and
# the renormalisation is a global optimizer post-step hook that acts only on parameters flagged
# here. Both work unchanged under SAETrainer, MultiSAETrainer or a hand-written loop.
_UNIT_NORM_FLAG = "_qsae_unit_norm_rows"
_STEP_HOOK_HANDLE: Any = None


@torch.no_grad()
def renormalize_rows_(weight: torch.Tensor) -> None:
    """Divide each row of Tensor[d_sae, d_in] by its norm, in place."""
    weight.div_(weight.norm(dim=-1, keepdim=True).clamp_min(1e-12))


def _renormalize_after_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    for group in optimizer.param_groups:
        for param in group["params"]:
            if getattr(param, _UNIT_NORM_FLAG, False):
                renormalize_rows_(param.data)


def keep_rows_unit_norm(weight: torch.nn.Parameter, *, renormalize_now: bool = True) -> None:
    """Keep the rows of ``weight`` unit-norm through training by any torch optimizer.

    Renormalises now (unless told not to: a loaded checkpoint is left bit-exact), projects the
    parallel gradient component out in a gradient hook, and renormalises after every optimizer
    step that updates ``weight``. Idempotent per parameter.
    """
    global _STEP_HOOK_HANDLE
    if _STEP_HOOK_HANDLE is None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _STEP_HOOK_HANDLE = register_optimizer_step_post_hook(_renormalize_after_step)
    if renormalize_now and weight.device.type != "meta":
        renormalize_rows_(weight.data)
    if getattr(weight, _UNIT_NORM_FLAG, False):
        return
    # The flag lives on the Parameter object, so a replaced Parameter (load with assign=True)
    # is simply unflagged until this is called again.
    setattr(weight, _UNIT_NORM_FLAG, True)
    if weight.requires_grad:
        weight.register_hook(lambda grad: project_out_parallel(grad, weight.detach()))


# --------------------------------------------------------------------------- metadata and logging


def _plain_json(value: Any, key: str) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain_json(v, key) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain_json(v, key) for k, v in value.items()}
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    raise TypeError(
        f"precision metadata {key!r} must be plain JSON (str/int/float/bool/None/list/dict), got "
        f"{type(value).__name__}: a SAELens cfg.json cannot hold it. Convert it to a string first."
    )


def attach_precision_metadata(sae_or_cfg: SAE[Any] | SAEConfig, metadata: Mapping[str, Any]) -> None:
    """Put precision provenance (``HookedQuantizedLM.precision_metadata`` and ``init_seed``) into
    the SAE's ``SAEMetadata``, where SAELens saves it in ``cfg.json``.

    Only the keys in ``PRECISION_METADATA_KEYS`` are taken (the model wrapper's dict also carries
    e.g. ``device``, which describes the run rather than the SAE); values must be plain JSON
    (a ``torch.dtype`` is converted to its name). Works on an SAE or on its config.
    """
    cfg = getattr(sae_or_cfg, "cfg", sae_or_cfg)
    target = getattr(cfg, "metadata", None)
    if target is None:
        raise TypeError(f"expected a SAELens SAE or SAEConfig, got {type(sae_or_cfg).__name__}")
    unknown = set(metadata) - set(PRECISION_METADATA_KEYS)
    for key in PRECISION_METADATA_KEYS:
        if key in metadata:
            target[key] = _plain_json(metadata[key], key)
    if unknown and not (set(metadata) & set(PRECISION_METADATA_KEYS)):
        raise ValueError(
            f"none of the precision metadata keys {PRECISION_METADATA_KEYS} found in {sorted(unknown)}"
        )


def wandb_credentials_available() -> bool:
    """True when wandb could authenticate: WANDB_API_KEY is set or ~/.netrc has api.wandb.ai."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc(os.environ.get("NETRC")).authenticators("api.wandb.ai")
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return bool(auth and auth[2])


def safe_logging_config(*, online: bool = False, **kwargs: Any) -> LoggingConfig:
    """SAELens ``LoggingConfig`` that never blocks on a login prompt or the network.

    Without wandb credentials (or with ``WANDB_MODE=disabled``) logging is off. With them it is
    on, and wandb runs offline (``WANDB_MODE=offline``; sync later with ``wandb sync``) unless
    ``online=True`` or WANDB_MODE is already set by the user. ``kwargs`` go to LoggingConfig.
    """
    from sae_lens import LoggingConfig

    if "log_to_wandb" in kwargs:
        raise TypeError(
            "safe_logging_config decides log_to_wandb itself; build LoggingConfig directly to force it"
        )
    if os.environ.get("WANDB_MODE") == "disabled" or not wandb_credentials_available():
        return LoggingConfig(log_to_wandb=False, **kwargs)
    if online:
        os.environ["WANDB_MODE"] = "online"
    else:
        os.environ.setdefault("WANDB_MODE", "offline")
    return LoggingConfig(log_to_wandb=True, **kwargs)
