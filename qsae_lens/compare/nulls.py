"""Null baselines for weight-space alignment: what two *random* SAEs of the same shapes would score.

A best-match cosine of 0.3 means nothing until it is set beside the score of unrelated directions of the same
shapes: in d = 64 that is already ~0.4, in d = 2048 ~0.1. Best match has an exact null (below); one-to-one
matched cosine and the mutual-nearest-neighbour fraction are simulated with random Gaussian SAEs and cached.

Analytic null of best match. The cosine T between two independent uniform unit vectors in d dimensions has
density proportional to (1 - t²)^((d-3)/2) on [-1, 1], i.e. (T + 1) / 2 ~ Beta((d-1)/2, (d-1)/2). One row of
``a`` against n_b independent rows of ``b`` has best match M = max of n_b iid copies, with CDF F(t)^n_b, so
E[M] = 1 - ∫ F(t)^n_b dt and E[M²] = 1 - ∫ 2t F(t)^n_b dt over [-1, 1] (integration by parts), integrated
with ``scipy.integrate.quad``; quantiles are exact, F⁻¹(q^(1/n_b)).

Anisotropy-matched null (the default of ``compare_saes``). Real dictionaries are not spread evenly over
the d dimensions: two dictionaries with no shared feature that both live in the same low-dimensional
subspace, or share a power-law spectrum, match each other far above the isotropic null above. The
anisotropic null draws random directions from N(0, Σ_b) with Σ_b = U_bᵀU_b / n_b the second moment of the
target dictionary's unit rows U_b (:func:`anisotropic_directions`), so a random SAE has b's spectrum and
subspace but no feature of b. :func:`anisotropic_random_sae_like` builds a whole SAE that way (the sweep's
floor), and :func:`covariance_matched_activations` is the matching null for activation metrics.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "QUANTILES",
    "NullDistribution",
    "AlignmentNulls",
    "cosine_distribution",
    "best_match_null",
    "simulate_alignment_nulls",
    "matched_cosine_null",
    "mutual_nn_null",
    "second_moment",
    "anisotropic_directions",
    "anisotropic_random_sae_like",
    "covariance_matched_activations",
]

#: Quantile levels reported for every null.
QUANTILES: tuple[float, ...] = (0.025, 0.05, 0.5, 0.95, 0.975)
_CACHE_VERSION = 1


@dataclass(frozen=True)
class NullDistribution:
    """Distribution of one alignment statistic between random SAEs of shapes (n_a, d) and (n_b, d).

    ``mean``/``std``/``quantiles`` describe the SAE-level statistic (a mean over latents, or the MNN fraction)
    across random pairs of SAEs: read an observed value against these. ``per_latent_*`` describe one latent's
    value (a single best-match or matched cosine), for histograms.
    """

    statistic: str
    n_a: int
    n_b: int
    d: int
    mean: float
    std: float
    quantiles: dict[float, float]
    per_latent_mean: float
    per_latent_std: float
    per_latent_quantiles: dict[float, float]
    method: str
    """``"analytic"`` or ``"simulated"``."""
    n_draws: int = 0
    seed: int | None = None
    draws: tuple[float, ...] = field(default=(), repr=False)
    """The statistic of every simulated pair of random SAEs (empty when analytic)."""

    def __repr__(self) -> str:
        q = self.quantiles
        return (
            f"NullDistribution({self.statistic}, n_a={self.n_a}, n_b={self.n_b}, d={self.d}: "
            f"mean={self.mean:.4f} std={self.std:.2g} 95%=[{q.get(0.025, math.nan):.4f}, "
            f"{q.get(0.975, math.nan):.4f}], {self.method}"
            + (f", {self.n_draws} draws, seed {self.seed})" if self.method == "simulated" else ")")
        )


@dataclass(frozen=True)
class AlignmentNulls:
    """Simulated nulls of all weight-space statistics for one shape (computed together, they share the cost)."""

    best_match_ab: NullDistribution
    best_match_ba: NullDistribution
    matched_cosine: NullDistribution
    mutual_nn_fraction: NullDistribution


def _check_shape(n_a: int, n_b: int, d: int) -> None:
    if min(n_a, n_b) < 1 or d < 2:
        raise ValueError(f"null needs n_a >= 1, n_b >= 1 and d >= 2, got n_a={n_a}, n_b={n_b}, d={d}")


def cosine_distribution(d: int):
    """Frozen scipy distribution of the cosine between two independent uniform unit vectors in ``d`` dims."""
    from scipy.stats import beta

    if d < 2:
        raise ValueError(f"d must be >= 2, got {d}")
    return beta((d - 1) / 2, (d - 1) / 2, loc=-1.0, scale=2.0)


def best_match_null(n_a: int, n_b: int, d: int) -> NullDistribution:
    """Analytic null of ``best_match(a, b).cosine`` between random SAEs a: [n_a, d], b: [n_b, d].

    The SAE-level std and quantiles treat the n_a rows as independent (they share the same b rows, a small
    correlation; simulation agrees within a few percent): std = per-latent std / sqrt(n_a), normal quantiles.
    """
    from scipy.integrate import quad
    from scipy.stats import norm

    _check_shape(n_a, n_b, d)
    dist = cosine_distribution(d)

    def quantile(q: float) -> float:
        # F(t)^n_b = q  <=>  upper tail of one cosine = 1 - q^(1/n_b), kept precise with expm1 for large n_b
        return float(dist.isf(-math.expm1(math.log(q) / n_b)))

    def cdf_max(t: float) -> float:
        return math.exp(n_b * float(dist.logcdf(t)))

    # Outside [lo, hi] the CDF of the max is 0 or 1 to double precision; integrate only where it moves.
    lo, hi = quantile(1e-15), quantile(1.0 - 1e-15)
    opts = dict(limit=200, epsabs=1e-12, epsrel=1e-10)
    int_f = quad(cdf_max, lo, hi, **opts)[0]
    int_tf = quad(lambda t: 2.0 * t * cdf_max(t), lo, hi, **opts)[0]
    mean = 1.0 - ((1.0 - hi) + int_f)
    second = 1.0 - ((1.0 - hi * hi) + int_tf)
    std = math.sqrt(max(second - mean * mean, 0.0))
    per_q = {q: quantile(q) for q in QUANTILES}
    stat_std = std / math.sqrt(n_a)
    return NullDistribution(
        statistic="best_match_cosine",
        n_a=n_a,
        n_b=n_b,
        d=d,
        mean=mean,
        std=stat_std,
        quantiles={q: mean + float(norm.ppf(q)) * stat_std for q in QUANTILES},
        per_latent_mean=mean,
        per_latent_std=std,
        per_latent_quantiles=per_q,
        method="analytic",
    )


# ----------------------------------------------------------------------------------------- simulation
def _summarise(
    statistic: str,
    n_a: int,
    n_b: int,
    d: int,
    draws: list[float],
    pooled: np.ndarray,
    n_draws: int,
    seed: int,
) -> NullDistribution:
    arr = np.asarray(draws, dtype=np.float64)
    return NullDistribution(
        statistic=statistic,
        n_a=n_a,
        n_b=n_b,
        d=d,
        mean=float(arr.mean()),
        std=float(arr.std(ddof=1)) if arr.size > 1 else float("nan"),
        quantiles={q: float(np.quantile(arr, q)) for q in QUANTILES},
        per_latent_mean=float(pooled.mean()),
        per_latent_std=float(pooled.std(ddof=1)) if pooled.size > 1 else float("nan"),
        per_latent_quantiles={q: float(np.quantile(pooled, q)) for q in QUANTILES},
        method="simulated",
        n_draws=n_draws,
        seed=seed,
        draws=tuple(float(x) for x in draws),
    )


def _to_json(nd: NullDistribution) -> dict:
    out = asdict(nd)
    out["quantiles"] = {str(k): v for k, v in nd.quantiles.items()}
    out["per_latent_quantiles"] = {str(k): v for k, v in nd.per_latent_quantiles.items()}
    out["draws"] = list(nd.draws)
    return out


def _from_json(obj: dict) -> NullDistribution:
    obj = dict(obj)
    obj["quantiles"] = {float(k): v for k, v in obj["quantiles"].items()}
    obj["per_latent_quantiles"] = {float(k): v for k, v in obj["per_latent_quantiles"].items()}
    obj["draws"] = tuple(obj["draws"])
    return NullDistribution(**obj)


def _cache_path(
    cache_dir: str | os.PathLike[str] | None, n_a: int, n_b: int, d: int, seed: int, n_draws: int
) -> Path:
    if cache_dir is None:
        from qsae_lens.assets import cache_dir as root

        cache_dir = root() / "nulls"
    return Path(cache_dir) / f"alignment_na{n_a}_nb{n_b}_d{d}_seed{seed}_draws{n_draws}.json"


def _write_json_atomic(path: Path, obj: dict) -> None:
    from qsae_lens._io import atomic_write_json

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, obj)


def simulate_alignment_nulls(
    n_a: int,
    n_b: int,
    d: int,
    *,
    n_draws: int = 4,
    seed: int = 0,
    block_size: int = 4096,
    device: str | torch.device = "cpu",
    use_cache: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
) -> AlignmentNulls:
    """Simulate best-match (both ways), one-to-one matched cosine and MNN fraction between random SAEs.

    Each draw samples a: [n_a, d] and b: [n_b, d] with iid Gaussian entries (uniform directions after
    normalisation, seeded) and runs the same blockwise functions as the real comparison. With ``use_cache=True``
    (default False: nothing is written unless asked) results are read from and written to JSON under
    ``cache_dir`` (default ``qsae_lens.assets.cache_dir()/nulls``), keyed by shape, seed and n_draws.
    Cost is that of ``n_draws`` full comparisons: minutes per draw at 65,536 latents x 2048 on 2 CPU cores.
    """
    from qsae_lens.compare.alignment import best_match_both, mutual_nearest_neighbours, one_to_one_matching

    _check_shape(n_a, n_b, d)
    if n_draws < 1:
        raise ValueError(f"n_draws must be >= 1, got {n_draws}")
    path = _cache_path(cache_dir, n_a, n_b, d, seed, n_draws)
    if use_cache and path.is_file():
        try:
            obj = json.loads(path.read_text())
            if obj.get("version") == _CACHE_VERSION:
                return AlignmentNulls(**{k: _from_json(v) for k, v in obj["nulls"].items()})
        except (ValueError, KeyError, TypeError):
            pass  # unreadable or stale cache entry: recompute and overwrite it

    gen = torch.Generator().manual_seed(seed)
    stats: dict[str, list[float]] = {k: [] for k in ("ab", "ba", "matched", "mnn")}
    pooled: dict[str, list[np.ndarray]] = {k: [] for k in stats}
    for _ in range(n_draws):
        a = torch.randn(n_a, d, generator=gen).to(device)
        b = torch.randn(n_b, d, generator=gen).to(device)
        ab, ba = best_match_both(a, b, block_size=block_size)
        mnn = mutual_nearest_neighbours(a, b, matches=(ab, ba)).float()
        m = one_to_one_matching(a, b, block_size=block_size)
        for key, values in (("ab", ab.cosine), ("ba", ba.cosine), ("matched", m.cosine), ("mnn", mnn)):
            v = values.double().cpu().numpy()
            stats[key].append(float(v.mean()))
            pooled[key].append(v)
    names = {
        "ab": ("best_match_ab", "best_match_cosine", n_a, n_b),
        "ba": ("best_match_ba", "best_match_cosine", n_b, n_a),
        "matched": ("matched_cosine", "matched_cosine", n_a, n_b),
        "mnn": ("mutual_nn_fraction", "mutual_nn_fraction", n_a, n_b),
    }
    result = {
        field_name: _summarise(stat, na, nb, d, stats[key], np.concatenate(pooled[key]), n_draws, seed)
        for key, (field_name, stat, na, nb) in names.items()
    }
    if use_cache:
        _write_json_atomic(
            path, {"version": _CACHE_VERSION, "nulls": {k: _to_json(v) for k, v in result.items()}}
        )
    return AlignmentNulls(**result)


def matched_cosine_null(n_a: int, n_b: int, d: int, **kwargs) -> NullDistribution:
    """Simulated null of the one-to-one matched mean cosine (keyword args as ``simulate_alignment_nulls``)."""
    return simulate_alignment_nulls(n_a, n_b, d, **kwargs).matched_cosine


def mutual_nn_null(n_a: int, n_b: int, d: int, **kwargs) -> NullDistribution:
    """Simulated null of the mutual-nearest-neighbour fraction (keyword args as ``simulate_alignment_nulls``)."""
    return simulate_alignment_nulls(n_a, n_b, d, **kwargs).mutual_nn_fraction


# ------------------------------------------------------------------------------ anisotropy-matched nulls
def second_moment(w: Tensor) -> Tensor:
    """Σ = UᵀU / n (Tensor[d, d], float64) of the unit-normalised rows U of ``w``: Tensor[n, d].

    Its trace is 1; its eigenvalues say how the dictionary's directions spread over the d dimensions
    (all 1/d for uniform directions, 1/r on an r-dimensional subspace).
    """
    if w.ndim != 2 or w.shape[0] < 1 or w.shape[1] < 2:
        raise ValueError(f"second_moment needs a Tensor[n, d] with n >= 1, d >= 2; got shape {tuple(w.shape)}")
    u = w.detach().double()
    u = u / u.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (u.T @ u) / u.shape[0]


def _sqrt_psd(sigma: Tensor) -> Tensor:
    """Symmetric square root of a PSD matrix (negative round-off eigenvalues clamped to 0)."""
    vals, vecs = torch.linalg.eigh(sigma.double())
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def _eigen_second_moment(w: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues Tensor[r] and eigenvectors Tensor[d, r] of ``second_moment(w)``; through the thin SVD of the
    unit rows when there are fewer rows than dimensions (cheaper than a d x d eigendecomposition)."""
    u = w.detach().double()
    u = u / u.norm(dim=1, keepdim=True).clamp_min(1e-12)
    if u.shape[0] < u.shape[1]:
        _, sv, vh = torch.linalg.svd(u, full_matrices=False)
        return sv**2 / u.shape[0], vh.T
    return torch.linalg.eigh((u.T @ u) / u.shape[0])


def _direction_matched_root(
    eig: tuple[Tensor, Tensor], *, n_mc: int = 8192, n_iter: int = 30
) -> Tensor:
    """S (Tensor[d, d] float64) with E[u uᵀ] = Σ for u = z S / |z S|, z ~ N(0, I): fixed-point iteration
    on the eigen-scales (the direction second moment is diagonal in Σ's eigenbasis by symmetry), with a
    fixed Monte-Carlo sample of n_mc Gaussian draws (relative error ~1/sqrt(n_mc)) over the r non-zero
    eigenvalues only (r <= rows of the reference), so the cost is O(n_iter · n_mc · r)."""
    vals, vecs = eig
    lam = vals.clamp_min(0)
    keep = lam > 1e-10 * float(lam.max())
    lam_k = lam[keep] / lam[keep].sum()
    scale2 = lam_k.clone()
    g2 = torch.randn(n_mc, lam_k.numel(), generator=torch.Generator().manual_seed(0x51D), dtype=torch.float64) ** 2
    for _ in range(n_iter):
        w = g2 * scale2
        m = (w / w.sum(dim=1, keepdim=True)).mean(dim=0)
        scale2 = scale2 * lam_k / m.clamp_min(1e-300)
        scale2 = scale2 / scale2.sum()
    v = vecs[:, keep]
    return (v * scale2.sqrt()) @ v.T


def anisotropic_directions(
    reference: Tensor, n: int, *, seed: int = 0, device: str | torch.device = "cpu"
) -> Tensor:
    """n random directions Tensor[n, d] (float32, unnormalised) drawn from N(0, Σ), Σ = ``second_moment(reference)``.

    ``reference``: Tensor[m, d], the dictionary whose spectrum and subspace the null must share (for the a->b
    direction of a comparison, b's rows: the target's). Each draw is z S with z ~ N(0, I_d), seeded, and
    S = V diag(s) Vᵀ in Σ's eigenbasis V, the scales s chosen so that the *directions* z S / |z S| have second
    moment Σ (a plain Σ^(1/2) gives Gaussian vectors with second moment Σ, whose directions are less
    concentrated than Σ once normalised: unrelated dictionaries would then sit above their null).
    Memory is O(n·d + d²). The draws share no direction with ``reference`` beyond what its second moment
    implies, which is what "b shares no feature with a" means for a dictionary shaped like b.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    root = _direction_matched_root(_eigen_second_moment(reference)).float()
    gen = torch.Generator().manual_seed((seed * 1_000_003 + 0xA5150) % (2**63))
    z = torch.randn(n, root.shape[0], generator=gen)
    return (z @ root).to(device)


def covariance_matched_activations(x: Tensor, n: int | None = None, *, seed: int = 0) -> Tensor:
    """Gaussian activations Tensor[n, d] with the mean and covariance of ``x``: Tensor[m, d], independent of it.

    The null for activation metrics (CKA, code correlation): a second model whose activations have the same
    first two moments as the real one but carry no token-by-token relation to it. ``n`` defaults to m.
    """
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"covariance_matched_activations needs Tensor[m >= 2, d]; got shape {tuple(x.shape)}")
    n = x.shape[0] if n is None else n
    xd = x.detach().double()
    mean = xd.mean(0)
    cov = torch.cov(xd.T)
    root = _sqrt_psd(cov)
    gen = torch.Generator().manual_seed((seed * 1_000_003 + 0xC0FA) % (2**63))
    z = torch.randn(n, x.shape[1], generator=gen, dtype=torch.float64)
    return (z @ root + mean).float()


def anisotropic_random_sae_like(
    sae_or_folder: Any, seed: int = 0, *, out_dir: str | os.PathLike[str] | None = None
) -> Any:
    """An SAE of the same class, shapes and biases as the given one, whose latent directions are random.

    The floor of a precision sweep: what an SAE with the real one's decoder spectrum, norms and biases but no
    learned feature scores. Built as:

    - ``W_dec``: rows drawn by :func:`anisotropic_directions` from the real decoder's second moment, each
      rescaled to the norm of a randomly chosen real row (unit for SAELens's normalised decoders);
    - ``W_enc``: the new decoder's transpose, each column rescaled to the norm of the matching real encoder
      column (so pre-activations have the real scale);
    - ``b_dec``: the real one (the activations' centre is not a feature);
    - every other per-latent parameter (``b_enc``, JumpReLU ``threshold``, gated ``b_gate``/``b_mag``/
      ``r_mag``...): the real values under the same random permutation of latents, keeping their distribution.

    ``sae_or_folder``: a SAELens ``SAE`` or a checkpoint folder. With ``out_dir`` the SAE is also saved there
    (``save_model``, written to a temporary folder and renamed). Returns the new SAE (on CPU).
    """
    import copy

    from sae_lens import SAE

    if isinstance(sae_or_folder, (str, os.PathLike)):
        import qsae_lens.training  # noqa: F401 - registers qsae_lens architectures

        folder = Path(sae_or_folder)
        if not (folder / "cfg.json").is_file():
            raise FileNotFoundError(f"no SAELens checkpoint (cfg.json) in {folder}")
        real = SAE.load_from_disk(folder, device="cpu")
    elif isinstance(sae_or_folder, torch.nn.Module):
        real = sae_or_folder
    else:
        raise TypeError(f"expected an SAE or a checkpoint folder, got {type(sae_or_folder).__name__}")
    fake = copy.deepcopy(real).to("cpu")
    w_dec = real.W_dec.detach().float().cpu()
    d_sae, d_in = w_dec.shape
    gen = torch.Generator().manual_seed((seed * 1_000_003 + 0xF100) % (2**63))
    perm = torch.randperm(d_sae, generator=gen)
    new_dirs = anisotropic_directions(w_dec, d_sae, seed=seed)
    new_dirs = new_dirs / new_dirs.norm(dim=1, keepdim=True).clamp_min(1e-12)
    new_dec = new_dirs * w_dec.norm(dim=1, keepdim=True)[perm]
    state = {}
    for name, t in real.state_dict().items():
        t = t.detach().cpu()
        if name == "W_dec":
            state[name] = new_dec.to(t.dtype)
        elif name == "W_enc" and t.shape == (d_in, d_sae):
            col_norms = t.float().norm(dim=0)[perm]
            state[name] = (new_dirs.T * col_norms).to(t.dtype)
        elif name == "b_dec":
            state[name] = t.clone()
        elif t.ndim >= 1 and t.shape[-1] == d_sae:
            state[name] = t[..., perm].clone()
        else:
            state[name] = t.clone()
    fake.load_state_dict(state)
    if out_dir is not None:
        from qsae_lens._io import atomic_dir

        with atomic_dir(out_dir, replace=True) as tmp:
            fake.save_model(str(tmp))
    return fake
