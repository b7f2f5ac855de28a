"""Pieces shared by qsae_lens's SAE architectures: seeded initialisation, the decoder-bias
initialisation from data (mean / geometric median), unit-norm decoder rows (gradient projection on
the tensor, renormalisation hooked on the optimizer that trains it, nothing process-wide), the SAE
provenance keys and precision metadata on SAELens configs, and wandb logging that is off unless
asked (one real run per training job when it is).

Nothing here imports SAELens at module level except where a SAELens type is returned, so the
architectures' files stay the only heavy imports of ``qsae_lens.training``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import netrc
import os
import weakref
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Literal

import torch

from qsae_lens.precision import PRECISION_METADATA_KEYS as _MODEL_PRECISION_KEYS

if TYPE_CHECKING:
    from sae_lens import LoggingConfig
    from sae_lens.saes.sae import SAE, SAEConfig

#: The SAE provenance keys (DEVELOPERS.md): how the model that produced the SAE's activations was run
#: (``qsae_lens.precision.PRECISION_METADATA_KEYS``) plus the SAE's ``init_seed``. The one definition,
#: used by training (written into ``cfg.metadata``) and by the hub (model card, published cfg.json).
SAE_PROVENANCE_KEYS: tuple[str, ...] = (*_MODEL_PRECISION_KEYS, "init_seed")
#: The name this tuple had before; the same object.
PRECISION_METADATA_KEYS = SAE_PROVENANCE_KEYS

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


# SAELens's SAETrainer offers no SAE method between ``loss.backward()`` and ``optimizer.step()``,
# nor after the step. So: the projection is a gradient hook on W_dec (it runs when backward produces
# W_dec's gradient, before clipping and the step), and the renormalisation is a step post-hook on the
# optimizer that trains that SAE (``renormalize_after_steps``; ``UnitNormSAETrainer`` registers it on
# its own optimizer). Nothing is registered process-wide: another optimizer stepping the same tensor,
# or another SAE in the same process, is left alone. Under a trainer whose optimizer has no such hook
# (SAELens's plain SAETrainer inside LanguageModelSAETrainingRunner), the SAE renormalises its rows
# itself at the start of each training forward pass and before saving (see ``openai_topk``).
_UNIT_NORM_FLAG = "_qsae_unit_norm_rows"
_OPTIMIZER_FLAG = "_qsae_renormalized_after_step"


@torch.no_grad()
def renormalize_rows_(weight: torch.Tensor) -> None:
    """Divide each row of Tensor[d_sae, d_in] by its norm, in place."""
    weight.div_(weight.norm(dim=-1, keepdim=True).clamp_min(1e-12))


def keep_rows_unit_norm(weight: torch.nn.Parameter, *, renormalize_now: bool = True) -> None:
    """Mark ``weight``'s rows as unit-norm and keep its gradient tangent to the unit sphere.

    Renormalises now (unless told not to: a loaded checkpoint is left bit-exact) and projects the
    parallel gradient component out in a gradient hook on this tensor. The renormalisation after
    each step belongs to the optimizer that trains it: :func:`renormalize_after_steps`.
    Idempotent per parameter.
    """
    if renormalize_now and weight.device.type != "meta":
        renormalize_rows_(weight.data)
    if getattr(weight, _UNIT_NORM_FLAG, False):
        return
    # The flag lives on the Parameter object, so a replaced Parameter (load with assign=True)
    # is simply unflagged until this is called again.
    setattr(weight, _UNIT_NORM_FLAG, True)
    if weight.requires_grad:
        weight.register_hook(lambda grad: project_out_parallel(grad, weight.detach()))


def unit_norm_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters of ``module`` marked by :func:`keep_rows_unit_norm` (e.g. openai_topk's W_dec)."""
    return [p for p in module.parameters() if getattr(p, _UNIT_NORM_FLAG, False)]


def renormalized_by_optimizer(weight: torch.Tensor) -> bool:
    """True when some optimizer renormalises ``weight``'s rows after each of its steps."""
    return bool(getattr(weight, _OPTIMIZER_FLAG, False))


def renormalize_after_steps(
    optimizer: torch.optim.Optimizer, weights: list[torch.nn.Parameter]
) -> torch.utils.hooks.RemovableHandle:
    """After every step of ``optimizer`` (this instance only), renormalise the rows of ``weights``.

    Each weight must be one ``optimizer`` updates (else ValueError: the hook would never act on it).
    The hook holds weak references, so it keeps no SAE alive. Returns the handle (``.remove()``).
    """
    tracked = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [tuple(w.shape) for w in weights if id(w) not in tracked]
    if missing or not weights:
        raise ValueError(
            f"renormalize_after_steps needs parameters this optimizer updates; got {len(weights)} weight(s), "
            f"{len(missing)} not in the optimizer (shapes {missing})"
        )
    refs = [weakref.ref(w) for w in weights]

    def _renormalize(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for ref in refs:
            weight = ref()
            if weight is not None:
                renormalize_rows_(weight.data)

    handle = optimizer.register_step_post_hook(_renormalize)
    for weight in weights:
        setattr(weight, _OPTIMIZER_FLAG, True)
    return handle


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


def safe_logging_config(*, log_to_wandb: bool = False, **kwargs: Any) -> LoggingConfig:
    """SAELens ``LoggingConfig`` with wandb logging OFF unless asked (``log_to_wandb=True``).

    Credentials alone (``WANDB_API_KEY``, ``~/.netrc``) never switch logging on: SAELens's bare
    ``SAETrainer`` logs with ``wandb.log`` but starts no run, so logging switched on behind the
    user's back broke every training job ("You must call wandb.init() before wandb.log()").
    When asked, ``LanguageModelSAETrainingRunner`` starts the run itself; for
    :func:`qsae_lens.training.fit.train_sae_on_activations` pass ``wandb=WandbSettings(...)``.
    Nothing here changes ``os.environ``. Asking for logging with no credentials and no
    ``WANDB_MODE`` (offline/disabled) raises instead of leaving wandb to prompt for a login.
    ``kwargs`` go to LoggingConfig.
    """
    from sae_lens import LoggingConfig

    if log_to_wandb and os.environ.get("WANDB_MODE") == "disabled":
        log_to_wandb = False
    if log_to_wandb and not os.environ.get("WANDB_MODE") and not wandb_credentials_available():
        raise ValueError(
            "wandb logging was asked for but no wandb credentials were found: run `wandb login`, "
            "or set WANDB_MODE=offline to log locally (sync later with `wandb sync`)."
        )
    return LoggingConfig(log_to_wandb=log_to_wandb, **kwargs)


@dataclasses.dataclass(frozen=True)
class WandbSettings:
    """Ask for one wandb run per training job (``train_sae_on_activations(..., wandb=...)``).

    ``mode`` None means: ``$WANDB_MODE`` if set, else "online" with credentials and "offline"
    without (so a missing login never blocks on a prompt). ``dir`` None means wandb's own
    default (``$WANDB_DIR`` or the working directory).
    """

    project: str = "qsae_lens"
    name: str | None = None
    config: Mapping[str, Any] | None = None
    mode: Literal["online", "offline", "disabled"] | None = None
    dir: str | None = None
    log_frequency: int = 10

    def resolved_mode(self) -> str:
        """The mode the run will use (see the class docstring)."""
        if self.mode is not None:
            return self.mode
        env = os.environ.get("WANDB_MODE")
        if env:
            return "offline" if env == "dryrun" else env
        return "online" if wandb_credentials_available() else "offline"


@contextlib.contextmanager
def wandb_run(settings: WandbSettings | None) -> Iterator[Any]:
    """A wandb run for one training job: started with the settings' project/name/config/mode,
    finished with exit code 0 on success and 1 on failure (the error is re-raised). Yields the
    run, or None when ``settings`` is None (logging off: wandb is not imported, nothing is written).
    """
    if settings is None:
        yield None
        return
    import wandb

    saved_env = {k: v for k, v in os.environ.items() if k.startswith("WANDB_")}
    run = wandb.init(
        project=settings.project,
        name=settings.name,
        config=dict(settings.config or {}),
        mode=settings.resolved_mode(),
        dir=settings.dir,
        reinit="finish_previous",  # SAETrainer logs through the module-level wandb.log: this run
    )
    failed = True
    try:
        yield run
        failed = False
    finally:
        run.finish(exit_code=1 if failed else 0)
        # wandb.init starts a service process and publishes its socket in os.environ (WANDB_SERVICE)
        # for the rest of the process: stop it and put the WANDB_* variables back as they were.
        wandb.teardown(exit_code=1 if failed else 0)
        for key in [k for k in os.environ if k.startswith("WANDB_") and k not in saved_env]:
            del os.environ[key]
        os.environ.update(saved_env)
