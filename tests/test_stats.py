"""compare.stats against independent ground truth: coverage, false-positive rate, brute force, textbook tables, scipy."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.stats
import torch

from qsae_lens.compare.stats import (
    Estimate,
    benjamini_hochberg,
    bootstrap_ci,
    holm,
    paired_permutation_test,
    permutation_test_statistic,
)


def test_bootstrap_ci_covers_true_mean_about_95_percent():
    # N(2, 1) samples of 100: the percentile interval should cover the true mean ~95% of the time.
    gen = torch.Generator().manual_seed(1)
    data = 2.0 + torch.randn(1000, 100, generator=gen, dtype=torch.float64)
    hits = 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 1,000 tiny calls: thread start-up would dominate on a loaded 2-core box
    try:
        for i in range(data.shape[0]):
            est = bootstrap_ci(data[i], n_resamples=500, seed=i)
            hits += est.ci_low <= 2.0 <= est.ci_high
    finally:
        torch.set_num_threads(threads)
    assert 0.93 <= hits / data.shape[0] <= 0.97


def test_bootstrap_ci_matches_scipy_percentile():
    x = np.random.default_rng(0).exponential(size=400)
    ours = bootstrap_ci(torch.from_numpy(x), n_resamples=4000, seed=0)
    ref = scipy.stats.bootstrap((x,), np.mean, n_resamples=4000, method="percentile", random_state=0)
    width = ref.confidence_interval.high - ref.confidence_interval.low
    assert isinstance(ours, Estimate) and ours.value == pytest.approx(x.mean())
    assert abs(ours.ci_low - ref.confidence_interval.low) < 0.05 * width
    assert abs(ours.ci_high - ref.confidence_interval.high) < 0.05 * width


def test_bootstrap_ci_rejects_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_ci(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci(torch.ones(3), confidence=95)


@pytest.mark.parametrize("n", [10, 30])  # 10: exact enumeration, 30: random sign flips
def test_paired_permutation_false_positive_rate(n):
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(4000, n, generator=gen, dtype=torch.float64)
    y = torch.randn(4000, n, generator=gen, dtype=torch.float64)
    p = paired_permutation_test(x, y, n_permutations=999, seed=3)
    assert p.shape == (4000,)
    assert 0.03 <= float((p <= 0.05).double().mean()) <= 0.07


def test_paired_permutation_exact_equals_brute_force_and_scipy():
    x = torch.tensor([1.3, 0.2, 2.5, -0.4, 1.1, 0.9, -0.2])
    y = torch.tensor([0.1, 0.4, 0.5, -0.3, 0.2, 1.0, -0.9])
    d = (x - y).double().tolist()
    obs = abs(sum(d)) / len(d)
    hits = sum(
        abs(sum(s * v for s, v in zip(signs, d))) / len(d) >= obs - 1e-12
        for signs in itertools.product((-1, 1), repeat=len(d))
    )
    brute = hits / 2 ** len(d)
    assert paired_permutation_test(x, y) == pytest.approx(brute, abs=1e-12)
    ref = scipy.stats.permutation_test(
        (np.array(d),), lambda a: abs(a.mean()), permutation_type="samples", n_resamples=np.inf, alternative="greater"
    )
    assert paired_permutation_test(x, y) == pytest.approx(ref.pvalue, abs=1e-12)


def test_paired_permutation_random_agrees_with_exact():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(18, generator=gen, dtype=torch.float64) + 0.4
    y = torch.randn(18, generator=gen, dtype=torch.float64)
    exact = paired_permutation_test(x, y, exact_max_n=18)
    sampled = paired_permutation_test(x, y, exact_max_n=0, n_permutations=40_000)
    assert abs(exact - sampled) < 4 * (exact * (1 - exact) / 40_000) ** 0.5 + 1e-4
    # the (b+1)/(m+1) convention: never 0, even when nothing is as extreme as observed
    assert paired_permutation_test(torch.arange(1.0, 40.0), torch.zeros(39), n_permutations=99) == pytest.approx(0.01)


def test_permutation_test_statistic_matches_scipy_pairings():
    rng = np.random.default_rng(2)
    a = rng.normal(size=60)
    b = 0.3 * a + rng.normal(size=60)

    def corr(u, v):
        return torch.corrcoef(torch.stack([u, v]))[0, 1]

    ours = permutation_test_statistic(corr, torch.from_numpy(a), torch.from_numpy(b), n_permutations=3000)
    ref = scipy.stats.permutation_test(
        (a, b), lambda u, v: np.corrcoef(u, v)[0, 1], permutation_type="pairings",
        n_resamples=3000, alternative="greater", random_state=0,
    )
    assert ours.observed == pytest.approx(ref.statistic)
    assert abs(ours.p_value - ref.pvalue) < 0.01
    assert ours.null.shape == (3000,)


def test_holm_and_bh_textbook_examples():
    # Hand-computed: sorted p = .005, .01, .03, .04 (m = 4).
    # Holm: 4(.005)=.02, 3(.01)=.03, 2(.03)=.06, max(.04, .06)=.06.  BH: .02, .02, .04, .04.
    p = [0.01, 0.04, 0.03, 0.005]
    assert holm(p).tolist() == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert benjamini_hochberg(p).tolist() == pytest.approx([0.02, 0.04, 0.04, 0.02])
    # Benjamini & Hochberg (1995), section 4: 15 p-values; at q = 0.05 BH rejects 4, Holm 3.
    bh95 = [0.0001, 0.0004, 0.0019, 0.0095, 0.0201, 0.0278, 0.0298, 0.0344, 0.0459,
            0.3240, 0.4262, 0.5719, 0.6528, 0.7590, 1.000]
    assert int((benjamini_hochberg(bh95) <= 0.05).sum()) == 4
    assert int((holm(bh95) <= 0.05).sum()) == 3


def test_bh_matches_scipy_false_discovery_control():
    p = np.random.default_rng(4).uniform(size=200) ** 3
    np.testing.assert_allclose(benjamini_hochberg(torch.from_numpy(p)).numpy(), scipy.stats.false_discovery_control(p), rtol=1e-12)
    # the definition written out: adj_(i) = min_{j>=i} min(1, m p_(j) / j), back in input order
    m, order = p.size, np.argsort(p)
    by_rank = [min(1.0, min(m * p[order[j]] / (j + 1) for j in range(i, m))) for i in range(m)]
    expected = np.empty(m)
    expected[order] = by_rank
    np.testing.assert_allclose(benjamini_hochberg(p).numpy(), expected, rtol=1e-12)
    assert benjamini_hochberg([]).numel() == 0
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        holm([0.2, 1.5])
