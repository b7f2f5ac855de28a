"""Anisotropy-matched nulls (qsae_lens.compare.nulls) against known answers."""

from __future__ import annotations

import pytest
import torch

from qsae_lens.compare.nulls import (
    anisotropic_directions,
    anisotropic_random_sae_like,
    covariance_matched_activations,
    second_moment,
)


def _subspace_dictionary(n: int, basis: torch.Tensor, seed: int) -> torch.Tensor:
    """n unit rows inside the row space of ``basis`` (Tensor[r, d], orthonormal rows)."""
    w = torch.randn(n, basis.shape[0], generator=torch.Generator().manual_seed(seed)) @ basis
    return w / w.norm(dim=1, keepdim=True)


def _power_law_dictionary(n: int, d: int, q: torch.Tensor, seed: int, *, unit: bool = False) -> torch.Tensor:
    """n Gaussian rows with a power-law covariance (eigenvalue k ~ 1/k) in the eigenbasis q; unit-normalised
    if ``unit``."""
    w = torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * torch.arange(1, d + 1).pow(-0.5) @ q.T
    return w / w.norm(dim=1, keepdim=True) if unit else w


def test_null_dictionary_is_a_mirror_image_of_the_target():
    """The null keeps every norm and angle among b's rows (z zᵀ = b bᵀ) and b's subspace, is its own inverse
    (a reflection), and moves each row: its cosine with the row it came from is far from 1."""
    from qsae_lens.compare.nulls import reflect, reflection_basis

    d = 64
    basis = torch.linalg.qr(torch.randn(d, 12, generator=torch.Generator().manual_seed(0)))[0].T
    for n in (8, 300):  # fewer rows than the subspace's 12 dimensions, and overcomplete (Tyler's shape)
        b = _subspace_dictionary(n, basis, 1) * torch.linspace(0.5, 2.0, n)[:, None]
        z = anisotropic_directions(b, seed=3)
        assert torch.allclose(z @ z.T, b @ b.T, atol=1e-5)
        # Σ_z = R Σ_b R with R orthogonal: the same spectrum, exactly
        spec_z, spec_b = (torch.linalg.eigvalsh(second_moment(w)) for w in (z, b))
        assert torch.allclose(spec_z, spec_b, atol=1e-6)
        outside = z - (z @ basis.T) @ basis
        assert float(outside.norm() / z.norm()) < 1e-5
        v = reflection_basis(b)
        assert torch.allclose(v.T @ v, torch.eye(v.shape[1], dtype=v.dtype), atol=1e-10)
        assert torch.allclose(reflect(reflect(b, v, seed=3), v, seed=3), b, atol=1e-5)
        self_cos = torch.nn.functional.cosine_similarity(z, b, dim=1).abs().mean()
        assert float(self_cos) < 0.6, float(self_cos)
    # n != m: rows of several mirror images, each a row of some reflection of b (norms among b's)
    b = _subspace_dictionary(50, basis, 2)
    assert torch.allclose(anisotropic_directions(b, 130, seed=1).norm(dim=1), torch.ones(130), atol=1e-5)


def test_covariance_matched_activations_match_mean_and_covariance():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4000, 16, generator=g) @ torch.randn(16, 16, generator=g) + 3.0
    y = covariance_matched_activations(x, 40_000, seed=1)
    assert torch.allclose(y.mean(0), x.mean(0), atol=0.1)
    assert torch.allclose(torch.cov(y.T), torch.cov(x.T), atol=0.08 * float(torch.cov(x.T).abs().max()))


def test_anisotropic_floor_sae_keeps_biases_and_spectrum(tmp_path):
    from sae_lens import SAE, TopKSAE, TopKSAEConfig

    d, n = 32, 96
    basis = torch.linalg.qr(torch.randn(d, 8, generator=torch.Generator().manual_seed(0)))[0].T
    w = _subspace_dictionary(n, basis, 5)
    sae = TopKSAE(TopKSAEConfig(d_in=d, d_sae=n, k=4))
    with torch.no_grad():
        sae.W_dec.copy_(w)
        sae.W_enc.copy_(3.0 * w.T)
        sae.b_enc.copy_(torch.linspace(-1, 1, n))
        sae.b_dec.copy_(torch.randn(d))
    sae.save_model(str(tmp_path / "real"))
    fake = anisotropic_random_sae_like(tmp_path / "real", seed=7, out_dir=tmp_path / "floor")
    assert type(fake) is type(sae) and fake.W_dec.shape == sae.W_dec.shape
    assert torch.equal(fake.b_dec, sae.b_dec)  # the activations' centre is kept
    assert torch.equal(fake.b_enc, sae.b_enc)  # per-latent parameters stay with their latents
    assert torch.allclose(fake.W_enc.norm(dim=0), torch.full((n,), 3.0), atol=1e-5)  # encoder scale kept
    assert torch.allclose(fake.W_dec.norm(dim=1), torch.ones(n), atol=1e-5)
    # one mirror for both: the encoder-decoder cross-Gram W_encᵀ W_decᵀ is unchanged
    with torch.no_grad():
        assert torch.allclose(fake.W_enc.T @ fake.W_dec.T, sae.W_enc.T @ sae.W_dec.T, atol=1e-4)
    # no learned feature survives (best match at chance) but the subspace does
    cos = torch.nn.functional.normalize(fake.W_dec, dim=1) @ w.T
    assert float(cos.abs().max(dim=1).values.mean()) < 0.9
    assert float((fake.W_dec - (fake.W_dec @ basis.T) @ basis).norm()) < 1e-4
    assert torch.equal(SAE.load_from_disk(tmp_path / "floor").W_dec, fake.W_dec)


def test_compare_saes_writes_no_cache_unless_asked(tmp_path, monkeypatch):
    from sae_lens import TopKSAE, TopKSAEConfig

    from qsae_lens.compare import compare_saes

    monkeypatch.setenv("QSAE_LENS_CACHE", str(tmp_path / "cache"))
    saes = []
    for seed in (1, 2):
        sae = TopKSAE(TopKSAEConfig(d_in=16, d_sae=40, k=4))
        with torch.no_grad():
            sae.W_dec.copy_(torch.randn(40, 16, generator=torch.Generator().manual_seed(seed)))
        saes.append(sae)
    for null in ("anisotropic", "isotropic"):
        compare_saes(*saes, null=null, n_bootstrap=50, n_permutations=50, progress=False)
    assert not list((tmp_path / "cache").rglob("*.json"))
    compare_saes(*saes, null="isotropic", n_bootstrap=50, n_permutations=50, progress=False, cache_nulls=True)
    assert list((tmp_path / "cache").rglob("alignment_*.json"))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("shape", "d", "n", "reps"),
    [("subspace", 576, 48, 600), ("power_law", 576, 48, 600), ("power_law_unit", 128, 256, 400)],
)
def test_unrelated_dictionaries_sit_at_the_anisotropic_null(shape, d, n, reps):
    """Unrelated dictionaries sharing a 96-dim subspace of 576, or a power-law spectrum (Gaussian rows; or
    unit rows, overcomplete as SAEs are), score like the null: the one-sided p of "a matches b better than
    a matches the null" is uniform over repeats, so its false-positive rate at alpha 0.05 is within
    [0.03, 0.07]. (The Gaussian-direction null this replaced gave 0.12-0.25 on the same data.) Unit rows
    with a power-law spectrum are the one case that is not exact (the mirror axes are estimated by Tyler's
    shape, and normalised rows are not sign-symmetric along estimated axes): measured 0.069 over 1,000
    repeats, 0.0725 over these 400, so its bound is 0.09 and docs/compare.md says so."""
    from qsae_lens.compare.alignment import best_match
    from qsae_lens.compare.stats import paired_permutation_test

    r = 96
    g = torch.Generator().manual_seed(0)
    q = torch.linalg.qr(torch.randn(d, d, generator=g))[0]
    p_values = []
    for rep in range(reps):
        if shape == "subspace":
            a, b = (_subspace_dictionary(n, q[:, :r].T, 10 * rep + i) for i in (1, 2))
        else:
            a, b = (_power_law_dictionary(n, d, q, 10 * rep + i, unit=shape == "power_law_unit") for i in (1, 2))
        z = anisotropic_directions(b, seed=rep)
        obs, nul = best_match(a, b).cosine, best_match(a, z).cosine
        p_values.append(float(paired_permutation_test(obs, nul, n_permutations=200, seed=rep, alternative="greater")))
    p = torch.tensor(p_values)
    fpr = float((p <= 0.05).double().mean())
    assert 0.03 <= fpr <= (0.09 if shape == "power_law_unit" else 0.07), fpr
    # uniform: each quartile of [0, 1] holds about a quarter of the p-values
    counts = torch.histc(p, bins=4, min=0, max=1) / reps
    assert float((counts - 0.25).abs().max()) < 0.06, counts


@pytest.mark.slow
def test_compare_saes_p_values_are_uniform_for_unrelated_saes_sharing_a_direction():
    """compare_saes's anisotropic p (Monte-Carlo over mirror images) on unrelated SAEs whose latents all
    lean on one common direction, as trained decoders' do, with a decaying spectrum. Under exchangeability
    P(p <= 1/20) = 1/20 exactly with 19 draws; over 200 repeats the rate must be within [0.02, 0.09]
    (binomial 99% interval) and the mean p near 1/2. (Measured: 0.06, mean 0.494. The latent-wise test
    against one draw gives 0.025 here; on the sweep's trained SAEs it was overconfident: docs/compare.md.)"""
    from sae_lens import TopKSAE, TopKSAEConfig

    from qsae_lens.compare import compare_saes

    d, n, reps = 32, 64, 200
    common = torch.nn.functional.normalize(torch.randn(d, generator=torch.Generator().manual_seed(0)), dim=0)

    def sae(seed: int) -> TopKSAE:
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(n, d, generator=g) * torch.logspace(0, -1, d) + 1.5 * common * torch.randn(n, 1, generator=g)
        s = TopKSAE(TopKSAEConfig(d_in=d, d_sae=n, k=4))
        with torch.no_grad():
            s.W_dec.copy_(torch.nn.functional.normalize(w, dim=1))
            s.W_enc.copy_(s.W_dec.T)
        return s

    p = torch.tensor([
        compare_saes(sae(2 * r + 1), sae(2 * r + 2), n_bootstrap=20, n_permutations=20, n_null_draws=19,
                     progress=False, seed=r).metrics["decoder_matched_cosine"].p_value
        for r in range(reps)
    ])  # fmt: skip
    fpr = float((p <= 0.05 + 1e-9).double().mean())
    assert 0.02 <= fpr <= 0.09, fpr
    assert 0.42 <= float(p.mean()) <= 0.58, float(p.mean())
