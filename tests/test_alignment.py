"""Weight-space alignment and its nulls, asserted against ground truths built independently of the code:
identity, known permutations and rotations, dense numpy/scipy computations, and the analytic cosine law."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from scipy.special import gammaln

from qsae_lens.compare.alignment import (
    best_match,
    best_match_both,
    fraction_above,
    mutual_nearest_neighbours,
    mutual_nn_fraction,
    normalize_rows,
    one_to_one_matching,
    procrustes_matched,
    procrustes_rowwise_naive,
    top_k_neighbours,
)
from qsae_lens.compare.nulls import best_match_null, cosine_distribution, simulate_alignment_nulls


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_orthogonal(d: int, seed: int) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(d, d, generator=_gen(seed), dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


def _unit_np(w: torch.Tensor) -> np.ndarray:
    x = w.double().numpy()
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_identical_saes_every_cosine_is_one():
    a = torch.randn(300, 48, generator=_gen(0)) * 3.0
    ab, ba = best_match_both(a, a.clone(), block_size=64)
    assert torch.allclose(ab.cosine, torch.ones(300), atol=1e-5)
    assert torch.equal(ab.index, torch.arange(300)) and torch.equal(ba.index, torch.arange(300))
    assert mutual_nn_fraction(a, a) == 1.0
    m = one_to_one_matching(a, a)
    assert torch.equal(m.cols, m.rows) and m.mean_cosine == pytest.approx(1.0, abs=1e-5)
    assert fraction_above(m.cosine) == {0.5: 1.0, 0.7: 1.0, 0.9: 1.0}
    sparse = one_to_one_matching(a, a, exact_max=0, k_candidates=4)
    assert sparse.method == "sparse" and torch.equal(sparse.cols, sparse.rows)


def test_permuted_latents_match_perfectly_while_diagonal_is_low():
    n, d = 400, 64
    a = torch.randn(n, d, generator=_gen(1))
    perm = torch.randperm(n, generator=_gen(2))
    scales = torch.rand(n, 1, generator=_gen(3)) * 5 + 0.1  # SAEs move scale between encoder and decoder
    b = a[perm] * scales  # b[j] = a[perm[j]]
    inverse = torch.argsort(perm)  # a[i] is b[inverse[i]]

    diagonal = float((_unit_np(a) * _unit_np(b)).sum(axis=1).mean())  # row i vs row i, as the naive view does
    assert abs(diagonal) < 0.05

    ab = best_match(a, b, block_size=96)
    assert torch.equal(ab.index, inverse) and float(ab.cosine.min()) > 1 - 1e-5
    assert bool(mutual_nearest_neighbours(a, b, block_size=96).all())
    for kwargs in ({}, {"exact_max": 0, "k_candidates": 8}):
        m = one_to_one_matching(a, b, **kwargs)
        assert torch.equal(m.cols, inverse[m.rows])
        assert m.mean_cosine == pytest.approx(1.0, abs=1e-5)


def test_rotated_model_space_raw_near_null_procrustes_matched_near_one():
    # The moment start is computed from each training fold only, so it needs a spectrum that half the latents
    # identify (distinct eigenvalues) and skewed coordinates (third-moment signs): real dictionaries have both;
    # an isotropic Gaussian has neither, and no pairing-free start can find its rotation from a subsample.
    n, d = 512, 32
    a = (torch.randn(n, d, generator=_gen(4)) ** 2 - 0.5) * torch.logspace(0, -3, d)
    q = _random_orthogonal(d, 5)
    perm = torch.randperm(n, generator=_gen(6))
    b = (a @ q)[perm]

    raw = float(best_match(a, b).cosine.mean())
    assert raw < 0.6, raw  # the rotation scrambles the directions

    res = procrustes_matched(a, b, max_iter=5)
    assert res.matched_cosine_cv > 0.999
    assert res.matched_cosine_in_sample > 0.999
    assert res.raw_matched_cosine < 0.5
    # the map it found does to a what the applied rotation does (ground truth), up to float32 error on the
    # 1e-3-scale directions
    mapped = torch.nn.functional.cosine_similarity(a @ res.rotation, a @ q, dim=1)
    assert float(mapped.min()) > 0.9999
    assert torch.allclose(res.rotation, q, atol=5e-3)
    assert all(torch.allclose(r, q, atol=5e-3) for r in res.fold_maps)  # each fold's out-of-sample map too

    # the methodology's row-in-order fit: right only when the order is known, misleading when it is not
    assert procrustes_rowwise_naive(a, a @ q).mean_cosine == pytest.approx(1.0, abs=1e-5)
    assert procrustes_rowwise_naive(a, b).mean_cosine < 0.35


def test_random_saes_sit_on_their_nulls(tmp_path):
    n_a, n_b, d = 384, 512, 48
    a = torch.randn(n_a, d, generator=_gen(7))
    b = torch.randn(n_b, d, generator=_gen(8))
    ab, ba = best_match_both(a, b)
    for observed, null in ((ab, best_match_null(n_a, n_b, d)), (ba, best_match_null(n_b, n_a, d))):
        assert abs(float(observed.cosine.mean()) - null.mean) < 5 * null.std + 0.005
    sims = simulate_alignment_nulls(n_a, n_b, d, n_draws=3, seed=123, cache_dir=tmp_path)
    m = one_to_one_matching(a, b)
    assert abs(m.mean_cosine - sims.matched_cosine.mean) < 0.01
    assert abs(mutual_nn_fraction(a, b) - sims.mutual_nn_fraction.mean) < 0.06

    # CV Procrustes between unrelated SAEs stays at the matched null of its held-out shape; in-sample does not
    res = procrustes_matched(a, b, max_iter=4)
    held = simulate_alignment_nulls(*res.test_shape, d, n_draws=2, seed=9, cache_dir=tmp_path).matched_cosine
    assert abs(res.matched_cosine_cv - held.mean) < 0.015, (res, held)
    assert res.matched_cosine_in_sample > res.matched_cosine_cv + 0.02
    # handing over the raw matching already solved changes nothing but the work done
    reused = procrustes_matched(a, b, max_iter=4, matching=m)
    # (equal up to re-normalising unit rows in float32)
    assert reused.raw_matched_cosine == m.mean_cosine
    assert reused.raw_matched_cosine == pytest.approx(res.raw_matched_cosine, abs=1e-6)
    assert reused.matched_cosine_cv == pytest.approx(res.matched_cosine_cv, abs=1e-6)
    assert torch.equal(reused.matching.cols, res.matching.cols)
    assert torch.allclose(reused.rotation, res.rotation, atol=1e-5)
    with pytest.raises(ValueError, match="matching has 10 pairs"):
        procrustes_matched(a, b, max_iter=1, matching=one_to_one_matching(a[:10], b))

    # the naive row-wise fit "finds" alignment between unrelated SAEs when n is a few times d
    naive = procrustes_rowwise_naive(a[: 2 * d], b[: 2 * d]).mean_cosine
    assert naive > 0.3 and abs(float((_unit_np(a[: 2 * d]) * _unit_np(b[: 2 * d])).sum(1).mean())) < 0.1


def test_analytic_null_matches_formula_and_simulation(tmp_path):
    d = 40
    t = np.linspace(-0.95, 0.95, 9)
    log_c = gammaln(d / 2) - 0.5 * math.log(math.pi) - gammaln((d - 1) / 2)
    density = np.exp(log_c) * (1 - t**2) ** ((d - 3) / 2)  # the law written out by hand
    assert np.allclose(cosine_distribution(d).pdf(t), density, rtol=1e-10)

    # independent dense simulation in numpy float64: max over n_b rows, many independent rows of a
    n_a, n_b = 4000, 300
    rng = np.random.default_rng(11)
    x = rng.standard_normal((n_a, d))
    y = rng.standard_normal((n_b, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    maxima = (x @ y.T).max(axis=1)
    null = best_match_null(n_a, n_b, d)
    assert null.per_latent_mean == pytest.approx(maxima.mean(), abs=4 * maxima.std() / math.sqrt(n_a))
    assert null.per_latent_std == pytest.approx(maxima.std(), rel=0.05)
    for q in (0.05, 0.5, 0.95):
        assert null.per_latent_quantiles[q] == pytest.approx(np.quantile(maxima, q), abs=0.01)

    sims = simulate_alignment_nulls(200, 300, d, n_draws=6, seed=1, cache_dir=tmp_path, use_cache=True)
    analytic = best_match_null(200, 300, d)
    assert sims.best_match_ab.mean == pytest.approx(analytic.mean, abs=3 * analytic.std)
    assert sims.best_match_ab.per_latent_std == pytest.approx(analytic.per_latent_std, rel=0.1)

    # cached: a JSON file keyed by shape+seed+draws, returned unchanged without recomputation
    path = tmp_path / "alignment_na200_nb300_d40_seed1_draws6.json"
    stamp = path.stat().st_mtime_ns
    assert json.loads(path.read_text())["version"] == 1
    assert simulate_alignment_nulls(200, 300, d, n_draws=6, seed=1, cache_dir=tmp_path, use_cache=True) == sims
    assert path.stat().st_mtime_ns == stamp
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]


def test_blockwise_equals_dense():
    a = torch.randn(70, 16, generator=_gen(12))
    b = torch.randn(53, 16, generator=_gen(13)) * torch.rand(53, 1, generator=_gen(14))
    s = _unit_np(a) @ _unit_np(b).T  # dense float64 reference
    ab, ba = best_match_both(a, b, block_size=8)
    assert np.array_equal(ab.index.numpy(), s.argmax(1)) and np.array_equal(ba.index.numpy(), s.argmax(0))
    assert np.allclose(ab.cosine.numpy(), s.max(1), atol=1e-6) and np.allclose(
        ba.cosine.numpy(), s.max(0), atol=1e-6
    )
    assert torch.equal(best_match(a, b, block_size=5).index, ab.index)
    vals, idx = top_k_neighbours(a, b, 5, block_size=7)
    assert np.allclose(vals.numpy(), -np.sort(-s, axis=1)[:, :5], atol=1e-6)
    assert np.array_equal(idx.numpy(), np.argsort(-s, axis=1, kind="stable")[:, :5])
    mnn = s.argmax(0)[s.argmax(1)] == np.arange(70)
    assert np.array_equal(mutual_nearest_neighbours(a, b, block_size=8).numpy(), mnn)
    r, c = linear_sum_assignment(-s)
    m = one_to_one_matching(a, b, block_size=8)
    assert m.rows.shape == (53,) and len(set(m.rows.tolist())) == 53
    assert m.mean_cosine == pytest.approx(s[r, c].mean(), abs=1e-6)
    assert np.allclose(m.cosine.numpy(), s[m.rows.numpy(), m.cols.numpy()], atol=1e-6)
    assert torch.allclose(normalize_rows(b).norm(dim=1), torch.ones(53))


def test_sparse_matching_agrees_with_exact():
    # well separated: b holds a noisy permuted copy of a plus unrelated extra latents -> identical assignment
    n, d = 400, 64
    a = torch.randn(n, d, generator=_gen(15))
    perm = torch.randperm(n, generator=_gen(16))
    b = torch.cat(
        [a[perm] + 0.2 * torch.randn(n, d, generator=_gen(17)), torch.randn(60, d, generator=_gen(18))]
    )
    exact = one_to_one_matching(a, b)
    sparse = one_to_one_matching(a, b, exact_max=0, k_candidates=8)
    assert (exact.method, sparse.method) == ("exact", "sparse")
    assert torch.equal(exact.rows, sparse.rows) and torch.equal(exact.cols, sparse.cols)
    # hard random problems, both orientations of a rectangular shape: same optimum to a tight tolerance
    x = torch.randn(500, 32, generator=_gen(19))
    y = torch.randn(420, 32, generator=_gen(20))
    for p, q in ((x, y), (y, x)):
        e = one_to_one_matching(p, q)
        s = one_to_one_matching(p, q, exact_max=0, k_candidates=32)
        assert s.rows.shape == e.rows.shape == (420,)
        assert s.mean_cosine == pytest.approx(e.mean_cosine, abs=2e-4)
        assert len(set(s.cols.tolist())) == 420 and len(set(s.rows.tolist())) == 420


def test_sparse_matching_recovers_when_candidate_graph_has_no_full_matching():
    # a star: every a row's nearest b is b0 and every b row's nearest a is a0, so the top-1 graph matches 2 pairs
    d, n = 64, 30
    e0 = torch.zeros(d)
    e0[0] = 1.0
    a = torch.cat([e0[None], e0 + 0.3 * torch.randn(n - 1, d, generator=_gen(21))])
    b = torch.cat([e0[None], e0 + 0.3 * torch.randn(n - 1, d, generator=_gen(22))])
    with pytest.warns(UserWarning, match="no full matching"):
        m = one_to_one_matching(a, b, exact_max=0, k_candidates=1, k_max=1)
    assert m.method == "sparse+exact-residual"
    assert sorted(m.rows.tolist()) == list(range(n)) and sorted(m.cols.tolist()) == list(range(n))
    assert m.mean_cosine <= one_to_one_matching(a, b).mean_cosine + 1e-6


def test_bad_inputs_are_named():
    a, b = torch.randn(10, 8), torch.randn(12, 9)
    with pytest.raises(ValueError, match=r"\(10, 8\).*\(12, 9\)"):
        best_match(a, b)
    bad = torch.randn(12, 8)
    bad[3, 2] = float("nan")
    with pytest.raises(ValueError, match="^b contains 1 NaN/Inf"):
        one_to_one_matching(a, bad)
    bad[3, 2] = float("inf")
    with pytest.raises(ValueError, match="^a contains 1 NaN/Inf"):
        best_match_both(bad, a)
    with pytest.raises(ValueError, match="2-D"):
        best_match(torch.randn(3, 4, 5), a)
    with pytest.raises(ValueError, match="equal row counts"):
        procrustes_rowwise_naive(a, torch.randn(11, 8))
    with pytest.warns(UserWarning, match="underdetermined"):
        procrustes_matched(torch.randn(40, 48), torch.randn(40, 48), max_iter=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_runs_on_gpu_and_agrees_with_cpu():
    a = torch.randn(3000, 128, generator=_gen(23))
    b = torch.randn(2500, 128, generator=_gen(24))
    cpu = best_match_both(a, b, block_size=1024)
    gpu = best_match_both(a.cuda(), b.cuda(), block_size=1024)
    assert gpu[0].cosine.is_cuda
    assert torch.allclose(gpu[0].cosine.cpu(), cpu[0].cosine, atol=1e-4)
    assert (gpu[1].index.cpu() == cpu[1].index).float().mean() > 0.999
    m = one_to_one_matching(a.cuda(), b.cuda(), exact_max=0)
    assert m.cosine.is_cuda and m.mean_cosine == pytest.approx(
        one_to_one_matching(a, b).mean_cosine, abs=1e-3
    )


def test_same_space_saes_keep_the_identity_map():
    """Same-space SAEs (the true map is the identity) sharing 30% of their latents: the inner CV must keep
    the identity, whose held-out score is then at least the fitted rotation's (issue 9: CV Procrustes 0.161
    against identity-CV 0.253 before)."""
    n, d, shared = 320, 48, 96
    gen = _gen(21)
    common = torch.randn(shared, d, generator=gen)
    a = torch.cat([common + 0.15 * torch.randn(shared, d, generator=gen), torch.randn(n - shared, d, generator=gen)])
    b = torch.cat([common + 0.15 * torch.randn(shared, d, generator=gen), torch.randn(n - shared, d, generator=gen)])
    b = b[torch.randperm(n, generator=gen)]
    res = procrustes_matched(a, b, max_iter=4)
    assert res.chosen_maps == ("identity", "identity")
    assert res.chosen_map == "identity"
    # the chosen map's CV score is the identity's, and it beats the rotation's in-fold fit scored out of fold
    assert res.matched_cosine_cv == pytest.approx(res.identity_cv, abs=1e-9)
    # 30% of latents shared (cosine ~0.98) lift the held-out mean well above the unrelated 70%
    # against an unrelated b of the same shape (the same folds), the shared 30% lift the held-out mean by
    # about 0.3 x (0.98 - 0.34) ~ 0.19
    unrelated = procrustes_matched(a, torch.randn(n, d, generator=gen), max_iter=2)
    assert res.identity_cv > unrelated.identity_cv + 0.1
