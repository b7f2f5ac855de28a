"""``compare_saes``: load two SAEs, validate them, compose the metric functions of
``qsae_lens.compare`` and return a :class:`~qsae_lens.compare.report.ComparisonReport`.

This module only composes: every number comes from a plain function over tensors in
``alignment``, ``nulls``, ``stats``, ``cka``, ``categories`` or ``activation_metrics``.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Union

import torch
from torch import Tensor

from qsae_lens.compare.report import ComparisonReport, MetricResult
from qsae_lens.precision import PRECISION_METADATA_KEYS

if TYPE_CHECKING:
    from sae_lens import SAE

SAESpec = Union["SAE", str, os.PathLike, tuple[str, str]]
"""An SAE, a local SAELens checkpoint folder, a hub id ``"release/sae_id"`` / ``"owner/repo/sae_id"``,
or a ``(release_or_repo, sae_id)`` tuple."""

ActivationsSpec = Union[tuple[Tensor, Tensor], tuple[Union[str, os.PathLike], Union[str, os.PathLike]]]
"""``(x_a, x_b)``: Tensor[n, d_in] at a's and b's sources for the same n tokens, or two folders of
cached activations (``qsae_lens.activations.cache_activations``)."""

# cfg.metadata keys under which qsae_lens records the precision an SAE was trained at (DEVELOPERS.md)
PRECISION_KEYS = PRECISION_METADATA_KEYS
MATCH_THRESHOLDS = (0.5, 0.7, 0.9)
MIN_CATEGORY_TOKENS = 100_000
"""Fewer held-out tokens than this: latent categories come from the training sparsity files when present."""
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
_SAE_FILES = ("cfg.json", "sae_weights.safetensors")


@dataclass
class LoadedSAE:
    """An SAE with where it came from and, when its checkpoint has one, its firing-frequency file."""

    sae: SAE
    """The SAELens SAE (on CPU, float32 weights are read from it)."""
    source: str
    """Folder, hub id or ``"<in-memory ClassName>"``: used in messages and the report."""
    sparsity_path: Path | None = None
    """``sparsity.safetensors`` beside a local checkpoint (log10 firing frequency per latent)."""
    log_sparsity: Tensor | None = None
    """Tensor[d_sae] of log10 firing frequency, when a hub loader returned it."""


# ---- loading ------------------------------------------------------------------------------------
def load_sae_for_comparison(spec: SAESpec, *, label: str = "a") -> LoadedSAE:
    """Resolve ``spec`` (SAE object, local folder, or hub id) to a :class:`LoadedSAE`.

    Local folders are read with ``SAE.load_from_disk``; hub ids with SAELens's
    ``SAE.from_pretrained_with_cfg_and_sparsity`` (a release from its pretrained directory, or a
    Hugging Face repo with one folder per sae_id). ``qsae_lens.training`` is imported first so that
    qsae_lens's own registered architectures load.
    """
    from sae_lens import SAE

    try:  # registers qsae_lens architectures with SAELens's registry
        import qsae_lens.training  # noqa: F401
    except ImportError:
        pass

    if isinstance(spec, SAE):
        return LoadedSAE(spec, f"<in-memory {type(spec).__name__}>")
    if isinstance(spec, (tuple, list)):
        if len(spec) != 2 or not all(isinstance(s, str) for s in spec):
            raise ValueError(
                f"SAE {label}: a hub id tuple must be (release_or_repo_id, sae_id) strings, got {spec!r}"
            )
        return _load_from_hub(spec[0], spec[1], label)
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(
            f"SAE {label}: expected a sae_lens SAE, a checkpoint folder, a hub id or a (repo, sae_id) tuple; "
            f"got {type(spec).__name__}"
        )
    path = Path(spec).expanduser()
    text = os.fspath(spec)
    if path.exists():
        return _load_from_disk(path, label)
    looks_local = (
        isinstance(spec, os.PathLike) or text.startswith(("/", "./", "../", "~")) or text.count("/") == 0
    )
    if looks_local:
        raise FileNotFoundError(
            f"SAE {label}: no checkpoint folder at {path} (give a folder written by SAELens's save_model, "
            f"holding {' and '.join(_SAE_FILES)}, or a hub id 'release/sae_id')"
        )
    release, sae_id = _split_hub_id(text, label)
    return _load_from_hub(release, sae_id, label)


def _load_from_disk(path: Path, label: str) -> LoadedSAE:
    from sae_lens import SAE

    if not path.is_dir():
        raise ValueError(f"SAE {label}: {path} is a file; give the checkpoint folder that holds {_SAE_FILES}")
    missing = [f for f in _SAE_FILES if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"SAE {label}: checkpoint folder {path} is missing {', '.join(missing)} "
            f"(an SAELens checkpoint holds {' and '.join(_SAE_FILES)}; write one with SAE.save_model)"
        )
    try:
        sae = SAE.load_from_disk(path, device="cpu")
    except Exception as e:  # safetensors/json/registry errors: say which checkpoint and why
        raise ValueError(
            f"SAE {label}: could not read the checkpoint at {path}: {type(e).__name__}: {e}"
        ) from e
    sparsity = path / "sparsity.safetensors"
    return LoadedSAE(sae, str(path), sparsity_path=sparsity if sparsity.is_file() else None)


def _split_hub_id(text: str, label: str) -> tuple[str, str]:
    """``"release/sae_id"`` (a SAELens pretrained release) or ``"owner/repo/sae_id"`` (an HF repo
    with one folder per sae_id)."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    first, _, rest = text.partition("/")
    if first in get_pretrained_saes_directory() and rest:
        return first, rest
    parts = text.split("/")
    if len(parts) >= 3 and all(parts[:2]):
        return "/".join(parts[:2]), "/".join(parts[2:])
    raise ValueError(
        f"SAE {label}: {text!r} is neither a local folder nor a hub id; give 'release/sae_id' for a SAELens "
        f"pretrained release, 'owner/repo/sae_id' for a Hugging Face repo, or a (repo_id, sae_id) tuple"
    )


def _load_from_hub(release: str, sae_id: str, label: str) -> LoadedSAE:
    from sae_lens import SAE

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "consider loading with the release name"
            sae, _, log_sparsity = SAE.from_pretrained_with_cfg_and_sparsity(release, sae_id, device="cpu")
    except Exception as e:
        raise ValueError(
            f"SAE {label}: could not load {sae_id!r} from {release!r} through SAELens: {type(e).__name__}: {e}"
        ) from e
    return LoadedSAE(sae, f"{release}/{sae_id}", log_sparsity=log_sparsity)


def sae_metadata(loaded: LoadedSAE) -> dict[str, Any]:
    """Plain-JSON description of an SAE for the report (None where unknown)."""
    cfg = loaded.sae.cfg
    md = cfg.metadata
    precision = {k: md.get(k) for k in PRECISION_KEYS if md.get(k) is not None} or None
    return {
        "source": loaded.source,
        "architecture": cfg.architecture(),
        "d_in": int(cfg.d_in),
        "d_sae": int(cfg.d_sae),
        "dtype": str(cfg.dtype),
        "hook": md.get("hook_name"),
        "model": md.get("model_name"),
        "precision": precision,
        "init_seed": md.get("init_seed"),
    }


def latent_directions(loaded: LoadedSAE, label: str) -> tuple[Tensor, Tensor | None]:
    """Decoder directions Tensor[d_sae, d_in] (rows of W_dec) and encoder directions
    Tensor[d_sae, d_in] (columns of W_enc, which SAELens stores as [d_in, d_sae]); float32, unnormalised.

    Raises ValueError naming the tensor when any weight of the SAE is NaN or Inf.
    """
    sae = loaded.sae
    for name, t in sae.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            n_nan = int(torch.isnan(t).sum())
            n_inf = int(torch.isinf(t).sum())
            raise ValueError(
                f"{name} of SAE {label} ({loaded.source}) has {n_nan} NaN and {n_inf} Inf values: "
                f"the checkpoint is corrupt or training diverged; nothing can be compared"
            )
    dec = sae.W_dec.detach().float()
    w_enc = getattr(sae, "W_enc", None)
    enc = None
    if isinstance(w_enc, Tensor) and w_enc.shape == (dec.shape[1], dec.shape[0]):
        enc = w_enc.detach().float().T
    return dec, enc


# ---- the composition ----------------------------------------------------------------------------
def compare_saes(
    a: SAESpec,
    b: SAESpec,
    *,
    activations: ActivationsSpec | None = None,
    hook: str | None = None,
    block_size: int = 4096,
    n_bootstrap: int = 1000,
    n_permutations: int = 10000,
    seed: int = 0,
    null: str = "anisotropic",
    device: str | torch.device | None = None,
    progress: bool = True,
    batch_size: int = 1024,
    cache_nulls: bool = False,
    n_null_draws: int = 39,
) -> ComparisonReport:
    """Compare two SAEs trained on the same space (two precisions, two seeds, two layers).

    Weight metrics (always): best-match cosine of decoder and encoder directions both ways,
    mutual nearest neighbours, one-to-one matched cosine (Hungarian) and the fraction matched above
    0.5/0.7/0.9, and the cross-validated matched cosine after an orthogonal (Procrustes) map. Each
    carries a 95% bootstrap CI, the value expected between random SAEs of the same shapes, and a
    permutation-test p-value (Holm and BH adjusted over the whole report).

    With ``activations`` (``(x_a, x_b)``: Tensor[n, d_in] at a's and b's sources for the same tokens,
    or two cached-activation folders read with ``qsae_lens.activations.load_activations`` at ``hook``
    or each SAE's own hook): CKA of activations and of matched latents' codes, correlation of
    matched latents across tokens, cross-reconstruction explained variance (raw and after the
    Procrustes map), and latent categories from the codes. Without them, categories come from the
    checkpoints' ``sparsity.safetensors`` when present.

    ``null``: what "the two SAEs share nothing" means for every weight metric's null value and p-value.
    "anisotropic" (default): the target dictionary mirrored across random axes of its own shape (b's for
    a->b, a's for b->a; ``qsae_lens.compare.nulls.anisotropic_directions``): the same subspace, spectrum,
    norms and angles among its latents, none of its features, so a dictionary concentrated in a subspace
    or with a power-law spectrum is read against random dictionaries shaped exactly the same way. "isotropic": uniform directions with the analytic best-match null and the simulated
    matching/MNN nulls (the old default; "auto", "analytic" and "simulate" choose how its reference means
    are obtained, "auto" meaning anisotropic since it is the default). "none": no nulls. Each metric's
    ``null_kind`` names the null it was read against. ``n_null_draws`` (anisotropic null, default 39):
    independent mirror images the weight metrics are computed against; each metric's ``null`` is the mean
    of their SAE-level values and its ``p_value`` the Monte-Carlo rank (1 + #{draws >= observed}) /
    (n_null_draws + 1), one-sided, which counts the draw-to-draw variance of the null dictionary (a
    latent-by-latent test against one draw does not, and is overconfident near the null: docs/compare.md);
    its floor is 1/(n_null_draws + 1). ``cache_nulls`` (default False): read and write the
    simulated isotropic nulls' JSON cache under ``qsae_lens.assets.cache_dir()/nulls``; by default
    ``compare_saes`` writes no file.
    Raises ValueError for different d_in, NaN/Inf weights, or an unreadable checkpoint; different
    hooks or models only add a warning to the report.
    """
    from tqdm.auto import tqdm

    if null not in _NULL_MODES:
        raise ValueError(f"null must be one of {', '.join(_NULL_MODES)}; got {null!r}")
    if not isinstance(n_null_draws, int) or n_null_draws < 1:
        raise ValueError(f"n_null_draws must be an int >= 1 (mirror images of the null); got {n_null_draws!r}")
    if null == "auto":
        null = "anisotropic"
    kind = null_kind(null)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    la, lb, meta_a, meta_b, (dec_a, enc_a), (dec_b, enc_b) = _load_pair(a, b)
    report_warnings = _compatibility_warnings(meta_a, meta_b)
    xs = _load_activation_pair(activations, la, lb, hook, meta_a["d_in"])

    n_steps = 7 + (6 if xs is not None else 0)
    bar = tqdm(total=n_steps, desc="compare_saes", disable=not progress, leave=False)
    ctx = _Context(
        n_bootstrap=n_bootstrap, n_permutations=n_permutations, seed=seed, bar=bar, cache_nulls=cache_nulls,
        null_kind=kind, n_null_draws=n_null_draws,
    )
    metrics: dict[str, MetricResult] = {}
    distributions: dict[str, Any] = {}
    notes: list[str] = []
    try:
        dec_a, dec_b = dec_a.to(dev), dec_b.to(dev)
        matching = _weight_metrics(
            dec_a, dec_b, enc_a, enc_b, null=null, block_size=block_size, ctx=ctx, dev=dev,
            metrics=metrics, distributions=distributions,
        )  # fmt: skip
        procrustes = _procrustes_metric(
            dec_a, dec_b, matching, null=null, block_size=block_size, ctx=ctx, metrics=metrics
        )

        categories: dict[str, Any] = {}
        if xs is not None:
            categories = _activation_metrics(
                la, lb, xs, matching, procrustes, ctx=ctx, batch_size=batch_size, metrics=metrics,
                notes=notes,
            )  # fmt: skip
            has_sparsity = all(lo.sparsity_path is not None or lo.log_sparsity is not None for lo in (la, lb))
            if xs[0].shape[0] < MIN_CATEGORY_TOKENS and has_sparsity:
                # a latent firing at 5e-4 looks dead in ~2,000 tokens 37% of the time: the training
                # sparsity (SAELens's file, counted over the whole training run) is the better source
                categories = _categories_from_sparsity(la, lb, matching)
                notes.append(f"latent categories from sparsity.safetensors: {xs[0].shape[0]} held-out tokens "
                             f"< {MIN_CATEGORY_TOKENS:,}")  # fmt: skip
        else:
            categories = _categories_from_sparsity(la, lb, matching, metrics, ctx)
    finally:
        bar.close()

    _adjust_p_values(metrics)
    settings = {
        "block_size": block_size,
        "n_bootstrap": n_bootstrap,
        "n_permutations": n_permutations,
        "seed": seed,
        "null": null,
        "cache_nulls": cache_nulls,
        "n_null_draws": n_null_draws if kind == "anisotropic" else None,
        "device": str(dev),
        "activations": xs is not None,
        "n_tokens": int(xs[0].shape[0]) if xs is not None else None,
        "qsae_lens_version": _qsae_version(),
        "notes": notes,
    }
    return ComparisonReport(
        a=meta_a,
        b=meta_b,
        metrics=metrics,
        latent_categories=categories,
        distributions=distributions,
        warnings=report_warnings,
        settings=settings,
    )


def _load_pair(a: SAESpec, b: SAESpec) -> tuple[Any, Any, dict[str, Any], dict[str, Any], tuple, tuple]:
    """Both SAEs loaded and checked for one activation space: (loaded a, loaded b, metadata a, metadata b,
    (W_dec rows, encoder rows or None) of a, the same of b). ValueError names the mismatch."""
    la = load_sae_for_comparison(a, label="a")
    lb = load_sae_for_comparison(b, label="b")
    meta_a, meta_b = sae_metadata(la), sae_metadata(lb)
    if meta_a["d_in"] != meta_b["d_in"]:
        raise ValueError(
            f"SAEs have different d_in: a ({la.source}) reads d_in={meta_a['d_in']}, "
            f"b ({lb.source}) reads d_in={meta_b['d_in']}; only SAEs of the same activation space can be compared"
        )
    dirs_a, dirs_b = latent_directions(la, "a"), latent_directions(lb, "b")
    if dirs_a[0].shape[1] != dirs_b[0].shape[1]:
        raise ValueError(
            f"SAEs write to different widths: W_dec of a is {tuple(dirs_a[0].shape)}, "
            f"W_dec of b is {tuple(dirs_b[0].shape)}"
        )
    return la, lb, meta_a, meta_b, dirs_a, dirs_b


@dataclass
class _Context:
    n_bootstrap: int
    n_permutations: int
    seed: int
    bar: Any
    cache_nulls: bool = False
    null_kind: str | None = None
    n_null_draws: int = 39
    bases: dict[str, Tensor] = field(default_factory=dict)
    """Mirror-null bases (``nulls.reflection_basis``) already fitted: "a.dec", "a.enc", "b.dec", "b.enc"."""

    def step(self, what: str) -> None:
        self.bar.set_postfix_str(what)
        self.bar.update(1)


def _compatibility_warnings(meta_a: dict[str, Any], meta_b: dict[str, Any]) -> list[str]:
    out = []
    for key, what in (("hook", "hook points"), ("model", "models")):
        va, vb = meta_a.get(key), meta_b.get(key)
        if va is not None and vb is not None and va != vb:
            out.append(
                f"a and b read different {what} ({va!r} vs {vb!r}): their directions are compared "
                f"as if they lived in the same space, which holds only where the two spaces are aligned"
            )
    if meta_a["d_sae"] != meta_b["d_sae"]:
        out.append(
            f"a and b have different widths (d_sae {meta_a['d_sae']} vs {meta_b['d_sae']}): a→b and b→a "
            f"best-match differ by construction, and one-to-one matching covers only "
            f"{min(meta_a['d_sae'], meta_b['d_sae'])} latents"
        )
    return out


def _load_activation_pair(
    activations: ActivationsSpec | None, la: LoadedSAE, lb: LoadedSAE, hook: str | None, d_in: int
) -> tuple[Tensor, Tensor] | None:
    if activations is None:
        return None
    if not isinstance(activations, Sequence) or len(activations) != 2:
        raise ValueError("activations must be a pair (x_a, x_b) of tensors or of cached-activation folders")
    xs = []
    for side, x, loaded in (("a", activations[0], la), ("b", activations[1], lb)):
        if not isinstance(x, Tensor):
            folder = Path(x)
            hook_name = hook or loaded.sae.cfg.metadata.get("hook_name")
            if hook_name is None:
                raise ValueError(
                    f"activations for {side}: SAE {side} records no hook_name; pass hook=... (--hook) to pick "
                    f"the activations in {folder}"
                )
            if not folder.exists():
                raise FileNotFoundError(f"activations for {side}: no cached-activation folder at {folder}")
            from qsae_lens.activations import load_activations

            x = load_activations(folder, hook_name)
        x = x.detach().float().cpu()
        if x.ndim != 2 or x.shape[1] != d_in:
            raise ValueError(
                f"activations for {side} must be Tensor[n, d_in={d_in}] (SAE {side}'s d_in); got {tuple(x.shape)}"
            )
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"activations for {side} contain NaN or Inf values")
        xs.append(x)
    if xs[0].shape[0] != xs[1].shape[0]:
        raise ValueError(
            f"activations must cover the same tokens: x_a has {xs[0].shape[0]} rows, x_b has {xs[1].shape[0]}"
        )
    if xs[0].shape[0] < 4:
        raise ValueError(
            f"activations: need at least 4 tokens for CKA and correlations, got {xs[0].shape[0]}"
        )
    return xs[0], xs[1]


def _qsae_version() -> str:
    from qsae_lens import __version__

    return __version__


def _finite(values: Tensor) -> Tensor:
    values = values.detach().double().flatten().cpu()
    return values[torch.isfinite(values)]


def _quantiles_and_histogram(
    values: Tensor, null_values: Tensor | None = None, null_mean: float | None = None, *, n_bins: int = 50
) -> dict[str, Any]:
    """Summary kept in the report for a per-latent distribution (and figures drawn from it)."""
    v = _finite(values)
    lo = -1.0 if v.numel() == 0 else max(-1.0, math.floor(float(v.min()) * 20) / 20)
    if null_values is not None and null_values.numel():
        lo = min(lo, max(-1.0, math.floor(float(_finite(null_values).min()) * 20) / 20))
    edges = torch.linspace(lo, 1.0, n_bins + 1, dtype=torch.float64)
    # clamp so that cosines of exactly 1.0 (1 + 1e-7 in float32) land in the last bin
    counts = torch.histc(v.clamp(lo, 1.0), bins=n_bins, min=lo, max=1.0) if v.numel() else torch.zeros(n_bins)
    out: dict[str, Any] = {
        "n": int(v.numel()),
        "mean": float(v.mean()) if v.numel() else None,
        "quantiles": {
            str(q): float(x)
            for q, x in zip(QUANTILES, torch.quantile(v, torch.tensor(QUANTILES, dtype=v.dtype)))
        }
        if v.numel()
        else {},
        "histogram": {"edges": edges.tolist(), "counts": [int(c) for c in counts.tolist()]},
        "null": null_mean,
    }
    if null_values is not None and null_values.numel():
        nv = _finite(null_values)
        if null_mean is None:
            out["null"] = float(nv.mean())
        out["null_histogram"] = [int(c) for c in torch.histc(nv.clamp(lo, 1.0), bins=n_bins, min=lo, max=1.0)]
    return out


def _adjust_p_values(metrics: dict[str, MetricResult]) -> None:
    from qsae_lens.compare.stats import benjamini_hochberg, holm

    names = [n for n, m in metrics.items() if m.p_value is not None]
    if not names:
        return
    ps = torch.tensor([metrics[n].p_value for n in names], dtype=torch.float64)
    p_holm = holm(ps)
    p_bh = benjamini_hochberg(ps)
    for i, n in enumerate(names):
        metrics[n] = metrics[n]._replace(p_value_holm=float(p_holm[i]), p_value_bh=float(p_bh[i]))


_NULL_MODES = ("anisotropic", "isotropic", "auto", "analytic", "simulate", "none")


def null_kind(null: str) -> str | None:
    """The kind of weight-metric null a ``compare_saes(null=...)`` mode uses: anisotropic, isotropic or None."""
    if null in ("anisotropic", "auto"):
        return "anisotropic"
    if null in ("isotropic", "analytic", "simulate"):
        return "isotropic"
    return None


def reference_nulls(
    n_a: int,
    n_b: int,
    d: int,
    mode: str,
    *,
    seed: int = 0,
    block_size: int = 4096,
    device: Any = "cpu",
    use_cache: bool = False,
) -> dict[str, float]:
    """Expected value of each weight metric between random SAEs of shapes [n_a, d] and [n_b, d]
    (``qsae_lens.compare.nulls``): the "null" column of the report.

    ``mode``: "auto"/"isotropic" (analytic best-match, simulated matching/MNN), "analytic" (only what has
    a closed form: best match), "simulate" (everything simulated), "none" or "anisotropic" (no reference
    means here: the anisotropic null's mean is that of its sample, drawn against the real dictionaries).
    ``use_cache``: read/write the simulated nulls' JSON cache (default False: no file written).
    """
    if mode in ("none", "anisotropic"):
        return {}
    if mode == "isotropic":
        mode = "auto"
    from qsae_lens.compare import nulls

    out: dict[str, float] = {}
    if mode in ("auto", "analytic"):
        out["best_match_ab"] = nulls.best_match_null(n_a, n_b, d).mean
        out["best_match_ba"] = nulls.best_match_null(n_b, n_a, d).mean
    if mode in ("auto", "simulate"):
        sim = nulls.simulate_alignment_nulls(
            n_a, n_b, d, seed=seed, block_size=block_size, device=device, use_cache=use_cache
        )
        out.setdefault("best_match_ab", sim.best_match_ab.mean)
        out.setdefault("best_match_ba", sim.best_match_ba.mean)
        out["matched"] = sim.matched_cosine.mean
        out["mutual_nn"] = sim.mutual_nn_fraction.mean
    return out


# ---- weight metrics -----------------------------------------------------------------------------
#: Each weight metric (a mean over latents) -> its key in ``reference_nulls`` (isotropic closed forms).
_REFERENCE_KEY = {
    "decoder_cosine_best_match_ab": "best_match_ab",
    "decoder_cosine_best_match_ba": "best_match_ba",
    "decoder_mutual_nn_fraction": "mutual_nn",
    "encoder_cosine_best_match_ab": "best_match_ab",
    "encoder_cosine_best_match_ba": "best_match_ba",
    "decoder_matched_cosine": "matched",
}
#: Weight metrics whose per-latent distribution the report keeps (quantiles and histogram).
_DISTRIBUTIONS = (
    "decoder_cosine_best_match_ab", "decoder_cosine_best_match_ba", "encoder_cosine_best_match_ab",
    "encoder_cosine_best_match_ba", "decoder_matched_cosine",
)  # fmt: skip


class _Dictionary(NamedTuple):
    """One SAE's latent directions as the weight metrics read them."""

    dec: Tensor
    """Tensor[n, d] decoder rows."""
    enc: Tensor | None
    """Tensor[n, d] encoder columns (as rows), or None when the SAE has no comparable encoder."""


def _random_like(n: int, d: int, seed: int, device: torch.device) -> Tensor:
    """Isotropic Gaussian directions Tensor[n, d]: a random SAE of the same shape, as the null assumes.

    The user's seed is mixed with a constant so that the null's directions never coincide with
    weights a caller drew from ``torch.Generator().manual_seed(small int)`` (which would make the
    "random" SAE a copy of a real one)."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + 0x5EED_C0DE) % (2**63))
    return torch.randn(n, d, generator=gen).to(device)


def _null_directions(ref: Tensor, n: int, d: int, seed: int, device: torch.device, kind: str,
                     basis: Tensor | None = None) -> Tensor:
    """Random directions Tensor[n, d] of the given null kind; anisotropic ones are a mirror image of ``ref``
    (across ``basis`` when given, else its own ``nulls.reflection_basis``)."""
    if kind == "anisotropic":
        from qsae_lens.compare.nulls import anisotropic_directions

        return anisotropic_directions(ref.detach().float().cpu(), n, seed=seed, device=device, basis=basis)
    return _random_like(n, d, seed, device)


def _weight_values(
    a: _Dictionary, target_b: _Dictionary, b: _Dictionary, target_a: _Dictionary, *, block_size: int
) -> tuple[dict[str, Tensor], Any]:
    """Per-latent values (Tensor[n_a] or Tensor[n_b]) of every weight metric, and the one-to-one Matching.

    a->b metrics read a's latents against ``target_b``, b->a metrics b's against ``target_a``: the SAEs
    themselves for the observed values (``target_b is b``, ``target_a is a``), null dictionaries of their
    shapes for a null draw. Memory and time as the alignment functions state (blocked best match, one
    Hungarian matching).
    """
    from qsae_lens.compare.alignment import (
        best_match,
        best_match_both,
        mutual_nearest_neighbours,
        one_to_one_matching,
    )

    observed = target_b is b and target_a is a
    ab, b_to_a = best_match_both(a.dec, target_b.dec, block_size=block_size)
    ba = b_to_a if observed else best_match(b.dec, target_a.dec, block_size=block_size)
    values = {
        "decoder_cosine_best_match_ab": ab.cosine,
        "decoder_cosine_best_match_ba": ba.cosine,
        "decoder_mutual_nn_fraction": mutual_nearest_neighbours(a.dec, target_b.dec, matches=(ab, b_to_a)).float(),
    }
    if a.enc is not None and b.enc is not None and target_a.enc is not None and target_b.enc is not None:
        e_ab, e_b_to_a = best_match_both(a.enc, target_b.enc, block_size=block_size)
        e_ba = e_b_to_a if observed else best_match(b.enc, target_a.enc, block_size=block_size)
        values["encoder_cosine_best_match_ab"] = e_ab.cosine
        values["encoder_cosine_best_match_ba"] = e_ba.cosine
    matching = one_to_one_matching(a.dec, target_b.dec, block_size=block_size)
    values["decoder_matched_cosine"] = matching.cosine
    for t in MATCH_THRESHOLDS:
        values[f"decoder_matched_fraction_above_{t}"] = (matching.cosine > t).float()
    return values, matching


def _null_draws(
    a: _Dictionary, b: _Dictionary, kind: str, *, n_draws: int, seed: int, block_size: int, dev: torch.device,
    bases: dict[str, Tensor],
) -> tuple[dict[str, Tensor], dict[str, list[float]]]:
    """Every weight metric against ``n_draws`` null dictionaries (each SAE's target replaced by a random
    dictionary of the null ``kind``): the first draw's per-latent values, and each draw's SAE-level value
    ({metric: [n_draws floats]}). Anisotropic draws are mirror images (``nulls.reflect``), the bases
    computed once per dictionary and kept in ``bases`` (for the Procrustes null); isotropic ones are Gaussian
    directions, the same for decoder and encoder.
    """
    from qsae_lens.compare.nulls import reflect, reflection_basis

    n_a, n_b, d = a.dec.shape[0], b.dec.shape[0], a.dec.shape[1]
    tensors = {"a.dec": a.dec, "a.enc": a.enc, "b.dec": b.dec, "b.enc": b.enc}
    if kind == "anisotropic":
        for k, t in tensors.items():
            if t is not None and k not in bases:
                bases[k] = reflection_basis(t, seed=seed)

    def null_of(key: str, n: int, draw_seed: int) -> Tensor | None:
        if tensors[key] is None:
            return None
        if kind == "anisotropic":
            return reflect(tensors[key], bases[key], seed=draw_seed, device=dev)
        return _random_like(n, d, draw_seed, dev)

    first: dict[str, Tensor] = {}
    draws: dict[str, list[float]] = {}
    for i in range(n_draws):
        sb, sa = seed + 1 + 7_919 * i, seed + 2 + 7_919 * i
        rand_b = null_of("b.dec", n_b, sb)
        rand_a = null_of("a.dec", n_a, sa)
        target_b = _Dictionary(rand_b, null_of("b.enc", n_b, sb) if kind == "anisotropic" else rand_b)
        target_a = _Dictionary(rand_a, null_of("a.enc", n_a, sa) if kind == "anisotropic" else rand_a)
        values, _ = _weight_values(a, target_b, b, target_a, block_size=block_size)
        if i == 0:
            first = values
        for name, v in values.items():
            draws.setdefault(name, []).append(float(_finite(v).mean()) if v.numel() else float("nan"))
    return first, draws


def _weight_metrics(
    dec_a: Tensor,
    dec_b: Tensor,
    enc_a: Tensor | None,
    enc_b: Tensor | None,
    *,
    null: str,
    block_size: int,
    ctx: _Context,
    dev: torch.device,
    metrics: dict[str, MetricResult],
    distributions: dict[str, Any],
) -> Any:
    """Best match both ways (decoder and encoder), MNN, one-to-one matching and the fractions matched above
    each threshold, each against its null; returns the Matching.

    Null values: each SAE against a random dictionary of the other's shape (seeded). Anisotropic: mirror
    images of the other SAE, ``ctx.n_null_draws`` of them, and p is the Monte-Carlo rank among their
    SAE-level values. Isotropic: one draw of uniform directions, whose per-latent values are paired latent
    by latent with the observed ones for the sign-flip test (for uniform directions each latent's best
    match has the same law whatever the latent is).
    """
    n_a, n_b, d = dec_a.shape[0], dec_b.shape[0], dec_a.shape[1]
    kind = null_kind(null)
    ref = reference_nulls(
        n_a, n_b, d, null, seed=ctx.seed, block_size=block_size, device=dev, use_cache=ctx.cache_nulls
    )
    ctx.step("null baselines")
    enc_a, enc_b = (e.to(dev) if e is not None else None for e in (enc_a, enc_b))
    a, b = _Dictionary(dec_a, enc_a), _Dictionary(dec_b, enc_b)
    observed, matching = _weight_values(a, b, b, a, block_size=block_size)
    ctx.step("weight metrics")
    first: dict[str, Tensor] = {}
    draws: dict[str, list[float]] | None = None
    if kind is not None:
        n_draws = ctx.n_null_draws if kind == "anisotropic" else 1
        first, all_draws = _null_draws(a, b, kind, n_draws=n_draws, seed=ctx.seed, block_size=block_size, dev=dev,
                                       bases=ctx.bases)  # fmt: skip
        draws = all_draws if kind == "anisotropic" else None
    ctx.step(f"null draws ({ctx.n_null_draws if kind == 'anisotropic' else int(kind is not None)})")
    for name, values in observed.items():
        r = ref.get(_REFERENCE_KEY.get(name, ""))
        _add_mean_metric(metrics, name, values, first.get(name), ctx, null_mean=r,
                         null_draws=None if draws is None else draws.get(name))  # fmt: skip
        if name in _DISTRIBUTIONS:
            distributions[name] = _quantiles_and_histogram(values, first.get(name), r)
    ctx.step("p-values")
    ctx.step("weight-metric distributions")
    return matching


def _add_mean_metric(
    metrics: dict[str, MetricResult],
    name: str,
    values: Tensor,
    null_values: Tensor | None,
    ctx: _Context,
    *,
    null_mean: float | None = None,
    null_kind: str | None = None,
    null_draws: list[float] | None = None,
) -> None:
    """A mean over latents with its bootstrap CI, the null's mean and a one-sided p-value.

    With ``null_draws`` (the SAE-level value against each null dictionary; ``null_values`` are the first
    draw's per-latent values): null = the mean over draws, p = (1 + #{draws >= value}) / (draws + 1), the
    Monte-Carlo test whose unit is the null dictionary. Without: the paired permutation (sign-flip) test
    of observed against ``null_values``, latent by latent."""
    from qsae_lens.compare.stats import bootstrap_ci, paired_permutation_test

    v = _finite(values)
    if v.numel() == 0:
        metrics[name] = MetricResult(float("nan"))
        return
    est = bootstrap_ci(v, n_resamples=ctx.n_bootstrap, seed=ctx.seed)
    p = None
    null = null_mean
    if null_values is not None:
        nv = _finite(null_values)
        if null is None and nv.numel():
            null = float(nv.mean())
        m = min(v.numel(), nv.numel())
        if null_draws:
            if null_mean is None:
                null = sum(null_draws) / len(null_draws)
            p = (1 + sum(x >= est.value for x in null_draws)) / (len(null_draws) + 1)
        elif m >= 2:  # one-sided: the question is whether the SAEs share more than the null does
            p = paired_permutation_test(
                v[:m], nv[:m], n_permutations=ctx.n_permutations, seed=ctx.seed, alternative="greater"
            )
    kind = (null_kind or ctx.null_kind) if (null_values is not None or null is not None) else None
    metrics[name] = MetricResult(est.value, est.ci_low, est.ci_high, null, p, null_kind=kind)


def _procrustes_metric(
    dec_a: Tensor,
    dec_b: Tensor,
    matching: Any,
    *,
    null: str,
    block_size: int,
    ctx: _Context,
    metrics: dict[str, MetricResult],
) -> Any:
    """Cross-validated matched cosine after an orthogonal map fitted on matched pairs (see
    ``alignment.procrustes_matched``); its null is the same procedure between a and random directions."""
    from qsae_lens.compare.alignment import procrustes_matched

    d = dec_a.shape[1]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter(
                "ignore", UserWarning
            )  # underdetermined fit: the CV score is the honest one
            res = procrustes_matched(
                dec_a, dec_b, seed=ctx.seed, block_size=block_size, matching=matching
            )  # the raw matching is the one _weight_metrics solved
    except ValueError as e:  # too few latents to hold out a fold
        metrics["decoder_procrustes_matched_cosine"] = MetricResult(float("nan"))
        ctx.step(f"procrustes skipped: {e}")
        return None
    # Under "b shares nothing with a", the held-out latents of a (under a map chosen without them) meet
    # directions that are random to them: the held-out matched cosines are those of a matching of
    # test_shape between a's held-out rows and null directions of b's kind (one per fold).
    null_cos, null_mean = None, None
    if ctx.null_kind is not None:
        from qsae_lens.compare.alignment import one_to_one_matching

        n_t, m_t = res.test_shape
        gen = torch.Generator().manual_seed(ctx.seed + 10)
        null_cos = torch.cat(
            [
                one_to_one_matching(
                    dec_a[torch.randperm(dec_a.shape[0], generator=gen)[:n_t].to(dec_a.device)],
                    _null_directions(dec_b, m_t, d, ctx.seed + 11 + 2 * f, dec_a.device, ctx.null_kind,
                                     basis=ctx.bases.get("b.dec")),
                    block_size=block_size,
                ).cosine
                for f in range(len(res.fold_cosines))
            ]
        )
        if null in ("isotropic", "simulate"):
            null_mean = reference_nulls(n_t, m_t, d, "simulate", seed=ctx.seed, block_size=block_size,
                                        device=dec_a.device, use_cache=ctx.cache_nulls)["matched"]  # fmt: skip
    _add_mean_metric(
        metrics, "decoder_procrustes_matched_cosine", res.cv_cosine, null_cos, ctx, null_mean=null_mean
    )
    if res.identity_cv_cosine is not None:
        _add_mean_metric(metrics, "decoder_identity_cv_cosine", res.identity_cv_cosine, null_cos, ctx,
                         null_mean=null_mean)  # fmt: skip
    ctx.step("procrustes")
    return res


# ---- activation metrics -------------------------------------------------------------------------
# Permutation nulls of CKA recompute XᵀPY (n·d1·d2 multiply-adds) per permutation: cap the count, and
# skip the test where even 100 permutations would cost more than this many multiply-adds.
_CKA_MAX_PERMUTATIONS = 1000
_CKA_PERMUTATION_BUDGET = 5e10  # ~10 s on 2 CPU cores


def _cka_metric(
    metrics: dict[str, MetricResult],
    names: tuple[str, str | None],
    x: Tensor,
    y: Tensor,
    ctx: _Context,
    notes: list[str],
    *,
    name_debiased_first: bool = False,
) -> None:
    """Linear CKA (biased, or debiased with ``name_debiased_first``) and optionally the debiased form under
    ``names[1]``, each with a token-permutation null and p-value."""
    from qsae_lens.compare.cka import MAX_FEATURE_DIM, cka_permutation_null, gram_linear_cka, linear_cka

    name, debiased_name = names
    n, d1, d2 = x.shape[0], x.shape[1], y.shape[1]
    if max(d1, d2) > MAX_FEATURE_DIM:
        # feature-space matrices would not fit; the n×n Gram form on a token subsample estimates the same CKA
        n_sub = min(n, 4096)
        notes.append(
            f"{name}: width {max(d1, d2)} > {MAX_FEATURE_DIM}, CKA from the Gram form on {n_sub} tokens"
        )
        metrics[name] = MetricResult(gram_linear_cka(x[:n_sub], y[:n_sub], debiased=name_debiased_first))
        if debiased_name:
            metrics[debiased_name] = MetricResult(gram_linear_cka(x[:n_sub], y[:n_sub], debiased=True))
        return
    n_perm = int(
        min(ctx.n_permutations, _CKA_MAX_PERMUTATIONS, _CKA_PERMUTATION_BUDGET // max(n * d1 * d2, 1))
    )
    # When even 100 permutations of all n tokens exceed the budget, the null is computed on a random
    # token subsample that fits (the test then asks the same question on fewer tokens: less power,
    # same validity) instead of being skipped.
    xs_null, ys_null = x, y
    if _CKA_PERMUTATION_BUDGET // max(n * d1 * d2, 1) < 100:
        n_sub = max(16, int(_CKA_PERMUTATION_BUDGET // (100 * d1 * d2)))
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(ctx.seed))[: min(n, n_sub)]
        xs_null, ys_null = x[idx], y[idx]
        n_perm = int(min(ctx.n_permutations, _CKA_MAX_PERMUTATIONS, 100))
        notes.append(f"{name}: permutation null on a random subsample of {idx.numel()} of {n} tokens "
                     f"({n}x{d1}x{d2} is too large for 100 permutations of all tokens)")  # fmt: skip
    for metric, debiased in ((name, name_debiased_first), (debiased_name, True)):
        if metric is None:
            continue
        value = linear_cka(x, y, debiased=debiased)
        res = cka_permutation_null(xs_null, ys_null, n_permutations=n_perm, seed=ctx.seed, debiased=debiased)
        metrics[metric] = MetricResult(
            value, null=float(res.null.mean()), p_value=float(res.p_value), null_kind="token-permutation"
        )


def _activation_metrics(
    la: LoadedSAE,
    lb: LoadedSAE,
    xs: tuple[Tensor, Tensor],
    matching: Any,
    procrustes: Any,
    *,
    ctx: _Context,
    batch_size: int,
    metrics: dict[str, MetricResult],
    notes: list[str],
) -> dict[str, Any]:
    """CKA, matched-latent correlation and code CKA, cross-reconstruction, and latent categories."""
    from qsae_lens.compare.activation_metrics import (
        cross_reconstruction_explained_variance,
        latent_activation_correlation,
        sae_codes,
    )
    from qsae_lens.compare.stats import bootstrap_ci, paired_permutation_test

    x_a, x_b = xs
    _cka_metric(metrics, ("activation_cka", "activation_cka_debiased"), x_a, x_b, ctx, notes)
    ctx.step("activation CKA")

    codes_a = sae_codes(la.sae, x_a, batch_size)
    codes_b = sae_codes(lb.sae, x_b, batch_size)
    ctx.step("SAE codes")

    rows, cols = matching.rows.cpu(), matching.cols.cpu()
    # codes have d_sae ~ n columns, where biased CKA is far from 0 for independent codes (issue 9: 0.269
    # against a debiased -0.0005 at n=2030, d=2048): latent_code_cka is the debiased form
    _cka_metric(metrics, ("latent_code_cka", None), codes_a[:, rows], codes_b[:, cols], ctx, notes,
                name_debiased_first=True)  # fmt: skip
    ctx.step("latent code CKA")

    corr = _finite(latent_activation_correlation(codes_a, codes_b, rows, cols))
    if corr.numel() >= 2:
        est = bootstrap_ci(corr, n_resamples=ctx.n_bootstrap, seed=ctx.seed)
        # under "token order unrelated" each Pearson correlation is symmetric about 0: sign-flip test
        p = paired_permutation_test(
            corr, torch.zeros_like(corr), n_permutations=ctx.n_permutations, seed=ctx.seed,
            alternative="greater",
        )  # fmt: skip
        metrics["latent_activation_correlation_matched"] = MetricResult(
            est.value, est.ci_low, est.ci_high, 0.0, p, null_kind="sign-flip"
        )
    else:
        notes.append(
            "latent_activation_correlation_matched: fewer than 2 matched pairs where both latents fire"
        )
        metrics["latent_activation_correlation_matched"] = MetricResult(float("nan"))
    ctx.step("latent correlation")

    sae_a = la.sae
    with torch.no_grad():
        metrics["cross_reconstruction_explained_variance_aa"] = MetricResult(
            float(cross_reconstruction_explained_variance(sae_a.encode, sae_a.decode, x_a))
        )
        metrics["cross_reconstruction_explained_variance_ab"] = MetricResult(
            float(cross_reconstruction_explained_variance(sae_a.encode, sae_a.decode, x_b))
        )
        if procrustes is not None:
            # the map chosen by CV without fold 0's latents (identity, or R with W_dec_a @ R ≈ W_dec_b),
            # never the in-sample rotation: x_b @ Rᵀ is b's activations expressed in a's space
            r_cv = procrustes.fold_maps[0] if procrustes.fold_maps else procrustes.rotation
            metrics["cross_reconstruction_explained_variance_ab_procrustes"] = MetricResult(
                float(
                    cross_reconstruction_explained_variance(
                        sae_a.encode, sae_a.decode, x_b, rotation=r_cv.cpu().T
                    )
                )
            )
    ctx.step("cross-reconstruction")

    _alive_metric(metrics, matching, (codes_a > 0).any(0), (codes_b > 0).any(0), ctx)
    cats = _categories_from_codes(codes_a, codes_b, rows, cols)
    ctx.step("latent categories")
    return cats


def _alive_metric(
    metrics: dict[str, MetricResult], matching: Any, alive_a: Tensor, alive_b: Tensor, ctx: _Context
) -> None:
    """``decoder_matched_cosine_alive``: the matched cosine over pairs whose latents both fire (Tensor[d_sae]
    bool masks): dead latents sit at their initialisation and would pull the mean toward chance."""
    from qsae_lens.compare.stats import bootstrap_ci

    keep = alive_a.cpu()[matching.rows.cpu()] & alive_b.cpu()[matching.cols.cpu()]
    v = _finite(matching.cosine.cpu()[keep])
    ref = metrics.get("decoder_matched_cosine")
    if v.numel() < 2:
        metrics["decoder_matched_cosine_alive"] = MetricResult(float("nan"))
        return
    est = bootstrap_ci(v, n_resamples=ctx.n_bootstrap, seed=ctx.seed)
    metrics["decoder_matched_cosine_alive"] = MetricResult(
        est.value, est.ci_low, est.ci_high, ref.null if ref else None, null_kind=ref.null_kind if ref else None
    )


def _categories_from_codes(codes_a: Tensor, codes_b: Tensor, rows: Tensor, cols: Tensor) -> dict[str, Any]:
    from qsae_lens.compare.categories import firing_stats_from_codes, latent_categories

    fa, ma = firing_stats_from_codes([codes_a])
    fb, mb = firing_stats_from_codes([codes_b])
    return _category_summary(latent_categories(fa, ma), latent_categories(fb, mb), rows, cols, "activations")


def _categories_from_sparsity(
    la: LoadedSAE,
    lb: LoadedSAE,
    matching: Any,
    metrics: dict[str, MetricResult] | None = None,
    ctx: _Context | None = None,
) -> dict[str, Any]:
    """Categories from SAELens's sparsity.safetensors (log10 firing frequency) when both SAEs have one."""
    if any(lo.sparsity_path is None and lo.log_sparsity is None for lo in (la, lb)):
        return {
            "source": None,
            "note": "no activations and no sparsity.safetensors for both SAEs: categories unknown",
        }
    from qsae_lens.compare.categories import (
        firing_frequency_from_log_sparsity,
        firing_frequency_from_sparsity_file,
        latent_categories,
    )

    freqs = []
    for loaded in (la, lb):
        if loaded.sparsity_path is not None:
            freqs.append(firing_frequency_from_sparsity_file(loaded.sparsity_path))
        else:
            freqs.append(firing_frequency_from_log_sparsity(loaded.log_sparsity, source=loaded.source))
    cat_a, cat_b = (latent_categories(f, None) for f in freqs)
    if metrics is not None and ctx is not None:  # the training sparsity: alive = fired during training
        _alive_metric(metrics, matching, freqs[0] > 0, freqs[1] > 0, ctx)
    return _category_summary(cat_a, cat_b, matching.rows.cpu(), matching.cols.cpu(), "sparsity.safetensors")


def _category_summary(
    cat_a: Tensor, cat_b: Tensor, rows: Tensor, cols: Tensor, source: str
) -> dict[str, Any]:
    from qsae_lens.compare.categories import CATEGORY_NAMES, category_counts, category_transition_table

    names = list(CATEGORY_NAMES)
    table = category_transition_table(cat_a[rows], cat_b[cols])
    return {
        "source": source,
        "names": names,
        "a": {k: int(v) for k, v in category_counts(cat_a).items()},
        "b": {k: int(v) for k, v in category_counts(cat_b).items()},
        "transition": {"rows": names, "cols": names, "counts": [[int(v) for v in r] for r in table.tolist()]},
    }
