"""Seeds as the unit of replication: a precision's effect against the seed-to-seed ceiling, with honest intervals.

A comparison of two trained SAEs varies with their seeds far more than with which latents one averages over,
so a CI that resamples the latents of one trained pair (about +-0.006 in the default sweep) holds none of
the run-to-run variance. These plain functions take *per-pair* values of one metric:

- ``ceiling[(s, s')]``: Tensor[n_latents] for each pair of baseline-precision SAEs with seeds s != s';
- ``cross[(s, t)]``: Tensor[n_latents] for each (baseline seed s, precision seed t) pair;

and return the precision's value (mean over cross pairs of the per-pair mean), the ceiling (mean over
baseline pairs), their difference (the effect), a 95% CI of the effect from a bootstrap whose unit is the
seed (resample baseline seeds and precision seeds with replacement; each pair enters by its mean over
latents, which already carries the latent noise, so latents are not resampled again), and a one-sided p-value from a permutation test that exchanges precision labels across seeds.

Cross pairs with the same seed (s == t) share the init and the data order, so they are more alike than any
ceiling pair (which has s != s'); by default they are left out so that both sides compare SAEs of different
seeds (``exclude_same_seed``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "SeedEffect",
    "SharingBar",
    "seed_effect",
    "seed_bootstrap_effect",
    "hierarchical_bootstrap_effect",
    "seed_label_permutation_test",
    "sharing_bar",
    "format_p_value",
]

Pairs = Mapping[tuple[int, int], Tensor]
"""Per-pair per-latent values: ``{(seed_a, seed_b): Tensor[n_latents]}``."""


class SeedEffect(NamedTuple):
    """A precision's effect on one metric, with seeds as the unit of replication."""

    value: float
    """Mean over (baseline seed, precision seed) pairs of the per-pair mean over latents."""
    ceiling: float
    """Mean over baseline seed pairs (s != s') of the per-pair mean: what a second baseline seed gives."""
    effect: float
    """``value - ceiling`` (negative: the precision moves the SAE more than a change of seed does)."""
    ci_low: float
    """Lower end of the 95% seed-bootstrap interval of ``effect`` (unit: per-pair means; seeds resampled)."""
    ci_high: float
    """Upper end of that interval."""
    p_value: float
    """One-sided permutation p of "effect < 0" (precision pairs less alike than baseline pairs),
    exchanging precision labels across seeds."""
    n_pairs: int
    """Number of (baseline seed, precision seed) pairs used."""
    n_ceiling_pairs: int
    """Number of baseline seed pairs used."""
    ceiling_values: tuple[float, ...]
    """Per-pair means of the baseline seed pairs (the ceiling distribution)."""
    p_value_text: str
    """``p_value`` for display: "< 1/(m+1)" style when it sits at the smallest value the test can give."""
    unit: str = "seed bootstrap: baseline and precision seeds with replacement; unit = per-pair mean over latents"
    alternative: str = "one-sided: effect < 0"

    def to_dict(self) -> dict[str, object]:
        """The ``report.json["precision_effects"][precision][metric]`` record (plain JSON)."""
        out = self._asdict()
        out["ceiling_values"] = list(self.ceiling_values)
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}

    def __repr__(self) -> str:
        return (
            f"SeedEffect(value={self.value:.4f}, ceiling={self.ceiling:.4f}, effect={self.effect:+.4f} "
            f"[{self.ci_low:+.4f}, {self.ci_high:+.4f}], p={self.p_value_text} ({self.alternative}), "
            f"{self.n_pairs} pairs vs {self.n_ceiling_pairs} ceiling pairs)"
        )


class SharingBar(NamedTuple):
    """Do the baseline seed pairs share features clearly above the anisotropic null?"""

    cleared: bool
    """True when every baseline seed pair's statistic exceeds its null at p < ``alpha`` (one-sided)."""
    statistic: str
    """What was tested, e.g. "fraction of latents matched above 0.5"."""
    observed: tuple[float, ...]
    """Per baseline seed pair: the statistic."""
    null: tuple[float, ...]
    """Per baseline seed pair: the statistic against the null SAE."""
    p_values: tuple[float, ...]
    """Per baseline seed pair: one-sided p of observed > null (Monte-Carlo rank among null draws, or a paired
    sign-flip test over latents with one draw)."""
    alpha: float
    message: str
    """One line for the report: what was found."""
    mnn_observed: tuple[float, ...] = ()
    """Per baseline seed pair: mutual-nearest-neighbour fraction (empty when not tested)."""
    mnn_null: tuple[float, ...] = ()
    """Per baseline seed pair: the MNN fraction's null (mean over draws)."""
    mnn_p_values: tuple[float, ...] = ()
    """Per baseline seed pair: one-sided Monte-Carlo p of MNN observed > null."""


def format_p_value(p: float, n_resamples: int, *, exact_count: int | None = None) -> str:
    """``p`` as text; at the test's floor (1/(m+1) for m random resamples, 1/N for N enumerated
    relabelings) it reads "< 1/(m+1)" style, never as a value that looks like a discovery by itself."""
    if not math.isfinite(p):
        return "n/a"
    floor = 1.0 / exact_count if exact_count else 1.0 / (n_resamples + 1)
    if p <= floor * (1 + 1e-9):
        return f"<= 1/{exact_count}" if exact_count else f"< 1/{n_resamples + 1}"
    return f"{p:.3g}"


def _check_pairs(pairs: Pairs, name: str) -> dict[tuple[int, int], Tensor]:
    if not pairs:
        raise ValueError(f"{name}: no pairs given; need per-latent values for at least one pair of seeds")
    out = {}
    for key, v in pairs.items():
        t = torch.as_tensor(v).detach().double().flatten().cpu()
        t = t[torch.isfinite(t)]
        if t.numel() < 1:
            raise ValueError(f"{name}[{key}]: no finite per-latent values")
        out[(int(key[0]), int(key[1]))] = t
    return out


def _select(ceiling: Pairs, cross: Pairs, exclude_same_seed: bool):
    ceil = {k: v for k, v in _check_pairs(ceiling, "ceiling").items() if k[0] != k[1]}
    if not ceil:
        raise ValueError("ceiling: needs at least one pair of two different baseline seeds")
    crs = _check_pairs(cross, "cross")
    if exclude_same_seed:
        crs = {k: v for k, v in crs.items() if k[0] != k[1]} or crs
    return ceil, crs


def seed_bootstrap_effect(
    ceiling: Pairs, cross: Pairs, *, n_resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, Tensor]:
    """Percentile CI of ``mean(cross pairs) - mean(ceiling pairs)`` resampling seeds; the unit is the pair mean.

    Each resample draws the baseline seeds and the precision seeds with replacement and averages the
    *per-pair means* (mean over latents) of the pairs the drawn seeds form; ceiling pairs of a seed drawn with
    itself do not exist and are skipped. Latents are not resampled inside the pairs: a pair mean already
    carries its latent-sampling noise, so resampling latents again inside resampled seeds counts that
    variance twice (the two-stage version covered a known effect 0.997 of the time instead of 0.95; this one
    0.960 with 8 + 8 seeds and 0.951 with 4 + 4, 1000 simulated repeats each, tests/test_seeds.py). Resamples
    with no valid pair on either side are dropped. Returns (low, high, effects: Tensor[n_valid] float64).
    Memory: O(n_resamples x n_seeds²).
    """
    b_seeds = sorted({s for k in ceiling for s in k} | {k[0] for k in cross})
    p_seeds = sorted({k[1] for k in cross})
    bi = {s: i for i, s in enumerate(b_seeds)}
    pi = {s: i for i, s in enumerate(p_seeds)}
    gen = torch.Generator().manual_seed(seed)
    nb, npr = len(b_seeds), len(p_seeds)
    nan = float("nan")
    # pair means: M[i, j] for every pair present (NaN where absent)
    m_ceil = torch.full((nb, nb), nan, dtype=torch.float64)
    m_cross = torch.full((nb, npr), nan, dtype=torch.float64)
    for (s, t), v in ceiling.items():
        m_ceil[bi[s], bi[t]] = m_ceil[bi[t], bi[s]] = torch.as_tensor(v).double().mean()
    for (s, t), v in cross.items():
        m_cross[bi[s], pi[t]] = torch.as_tensor(v).double().mean()
    draw_b = torch.randint(nb, (n_resamples, nb), generator=gen)
    draw_p = torch.randint(npr, (n_resamples, npr), generator=gen)
    ceil_vals = m_ceil[draw_b[:, :, None], draw_b[:, None, :]]  # [R, nb, nb]
    ceil_vals = ceil_vals.masked_fill(draw_b[:, :, None] == draw_b[:, None, :], nan)
    cross_vals = m_cross[draw_b[:, :, None], draw_p[:, None, :]]  # [R, nb, np]
    effects = cross_vals.nanmean(dim=(1, 2)) - ceil_vals.nanmean(dim=(1, 2))
    effects = effects[torch.isfinite(effects)]
    if effects.numel() < 10:
        return nan, nan, effects
    alpha = (1 - level) / 2
    q = torch.quantile(effects, torch.tensor([alpha, 1 - alpha], dtype=torch.float64))
    return float(q[0]), float(q[1]), effects


hierarchical_bootstrap_effect = seed_bootstrap_effect
"""Former name of :func:`seed_bootstrap_effect` (the latent stage was dropped: it counted latent noise twice)."""


def seed_label_permutation_test(
    ceiling: Pairs,
    cross: Pairs,
    within: Pairs | None = None,
    *,
    n_permutations: int = 2000,
    seed: int = 0,
) -> tuple[float, int | None, int]:
    """One-sided p of "precision pairs are less alike than baseline pairs", exchanging precision labels.

    Under H0 (the precision changes nothing) the baseline and precision SAEs are exchangeable. With
    ``within`` (pairs of two precision SAEs) every pair among the pooled SAEs is known, so the test relabels
    SAEs: each relabeling picks which SAEs are "baseline", recomputes mean(cross) - mean(ceiling) and counts
    those at or below the observed one. Without ``within``, the per-pair means are relabeled instead (ceiling
    vs cross, keeping their counts), an approximation that treats pairs as exchangeable. Relabelings are
    enumerated when there are at most ``n_permutations`` of them (p = count / N, floor 1/N), else drawn at
    random (p = (count + 1) / (m + 1)). Returns (p, N enumerated or None, m drawn).
    """
    ceil_means = {k: float(v.mean()) for k, v in ceiling.items()}
    cross_means = {k: float(v.mean()) for k, v in cross.items()}
    observed = _mean(cross_means.values()) - _mean(ceil_means.values())
    tol = 1e-12 * max(1.0, abs(observed))
    gen = torch.Generator().manual_seed(seed)
    if within:
        # SAE nodes: ("b", s) and ("p", t); the similarity of every pair among them
        sim: dict[frozenset, float] = {}
        for (s, t), m in ceil_means.items():
            sim[frozenset({("b", s), ("b", t)})] = m
        for (s, t), m in cross_means.items():
            sim[frozenset({("b", s), ("p", t)})] = m
        for (s, t), v in within.items():
            sim[frozenset({("p", s), ("p", t)})] = float(torch.as_tensor(v).double().mean())
        nodes = sorted({n for key in sim for n in key})
        n_base = len({n for n in nodes if n[0] == "b"})

        def stat(base: set) -> float:
            c, x = [], []
            for key, m in sim.items():
                k = tuple(key)
                if len(k) < 2:
                    continue
                inside = sum(n in base for n in k)
                (c if inside == 2 else x if inside == 1 else []).append(m)
            return _mean(x) - _mean(c) if c and x else math.nan

        combos = math.comb(len(nodes), n_base)
        if combos <= n_permutations:
            stats = [stat(set(c)) for c in itertools.combinations(nodes, n_base)]
            stats = [s for s in stats if math.isfinite(s)]
            return sum(s <= observed + tol for s in stats) / len(stats), len(stats), 0
        stats = []
        for _ in range(n_permutations):
            perm = torch.randperm(len(nodes), generator=gen)[:n_base].tolist()
            stats.append(stat({nodes[i] for i in perm}))
        stats = [s for s in stats if math.isfinite(s)]
        return (sum(s <= observed + tol for s in stats) + 1) / (len(stats) + 1), None, len(stats)
    values = torch.tensor(list(ceil_means.values()) + list(cross_means.values()), dtype=torch.float64)
    n_c = len(ceil_means)
    total = values.numel()
    combos = math.comb(total, n_c)
    if combos <= n_permutations:
        idx = torch.tensor(list(itertools.combinations(range(total), n_c)), dtype=torch.long)
        mask = torch.zeros(idx.shape[0], total, dtype=torch.bool)
        mask.scatter_(1, idx, True)
        stats = _relabelled(values, mask)
        return float((stats <= observed + tol).double().mean()), int(idx.shape[0]), 0
    keys = torch.rand(n_permutations, total, generator=gen)
    mask = torch.zeros(n_permutations, total, dtype=torch.bool)
    mask.scatter_(1, keys.argsort(dim=1)[:, :n_c], True)
    stats = _relabelled(values, mask)
    return float(((stats <= observed + tol).sum() + 1) / (n_permutations + 1)), None, n_permutations


def _relabelled(values: Tensor, ceiling_mask: Tensor) -> Tensor:
    """mean(values not in mask) - mean(values in mask) for each row of ``ceiling_mask``: Tensor[R, n]."""
    m = ceiling_mask.double()
    n_c = m.sum(1)
    return (values @ (1 - m).T) / (values.numel() - n_c) - (values @ m.T) / n_c


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else math.nan


def seed_effect(
    ceiling: Pairs,
    cross: Pairs,
    *,
    within: Pairs | None = None,
    n_bootstrap: int = 2000,
    n_permutations: int = 2000,
    seed: int = 0,
    exclude_same_seed: bool = True,
) -> SeedEffect:
    """A precision's effect on one metric with seeds as the replication unit (see the module docstring).

    ``ceiling``: {(s, s'): Tensor[n_latents]} per-latent values of the metric for baseline seed pairs;
    ``cross``: {(s, t): Tensor[n_latents]} for (baseline seed s, precision seed t) pairs; ``within``
    (optional): {(t, t'): Tensor} for precision seed pairs, which lets the permutation test relabel SAEs
    exactly. Returns a :class:`SeedEffect`.
    """
    ceil, crs = _select(ceiling, cross, exclude_same_seed)
    within_c = _check_pairs(within, "within") if within else None
    if within_c:
        within_c = {k: v for k, v in within_c.items() if k[0] != k[1]} or None
    ceil_means = [float(v.mean()) for v in ceil.values()]
    cross_means = [float(v.mean()) for v in crs.values()]
    value, ceiling_value = _mean(cross_means), _mean(ceil_means)
    lo, hi, _ = seed_bootstrap_effect(ceil, crs, n_resamples=n_bootstrap, seed=seed)
    p, exact, m = seed_label_permutation_test(ceil, crs, within_c, n_permutations=n_permutations, seed=seed)
    return SeedEffect(
        value=value,
        ceiling=ceiling_value,
        effect=value - ceiling_value,
        ci_low=lo,
        ci_high=hi,
        p_value=p,
        n_pairs=len(crs),
        n_ceiling_pairs=len(ceil),
        ceiling_values=tuple(ceil_means),
        p_value_text=format_p_value(p, m, exact_count=exact),
    )


def _fraction_test(observed: Tensor, null: Tensor, *, n_permutations: int, seed: int) -> tuple[float, float, float]:
    """(observed fraction, null fraction, one-sided p of observed > null) for 0/1 indicators Tensor[n].

    ``null``: Tensor[M, n] for M null draws (p = Monte-Carlo rank (1 + #{draws >= observed}) / (M + 1),
    null = mean over draws) or Tensor[n] for one (paired sign-flip test over latents)."""
    from qsae_lens.compare.stats import paired_permutation_test

    fraction = float(observed.mean())
    if null.ndim == 2:
        draws = null.mean(dim=1)
        return fraction, float(draws.mean()), (1 + int((draws >= fraction).sum())) / (draws.numel() + 1)
    m = min(observed.numel(), null.numel())
    p = paired_permutation_test(observed[:m], null[:m], n_permutations=n_permutations, seed=seed, alternative="greater")
    return fraction, float(null.mean()), float(p)


def sharing_bar(
    observed: Pairs,
    null: Pairs,
    *,
    threshold: float = 0.5,
    alpha: float = 0.01,
    n_permutations: int = 10_000,
    seed: int = 0,
    mnn_observed: Pairs | None = None,
    mnn_null: Pairs | None = None,
) -> SharingBar:
    """Do the baseline seed pairs share features clearly above the anisotropic null?

    ``observed[(s, s')]``: Tensor[n] matched cosines of a baseline seed pair; ``null[(s, s')]``: matched
    cosines of seed s against anisotropy-matched random dictionaries (mirror images of s',
    ``nulls.anisotropic_directions``), either Tensor[M, n] for M independent draws or Tensor[n] for one.
    The statistic is the fraction of latents matched above ``threshold``. With M draws each pair's p is
    the Monte-Carlo rank (1 + #{draws >= observed}) / (M + 1), whose unit is the null dictionary (its floor
    is 1/(M + 1), so M >= 1/alpha is needed to clear the bar); with one draw, a paired sign-flip test over
    latents (overconfident near the null: docs/compare.md). The bar is cleared when every pair has
    p < ``alpha`` and a higher fraction than its null's mean.

    ``mnn_observed[(s, s')]`` (Tensor[n] 0/1: latent is a mutual nearest neighbour) and ``mnn_null[(s, s')]``
    (Tensor[M, n], the same against each null draw), when given, add a second requirement: the MNN
    fraction must beat its null the same way. The matched fraction alone is a significance floor, not a
    size: a mirror image almost never has a latent matched above 0.5, so one shared latent would clear it;
    MNN asks that the dictionaries correspond as wholes (docs/sweep.md, the 256-latent row).
    """
    obs = _check_pairs(observed, "observed")
    missing = set(obs) - set(null)
    if missing:
        raise ValueError(f"null: no null values for seed pairs {sorted(missing)}")
    tests = [_fraction_test((obs[k] > threshold).double(), (torch.as_tensor(null[k]) > threshold).double(),
                            n_permutations=n_permutations, seed=seed) for k in sorted(obs)]  # fmt: skip
    fr_o, fr_n, ps = (list(x) for x in zip(*tests))
    mnn_o, mnn_n, mnn_p = [], [], []
    if mnn_observed is not None:
        if mnn_null is None or set(obs) - set(mnn_null) or set(obs) - set(mnn_observed):
            raise ValueError("mnn_observed and mnn_null must both be given, for every seed pair of observed")
        mnn_tests = [_fraction_test(torch.as_tensor(mnn_observed[k]).double(), torch.as_tensor(mnn_null[k]).double(),
                                    n_permutations=n_permutations, seed=seed) for k in sorted(obs)]  # fmt: skip
        mnn_o, mnn_n, mnn_p = (list(x) for x in zip(*mnn_tests))
    cleared = all(p < alpha and a > b for p, a, b in zip(ps, fr_o, fr_n)) and all(
        p < alpha and a > b for p, a, b in zip(mnn_p, mnn_o, mnn_n)
    )
    stat = f"fraction of latents matched above {threshold}" + (" and mutual-nearest-neighbour fraction" if mnn_o else "")
    mnn_text = (
        f"; MNN {min(mnn_o):.3f}-{max(mnn_o):.3f} vs null {max(mnn_n):.3f} or less (p {', '.join(f'{x:.2g}' for x in mnn_p)})"
        if mnn_o else ""
    )  # fmt: skip
    if cleared:
        msg = (
            f"Baseline seed pairs share features above the anisotropic null: fraction of latents matched above "
            f"{threshold} {min(fr_o):.3f}-{max(fr_o):.3f} vs null {max(fr_n):.3f} or less{mnn_text}; p < {alpha} "
            f"for every pair."
        )
    else:
        msg = (
            f"The SAEs are too undertrained for any conclusion: baseline seed pairs do not share features "
            f"clearly above the anisotropic null (fraction of latents matched above {threshold} "
            f"{', '.join(f'{x:.3f}' for x in fr_o)} vs null {', '.join(f'{x:.3f}' for x in fr_n)}; p "
            f"{', '.join(f'{x:.2g}' for x in ps)}{mnn_text}; need p < {alpha} for every pair)."
        )
    return SharingBar(cleared, stat, tuple(fr_o), tuple(fr_n), tuple(ps), alpha, msg,
                      tuple(mnn_o), tuple(mnn_n), tuple(mnn_p))  # fmt: skip
