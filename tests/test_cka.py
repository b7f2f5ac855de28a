"""compare.cka against the Gram-matrix HSIC forms and CKA's published invariances."""

from __future__ import annotations

import pytest
import torch

from qsae_lens.compare.cka import CKAAccumulator, cka_permutation_null, gram_linear_cka, linear_cka
from qsae_lens.compare.stats import permutation_test_statistic


def _related(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=gen, dtype=torch.float64) * torch.linspace(0.2, 3.0, 12, dtype=torch.float64)
    y = x @ torch.randn(12, 9, generator=gen, dtype=torch.float64) + torch.randn(n, 9, generator=gen, dtype=torch.float64)
    return x + 7.0, y - 3.0


@pytest.mark.parametrize("debiased", [False, True])
def test_feature_space_equals_gram_form(debiased):
    x, y = _related(150)
    assert linear_cka(x, y, debiased=debiased) == pytest.approx(gram_linear_cka(x, y, debiased=debiased), rel=1e-10)


def test_invariances_and_identity():
    x, y = _related(400, seed=1)
    gen = torch.Generator().manual_seed(2)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=gen, dtype=torch.float64))
    base = linear_cka(x, y)
    assert linear_cka(x @ q, y) == pytest.approx(base, rel=1e-10)          # orthogonal transform
    assert linear_cka(3.7 * x, 0.01 * y) == pytest.approx(base, rel=1e-10)  # isotropic scaling
    assert linear_cka(x - 100.0, y) == pytest.approx(base, rel=1e-10)       # translation (centring)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, x, debiased=True) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x @ q, x, debiased=True) == pytest.approx(1.0, abs=1e-12)


def test_independent_data_near_zero_and_debiased_closer_at_small_n():
    gen = torch.Generator().manual_seed(3)
    big = linear_cka(torch.randn(20_000, 8, generator=gen), torch.randn(20_000, 8, generator=gen))
    assert big < 0.005  # biased CKA of independent data ~ d/n
    biased, debiased = [], []
    for _ in range(30):
        x = torch.randn(40, 16, generator=gen, dtype=torch.float64)
        y = torch.randn(40, 16, generator=gen, dtype=torch.float64)
        biased.append(linear_cka(x, y))
        debiased.append(linear_cka(x, y, debiased=True))
    mean_b = sum(biased) / len(biased)
    mean_d = sum(debiased) / len(debiased)
    assert mean_b > 0.2  # the known small-n inflation of biased CKA
    assert abs(mean_d) < 0.05 and abs(mean_d) < mean_b / 5


@pytest.mark.parametrize("debiased", [False, True])
def test_accumulator_equals_one_shot(debiased):
    x, y = _related(1000, seed=4)
    x, y = x + 1e3, y * 50  # a large mean component: the accumulator must centre without cancellation
    acc = CKAAccumulator()
    for start, stop in [(0, 1), (1, 250), (250, 251), (251, 700), (700, 1000)]:
        acc.update(x[start:stop], y[start:stop])
    assert acc.n == 1000
    assert acc.compute(debiased=debiased) == pytest.approx(linear_cka(x, y, debiased=debiased), rel=1e-9)
    xc, yc = x - x.mean(0), y - y.mean(0)  # the uncentred Gram reference would lose digits to the offset
    assert acc.compute(debiased=debiased) == pytest.approx(gram_linear_cka(xc, yc, debiased=debiased), rel=1e-9)


@pytest.mark.parametrize("debiased", [False, True])
def test_permutation_null_matches_generic_permutation_test(debiased):
    x, y = _related(80, seed=5)
    fast = cka_permutation_null(x, y, n_permutations=60, seed=9, debiased=debiased)
    slow = permutation_test_statistic(lambda a, b: linear_cka(a, b, debiased=debiased), x, y, n_permutations=60, seed=9)
    torch.testing.assert_close(fast.null, slow.null, rtol=1e-9, atol=1e-12)
    assert fast.observed == pytest.approx(slow.observed, rel=1e-10)
    assert fast.p_value == pytest.approx(1 / 61)  # a strong relation beats every re-pairing


def test_bad_input_errors():
    with pytest.raises(ValueError, match="same tokens"):
        linear_cka(torch.randn(10, 3), torch.randn(11, 3))
    with pytest.raises(ValueError, match="NaN"):
        linear_cka(torch.tensor([[0.0], [float("nan")]]), torch.randn(2, 1))
    with pytest.raises(ValueError, match="constant"):
        linear_cka(torch.ones(5, 2), torch.randn(5, 2))
