"""compare.categories and compare.activation_metrics against hand-built cases, SAELens's own code paths and numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qsae_lens.compare.activation_metrics import (
    PairCorrelationAccumulator,
    cross_reconstruction_explained_variance,
    explained_variance,
    latent_activation_correlation,
    sae_codes,
)
from qsae_lens.compare.categories import (
    CATEGORY_NAMES,
    category_counts,
    category_transition_table,
    firing_frequency_from_sparsity_file,
    firing_stats_from_codes,
    latent_categories,
)


def test_categories_on_constructed_frequencies():
    freq = torch.tensor([0.0, 0.3, 0.0001, 0.0099, 0.01, 0.2, 0.4999, 0.5, 1.0, 0.7], dtype=torch.float64)
    max_act = torch.tensor([0.0, 5e-7, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2.0], dtype=torch.float64)
    expected = ["dead", "dead", "rare", "rare", "common", "common", "common", "frequent", "frequent", "frequent"]
    cats = latent_categories(freq, max_act)
    assert [CATEGORY_NAMES[c] for c in cats.tolist()] == expected
    # without max activations, only never-firing latents are dead
    assert CATEGORY_NAMES[int(latent_categories(freq)[1])] == "common"
    assert category_counts(cats) == {"dead": 2, "rare": 2, "common": 3, "frequent": 3}
    with pytest.raises(ValueError, match="log10"):
        latent_categories(torch.tensor([-3.0]))


def test_firing_stats_stream_over_batches():
    gen = torch.Generator().manual_seed(0)
    codes = torch.relu(torch.randn(1000, 6, generator=gen) - torch.tensor([0.0, 1.0, 2.0, 9.0, -3.0, 0.5]))
    codes[:, 3] = 0.0
    freq, max_act = firing_stats_from_codes(codes[i : i + 128] for i in range(0, 1000, 128))
    torch.testing.assert_close(freq, (codes > 0).double().mean(0))
    torch.testing.assert_close(max_act, codes.abs().amax(0).double())
    assert CATEGORY_NAMES[int(latent_categories(freq, max_act)[3])] == "dead"


def test_sparsity_file_written_by_saelens_code_path(tmp_path):
    from sae_lens.constants import SPARSITY_FILENAME
    from sae_lens.training.sae_trainer import _log_feature_sparsity
    from safetensors.torch import save_file

    # (no value sits exactly on a threshold: the float32 log10 round trip moves 0.5 to 0.49999997)
    freq = torch.tensor([0.0, 1e-6, 0.004, 0.02, 0.3, 0.55, 1.0])
    # exactly what SAETrainer.save_checkpoint / the runner write
    save_file({"sparsity": _log_feature_sparsity(freq)}, tmp_path / SPARSITY_FILENAME)
    back = firing_frequency_from_sparsity_file(tmp_path)
    assert back[0] == 0.0  # never fired: exactly zero, so "dead"
    torch.testing.assert_close(back, freq.double(), rtol=1e-5, atol=1e-12)
    assert [CATEGORY_NAMES[c] for c in latent_categories(back).tolist()] == [
        "dead", "rare", "rare", "common", "common", "frequent", "frequent"
    ]
    with pytest.raises(FileNotFoundError, match="sparsity"):
        firing_frequency_from_sparsity_file(tmp_path / "missing")


def test_transition_table_counts_pairs():
    a = torch.tensor([0, 1, 1, 2, 3, 3, 3])
    b = torch.tensor([0, 1, 2, 2, 3, 2, 3])
    expected = torch.zeros(4, 4, dtype=torch.int64)
    for i, j in zip(a.tolist(), b.tolist()):
        expected[i, j] += 1
    assert torch.equal(category_transition_table(a, b), expected)


def test_pearson_matches_numpy_corrcoef_and_streams():
    gen = torch.Generator().manual_seed(1)
    a = torch.relu(torch.randn(500, 8, generator=gen)) + 10.0  # offset: tests cancellation handling
    b = torch.relu(a[:, [3, 0, 5, 1]] - 10.5 + 0.5 * torch.randn(500, 4, generator=gen))
    b = torch.cat([b, torch.zeros(500, 1)], dim=1)  # latent 4 of b never fires
    rows, cols = torch.tensor([3, 0, 5, 1, 2, 7]), torch.tensor([0, 1, 2, 3, 1, 4])
    r = latent_activation_correlation(a, b, rows, cols)
    an, bn = a.double().numpy(), b.double().numpy()
    for j in range(5):
        assert r[j].item() == pytest.approx(np.corrcoef(an[:, rows[j]], bn[:, cols[j]])[0, 1], abs=1e-9)
    assert torch.isnan(r[5])  # constant latent: correlation undefined
    acc = PairCorrelationAccumulator(rows, cols)
    for i in range(0, 500, 77):
        acc.update(a[i : i + 77], b[i : i + 77])
    torch.testing.assert_close(acc.compute(constant=0.0), torch.nan_to_num(r, nan=0.0), rtol=1e-9, atol=1e-9)


def test_explained_variance_matches_saelens_run_evals_definition():
    from sae_lens.evals import ExplainedVarianceCalculator

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(300, 16, generator=gen) * 3 + 40.0
    x_hat = x + 0.8 * torch.randn(300, 16, generator=gen)
    ref = ExplainedVarianceCalculator()
    for i in range(0, 300, 100):
        # float64 in: SAELens then squares in float64 too (in float32 it differs in the 8th digit)
        ref.add_batch(sae_output=x_hat[i : i + 100].double(), hidden_acts=x[i : i + 100].double())
    xd, xhd = x.double(), x_hat.double()
    by_hand = 1 - ((xd - xhd) ** 2).sum() / ((xd - xd.mean(0)) ** 2).sum()
    assert explained_variance(x, x_hat) == pytest.approx(ref.compute(), rel=1e-9)
    assert explained_variance(x, x_hat) == pytest.approx(float(by_hand), rel=1e-9)


def test_cross_reconstruction_with_rotation_recovers_rotated_space():
    gen = torch.Generator().manual_seed(3)
    d = 10
    w = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))[0]
    q = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))[0]

    def encode(x):  # an "SAE" whose dictionary is the orthonormal basis w: keeps the 6 largest-variance axes
        return torch.relu(torch.cat([x @ w.T, -(x @ w.T)], dim=1)) * (torch.arange(2 * d) % d < 6)

    def decode(z):
        return (z[:, :d] - z[:, d:]) @ w

    x_a = torch.randn(2000, d, generator=gen, dtype=torch.float64) * torch.linspace(3, 0.1, d, dtype=torch.float64) @ w
    x_b = x_a @ q  # the same activations in a rotated model space
    own = cross_reconstruction_explained_variance(encode, decode, x_a, batch_size=333)
    assert own == pytest.approx(explained_variance(x_a, decode(encode(x_a))))
    assert own > 0.9
    assert cross_reconstruction_explained_variance(encode, decode, x_b) < own - 0.2
    # with q mapping a-space to b-space (x_b = x_a @ q), SAE a reads b through q.T
    assert cross_reconstruction_explained_variance(encode, decode, x_b, rotation=q.T) == pytest.approx(own, rel=1e-9)
    with pytest.raises(ValueError, match="orthogonal"):
        cross_reconstruction_explained_variance(encode, decode, x_b, rotation=2 * q)


def test_sae_codes_streams_saelens_encode():
    from sae_lens import SAE, StandardSAEConfig

    sae = SAE.from_dict(StandardSAEConfig(d_in=8, d_sae=32).to_dict())
    x = torch.randn(50, 8)
    codes = sae_codes(sae, x, batch_size=7)
    with torch.no_grad():
        torch.testing.assert_close(codes, sae.encode(x))
    assert not codes.requires_grad


def test_precision_transition_table_beside_the_seed_one():
    from qsae_lens.compare.categories import seed_and_precision_transition_tables

    # baseline categories 0,1,2,3,0; the other seed keeps them in a permuted order; the precision kills latent 1
    base = torch.tensor([0, 1, 2, 3, 0])
    other_seed = torch.tensor([3, 2, 1, 0, 0])  # latent i of base matched to 3 - i (and 4 -> 4)
    prec = torch.tensor([0, 0, 2, 3, 0])
    idx = torch.arange(5)
    t = seed_and_precision_transition_tables(base, other_seed, (idx, torch.tensor([3, 2, 1, 0, 4])), prec, (idx, idx))
    assert t.names[0] == "dead"
    # seed to seed: every latent keeps its category -> diagonal counts = category counts of base
    assert torch.equal(t.seed, torch.diag(torch.tensor([2, 1, 1, 1])))
    # precision: one latent moves from category 1 to category 0 (written out)
    expected = torch.diag(torch.tensor([2, 0, 1, 1]))
    expected[1, 0] = 1
    assert torch.equal(t.precision, expected)
