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
anisotropic null is the target dictionary b mirrored across random axes of its own shape
(:func:`anisotropic_directions`): b R with R = I + V (D - I) Vᵀ, V the eigenbasis of b's shape
(:func:`reflection_basis`) and D random signs. The mirror image keeps b's subspace, its spectrum along V
and every norm and angle among its rows, so it differs from b only in where each latent points; a
dictionary that shares no feature with b matches it as well as it matches b. (An earlier version drew
Gaussian directions with b's second moment: those null rows are more alike than b's own rows, their best
match sits lower, and unrelated dictionaries beat the null at alpha 0.05 in 12-18% of repeats; measured
in docs/compare.md.) :func:`anisotropic_random_sae_like` builds a whole mirrored SAE (the sweep's floor),
and :func:`covariance_matched_activations` is the matching null for activation metrics.
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
    "ANISOTROPIC_NULL_VERSION",
    "second_moment",
    "reflection_basis",
    "reflect",
    "anisotropic_directions",
    "anisotropic_random_sae_like",
    "covariance_matched_activations",
]

#: Version of the anisotropic null's construction, part of the inputs a sweep records for every result
#: computed with it, so that results of an older null are recomputed, not reused (2: mirror images of the
#: target; 1: Gaussian directions with its second moment).
ANISOTROPIC_NULL_VERSION = 2

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


def reflection_basis(reference: Tensor, *, max_rows: int | None = None, seed: int = 0) -> Tensor:
    """Orthonormal columns V (Tensor[d, r], float64) spanning ``reference``'s rows, in the eigenbasis of its shape.

    ``reference``: Tensor[m, d]. r is the rank of the rows (singular values above 1e-6 of the largest).
    With m <= r (fewer rows than dimensions they span) V is the right singular basis of the rows as given;
    with m > r it is the eigenbasis of Tyler's shape matrix of the unit rows within their span (the maximum-
    likelihood scatter of directions, the fixed point Σ ∝ Σ_j u_j u_jᵀ / (u_jᵀ Σ⁻¹ u_j)), which a dictionary
    of unit rows with an anisotropic spectrum estimates without the bias that row normalisation puts into
    the plain second moment. At most ``max_rows`` rows (default max(4r, 2048), a seeded random subset) enter
    the fixed point, which costs O(iterations · rows · r²); the span uses all rows.
    """
    if reference.ndim != 2 or reference.shape[0] < 1 or reference.shape[1] < 2:
        raise ValueError(f"reflection_basis needs a Tensor[m, d] with m >= 1, d >= 2; got {tuple(reference.shape)}")
    w = reference.detach().double().cpu()
    w = w[w.norm(dim=1) > 0]
    if w.shape[0] == 0:
        raise ValueError("reflection_basis: every row of the reference is zero")
    if w.shape[0] <= w.shape[1]:
        _, sv, vh = torch.linalg.svd(w, full_matrices=False)
    else:
        vals, vecs = torch.linalg.eigh(w.T @ w)
        sv, vh = vals.clamp_min(0).sqrt().flip(0), vecs.flip(1).T
    span = vh[sv > 1e-6 * float(sv[0])]  # Tensor[r, d]
    r = span.shape[0]
    if w.shape[0] <= r:
        return span.T.contiguous()
    max_rows = max(4 * r, 2048) if max_rows is None else max_rows
    if w.shape[0] > max_rows:
        w = w[torch.randperm(w.shape[0], generator=torch.Generator().manual_seed(seed))[:max_rows]]
    c = w @ span.T
    c = c / c.norm(dim=1, keepdim=True).clamp_min(1e-300)  # unit rows, in span coordinates
    shape = c.T @ c / c.shape[0]
    for _ in range(100):
        weights = 1.0 / (c * torch.linalg.solve(shape, c.T).T).sum(dim=1).clamp_min(1e-300)
        new = (c * weights[:, None]).T @ c
        new = new / torch.trace(new)
        converged = float((new - shape).abs().max()) < 1e-9
        shape = new
        if converged:
            break
    return span.T @ torch.linalg.eigh(shape)[1]


def reflect(
    w: Tensor, basis: Tensor, *, seed: int = 0, block_size: int = 8192, device: str | torch.device = "cpu"
) -> Tensor:
    """``w`` (Tensor[m, d]) mirrored across a random set of the axes ``basis`` (Tensor[d, r], orthonormal):
    w R with R = I + V (D - I) Vᵀ, D a seeded diagonal of random signs. R is orthogonal and symmetric, so the
    rows keep their norms and mutual angles (w Rᵀ R wᵀ = w wᵀ) and the part of w outside V is unchanged.
    Returns float32, ``block_size`` rows at a time (memory O(block_size · d + d · r))."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + 0xA5150) % (2**63))
    flip = (torch.randint(0, 2, (basis.shape[1],), generator=gen) * 2 - 1).double() - 1.0  # D - I: 0 or -2
    v = basis.double()
    out = []
    for start in range(0, w.shape[0], block_size):
        x = w[start : start + block_size].detach().double().cpu()
        out.append((x + ((x @ v) * flip) @ v.T).float())
    return torch.cat(out).to(device)


def anisotropic_directions(
    reference: Tensor,
    n: int | None = None,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    basis: Tensor | None = None,
) -> Tensor:
    """A random dictionary Tensor[n, d] (float32) with ``reference``'s spectrum and subspace and none of its features.

    ``reference``: Tensor[m, d], the dictionary whose shape the null must share (for the a->b direction of a
    comparison, b's rows: the target's). The draw is ``reference`` mirrored across random axes of its own
    shape (:func:`reflection_basis`, :func:`reflect`): the rows keep their norms and mutual angles, the
    dictionary its subspace and second moment along those axes, but each row's direction is scrambled
    across the axes, so a dictionary that shares no feature with ``reference`` matches the draw as well as
    it matches ``reference`` itself. For a dictionary of Gaussian rows (any covariance) the mirror image has
    exactly the original's law, and so has one of unit rows spread evenly over a subspace: the comparison
    against it is then an exact randomisation test (measured false-positive rates in docs/compare.md).
    ``n`` (default m): with n != m, rows of independent mirror images, a seeded random subset.
    ``basis``: ``reflection_basis(reference)`` when the caller already has it (the fit is the costly part).
    """
    m = reference.shape[0]
    n = m if n is None else n
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    basis = reflection_basis(reference, seed=seed) if basis is None else basis
    if n == m:
        return reflect(reference, basis, seed=seed, device=device)
    copies = torch.cat([reflect(reference, basis, seed=seed + 7919 * i) for i in range(-(-n // m))])
    pick = torch.randperm(copies.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
    return copies[pick].to(device)


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
    learned feature scores. It is the real SAE seen in a mirror: with R the random reflection of
    :func:`anisotropic_directions` (axes from the real decoder's shape, seeded by ``seed``),

    - ``W_dec`` -> ``W_dec R`` (row norms, mutual angles and subspace kept, directions scrambled);
    - ``W_enc`` -> ``R W_enc``, so the fake encodes ``x R`` exactly as the real one encodes ``x``;
    - ``b_dec``, ``b_enc`` and every other per-latent parameter (JumpReLU ``threshold``, gated ``b_gate``/
      ``b_mag``/``r_mag``...): the real values, attached to the same latents.

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
    basis = reflection_basis(w_dec, seed=seed)
    state = {}
    for name, t in real.state_dict().items():
        t = t.detach().cpu()
        if name == "W_dec":
            state[name] = reflect(t, basis, seed=seed).to(t.dtype)
        elif name == "W_enc" and t.shape == (d_in, d_sae):
            state[name] = reflect(t.T, basis, seed=seed).T.contiguous().to(t.dtype)  # R W_enc, the same mirror
        else:
            state[name] = t.clone()
    fake.load_state_dict(state)
    if out_dir is not None:
        from qsae_lens._io import atomic_dir

        with atomic_dir(out_dir, replace=True) as tmp:
            fake.save_model(str(tmp))
    return fake
