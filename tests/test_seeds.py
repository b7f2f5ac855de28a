"""Seed-level statistics (qsae_lens.compare.seeds) and the sweep's "seeds" step, against known answers."""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import pytest
import torch

from qsae_lens.compare.seeds import (
    format_p_value,
    seed_bootstrap_effect,
    seed_effect,
    seed_label_permutation_test,
    sharing_bar,
)


def _design(nb: int, npr: int, *, delta: float, rep: int, n_lat: int = 64, tau: float = 0.02, sigma: float = 0.2):
    """Pair values with a known effect: value = 0.5 + seed effects + (delta for cross pairs) + latent noise."""
    g = torch.Generator().manual_seed(1000 + rep)
    ub, up = tau * torch.randn(nb, generator=g), tau * torch.randn(npr, generator=g)
    ceil = {(i, j): 0.5 + ub[i] + ub[j] + sigma * torch.randn(n_lat, generator=g) for i, j in itertools.combinations(range(nb), 2)}
    cross = {(i, j): 0.5 + delta + ub[i] + up[j] + sigma * torch.randn(n_lat, generator=g)
             for i in range(nb) for j in range(npr) if i != j}
    return ceil, cross


def test_effect_is_the_difference_of_pair_means_written_out():
    ceil = {(0, 1): torch.tensor([0.6, 0.8]), (0, 2): torch.tensor([0.5, 0.5]), (1, 2): torch.tensor([0.7, 0.9])}
    cross = {(0, 1): torch.tensor([0.4, 0.6]), (1, 0): torch.tensor([0.3, 0.3]), (0, 0): torch.tensor([0.99, 0.99])}
    e = seed_effect(ceil, cross, n_bootstrap=200, n_permutations=200)
    # same-seed pairs (0, 0) are left out; ceiling = mean(0.7, 0.5, 0.8), value = mean(0.5, 0.3)
    assert e.ceiling == pytest.approx((0.7 + 0.5 + 0.8) / 3)
    assert e.value == pytest.approx(0.4)
    assert e.effect == pytest.approx(0.4 - 2.0 / 3)
    assert e.n_pairs == 2 and e.n_ceiling_pairs == 3
    assert e.alternative.startswith("one-sided")
    # exact relabeling of the 5 pair means [0.7, 0.5, 0.8 | 0.5, 0.3] with 3 "ceiling" labels: C(5, 3) = 10
    # relabelings; as extreme as observed: the observed one and the one swapping the two 0.5s, so p = 2/10
    assert e.p_value == pytest.approx(2 / 10)
    assert e.p_value_text == "0.2"
    d = e.to_dict()
    assert set(d) >= {"value", "ceiling", "effect", "ci_low", "ci_high", "p_value", "n_pairs"}


def test_exact_sae_relabeling_counts_against_brute_force():
    """With precision-seed pairs given, the test relabels SAEs: C(6, 3) = 20 ways to pick the baseline."""
    ceil, cross = _design(3, 3, delta=-0.2, rep=0)
    within = {(i, j): 0.5 + 0.2 * torch.randn(64, generator=torch.Generator().manual_seed(i * 7 + j))
              for i, j in itertools.combinations(range(3), 2)}
    p, n_exact, _ = seed_label_permutation_test(ceil, cross, within, n_permutations=100)
    assert n_exact == 20
    # brute force: nodes b0..b2, p0..p2; similarity of every pair; statistic for every baseline choice
    sim = {}
    for (s, t), v in ceil.items():
        sim[frozenset({f"b{s}", f"b{t}"})] = float(v.mean())
    for (s, t), v in cross.items():
        sim[frozenset({f"b{s}", f"p{t}"})] = float(v.mean())
    for (s, t), v in within.items():
        sim[frozenset({f"p{s}", f"p{t}"})] = float(v.mean())
    nodes = ["b0", "b1", "b2", "p0", "p1", "p2"]

    def stat(base):
        c = [m for k, m in sim.items() if k <= set(base)]
        x = [m for k, m in sim.items() if len(k & set(base)) == 1]
        return sum(x) / len(x) - sum(c) / len(c)

    obs = stat(("b0", "b1", "b2"))
    stats = [stat(b) for b in itertools.combinations(nodes, 3)]
    assert p == pytest.approx(sum(s <= obs + 1e-12 for s in stats) / 20)


def test_p_value_floor_text():
    assert format_p_value(1 / 2001, 2000) == "< 1/2001"
    assert format_p_value(0.2, 2000) == "0.2"
    assert format_p_value(0.05, 0, exact_count=20) == "<= 1/20"


@pytest.mark.parametrize("n_seeds", [8, pytest.param(4, marks=pytest.mark.slow)])
def test_ci_coverage_with_a_known_effect(n_seeds):
    """95% seed-bootstrap intervals cover the true effect (-0.05) 93-97% of the time over 1000 simulated
    designs with seed-level and latent-level noise (measured 0.960 at 8 + 8 seeds, 0.951 at 4 + 4; the former
    two-stage bootstrap that also resampled latents gave 0.997). Binomial sd at 0.95 and 1000 repeats: 0.007."""
    reps, hits = 1000, 0
    for rep in range(reps):
        ceil, cross = _design(n_seeds, n_seeds, delta=-0.05, rep=rep)
        lo, hi, _ = seed_bootstrap_effect(ceil, cross, n_resamples=400, seed=rep)
        hits += lo <= -0.05 <= hi
    assert 0.93 <= hits / reps <= 0.97, hits / reps


def test_seed_bootstrap_resamples_pair_means_not_latents():
    """Pairs with equal means but different latent spreads give the same interval: latents are not resampled."""
    ceil, cross = _design(4, 4, delta=-0.05, rep=0)
    spread = {k: v.mean() + 10 * (v - v.mean()) for k, v in cross.items()}
    a, b = seed_bootstrap_effect(ceil, cross, n_resamples=300), seed_bootstrap_effect(ceil, spread, n_resamples=300)
    assert a[:2] == pytest.approx(b[:2], abs=1e-6)
    # a design with no seed variance at all: every resample gives the observed effect exactly
    flat_c = {k: torch.full((5,), 0.6) for k in ceil}
    flat_x = {k: torch.full((5,), 0.5) for k in cross}
    lo, hi, eff = seed_bootstrap_effect(flat_c, flat_x, n_resamples=300)
    assert lo == pytest.approx(-0.1) and hi == pytest.approx(-0.1)


def test_sharing_bar_separates_shared_from_unrelated():
    g = torch.Generator().manual_seed(0)
    null = {(0, 1): 0.2 + 0.05 * torch.randn(500, generator=g), (0, 2): 0.2 + 0.05 * torch.randn(500, generator=g)}
    shared = {k: torch.cat([torch.full((100,), 0.8), v[100:]]) for k, v in null.items()}
    unrelated = {k: 0.2 + 0.05 * torch.randn(500, generator=g) for k in null}
    bar = sharing_bar(shared, null, n_permutations=2000)
    assert bar.cleared and bar.observed == pytest.approx((0.2, 0.2)) and max(bar.p_values) < 0.01
    off = sharing_bar(unrelated, null, n_permutations=2000)
    assert not off.cleared and off.message.startswith("The SAEs are too undertrained")


def _topk(w_dec: torch.Tensor):
    from sae_lens import TopKSAE, TopKSAEConfig

    sae = TopKSAE(TopKSAEConfig(d_in=w_dec.shape[1], d_sae=w_dec.shape[0], k=4))
    with torch.no_grad():
        sae.W_dec.copy_(w_dec / w_dec.norm(dim=1, keepdim=True))
    return sae


def test_sweep_step_headline_and_withheld(tmp_path):
    """The step on real SAELens SAEs with planted structure: baseline seeds share 60% of their latents, the
    precision's SAEs share 30% with them, so the effect on the fraction matched above 0.5 is about -0.3."""
    from qsae_lens.sweep.plan import CellKey
    from qsae_lens.sweep.steps import seeds as step

    n, d = 128, 48
    g = torch.Generator().manual_seed(3)
    common = torch.randn(n, d, generator=g)

    def sae_sharing(frac: float):
        k = int(frac * n)
        own = torch.randn(n - k, d, generator=g)
        return _topk(torch.cat([common[:k] + 0.05 * torch.randn(k, d, generator=g), own]))

    saes = {}
    for s in range(3):
        saes[CellKey("fp32", 16, s)] = sae_sharing(0.6)
        saes[CellKey("nf4", 16, s)] = sae_sharing(0.3)
    for key, sae in saes.items():
        sae.save_model(str(key.dir(tmp_path)))
    plan = SimpleNamespace(config=SimpleNamespace(n_bootstrap=300, n_permutations=300, seed=0), out_dir=tmp_path,
                           layers=(16,), baseline="fp32", precision_names=["fp32", "nf4"],
                           step_dir=lambda name: tmp_path / name)
    result = step.run_step(plan, SimpleNamespace(saes=saes))
    e = result.effects["nf4"]["decoder_matched_fraction_above_0.5"]
    # shared latents of two fp32 seeds: 60%; of fp32 with nf4: 30% (their shared part is common[:0.3n])
    assert e["ceiling"] == pytest.approx(0.6, abs=0.03)
    assert e["value"] == pytest.approx(0.3, abs=0.03)
    assert e["ci_high"] < 0 and e["n_pairs"] == 6
    assert e["p_value"] == pytest.approx(1 / 20)  # the smallest p 3 + 3 seeds allow: the observed labeling
    section = step.report_section(result)
    assert section.order == 0 and "too undertrained" not in section.markdown
    assert "p (one-sided" in section.markdown

    # unrelated baseline seeds: the bar fails and the table is withheld
    for s in range(3):
        saes[CellKey("fp32", 16, s)] = sae_sharing(0.0)
        saes[CellKey("fp32", 16, s)].save_model(str(CellKey("fp32", 16, s).dir(tmp_path)))
    withheld = step.report_section(step.run_step(plan, SimpleNamespace(saes=saes)))
    assert withheld.markdown.startswith("The SAEs are too undertrained for any conclusion")
    assert withheld.data["headline_withheld"] and math.isfinite(withheld.data["floor"]["16"]["decoder_matched_cosine"])


def test_sharing_bar_monte_carlo_over_null_draws():
    """With M null draws per pair, p is the observed fraction's rank among the draws' fractions."""
    from qsae_lens.compare.seeds import sharing_bar

    n, m = 100, 99
    observed = {(0, 1): torch.cat([torch.full((20,), 0.9), torch.zeros(n - 20)])}  # fraction 0.20
    # draw i has (i % 30) latents above 0.5: fractions 0.00..0.29, 3 or 4 draws at each level
    draws = torch.zeros(m, n)
    for i in range(m):
        draws[i, : i % 30] = 0.9
    bar = sharing_bar(observed, {(0, 1): draws}, alpha=0.01)
    n_ge = sum(1 for i in range(m) if (i % 30) / n >= 0.20)  # draws at or above the observed fraction
    assert bar.p_values[0] == pytest.approx((1 + n_ge) / (m + 1))
    assert bar.null[0] == pytest.approx(sum(i % 30 for i in range(m)) / (m * n))
    assert not bar.cleared
    far = {(0, 1): torch.full((n,), 0.9)}
    assert sharing_bar(far, {(0, 1): draws}, alpha=0.05).cleared
    # 99 draws cannot clear alpha 0.01: p's floor is 1/100, not below it
    floor = sharing_bar(far, {(0, 1): draws}, alpha=0.01)
    assert floor.p_values[0] == pytest.approx(1 / (m + 1)) and not floor.cleared


def test_sharing_bar_needs_mnn_too_when_given():
    """One shared latent clears the matched-fraction test against a null that never matches above 0.5;
    with MNN required as well, dictionaries whose MNN sits at its null do not clear the bar."""
    from qsae_lens.compare.seeds import sharing_bar

    n, m = 256, 199
    observed = {(0, 1): torch.cat([torch.tensor([0.8]), torch.full((n - 1,), 0.3)])}  # 1 of 256 above 0.5
    null = {(0, 1): torch.full((m, n), 0.3)}
    assert sharing_bar(observed, null).cleared  # the fraction alone: 1/256 > 0 in every draw
    g = torch.Generator().manual_seed(0)
    mnn_null = {(0, 1): (torch.rand(m, n, generator=g) < 0.5).double()}  # MNN about 0.5 in each draw
    at_null = {(0, 1): (torch.arange(n) % 2 == 0).double()}  # exactly 0.5
    bar = sharing_bar(observed, null, mnn_observed=at_null, mnn_null=mnn_null)
    n_ge = int((mnn_null[(0, 1)].mean(dim=1) >= 0.5).sum())
    assert bar.mnn_p_values[0] == pytest.approx((1 + n_ge) / (m + 1)) and bar.mnn_p_values[0] > 0.2
    assert not bar.cleared and "too undertrained" in bar.message
    above = {(0, 1): (torch.arange(n) % 4 != 0).double()}  # 0.75, far above every draw
    assert sharing_bar(observed, null, mnn_observed=above, mnn_null=mnn_null).cleared
