"""Crosscoder tests against planted ground truth (synthetic sources with known shared / exclusive /
weakly-shared features) and against independent computations (Latent Scaling by least squares)."""

from __future__ import annotations

import pytest
import torch

from qsae_lens.crosscoder import (
    DEAD,
    SHARED,
    CrossCoder,
    calibrate_threshold,
    diff_latents,
    explained_variance,
    train_crosscoder,
    train_crosscoder_with_history,
)
from qsae_lens.crosscoder import train as train_module

N_SHARED, N_B_ONLY, N_WEAK, WEAK_SCALE = 200, 20, 20, 0.3
D = 64


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # the CI machine has 2 cores shared by several processes: 2 torch threads oversubscribe it badly
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def planted(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sources A, B (Tensor[n, D]) of ``n`` tokens drawn with ``seed`` from sparse planted features (Tensor[240, D], unit rows):
    features 0..199 shared (same direction and scale in both), 200..219 present only in B,
    220..239 shared but WEAK_SCALE times weaker in A (a shared feature an L1 crosscoder shrinks away)."""
    nf = N_SHARED + N_B_ONLY + N_WEAK
    dirs = torch.randn(nf, D, generator=torch.Generator().manual_seed(1234))  # the same features for every seed
    dirs /= dirs.norm(dim=-1, keepdim=True)
    g = torch.Generator().manual_seed(seed)
    act = (torch.rand(n, nf, generator=g) < 0.02).float() * (1 + torch.rand(n, nf, generator=g))
    scale_a = torch.ones(nf)
    scale_a[N_SHARED:N_SHARED + N_B_ONLY] = 0
    scale_a[N_SHARED + N_B_ONLY:] = WEAK_SCALE
    return (act * scale_a) @ dirs, act @ dirs, dirs


def labels_of_features(cc: CrossCoder, diff, dirs: torch.Tensor) -> torch.Tensor:
    """Label of the latent whose B decoder best matches each planted feature (Tensor[240])."""
    w = cc.W_dec[:, 1].detach()
    w = w / w.norm(dim=-1, keepdim=True).clamp_min(1e-9)
    best = (dirs @ w.T).argmax(1)
    return diff.exclusive_to[best], diff.artefact[best]


@pytest.fixture(scope="module")
def data():
    return planted(8192, seed=0), planted(4096, seed=1)


@pytest.fixture(scope="module")
def batchtopk(data):
    (a, b, _), _ = data
    return train_crosscoder([a, b], d_sae=256, k=8, steps=1500, batch_size=256, lr=3e-3, seed=0)


def test_batchtopk_recovers_planted_exclusives(data, batchtopk):
    (a, b, dirs), (a_eval, b_eval, _) = data
    diff = diff_latents(batchtopk, [a_eval, b_eval])
    labels, flagged = labels_of_features(batchtopk, diff, dirs)
    b_only = labels[N_SHARED:N_SHARED + N_B_ONLY]
    shared = labels[:N_SHARED]
    assert (b_only == 1).float().mean() >= 0.8, b_only
    assert (shared >= 0).float().mean() < 0.05, shared
    # BatchTopK keeps the weakly-shared features shared (no complete shrinkage), with the planted
    # norm ratio: relative norm 1 / (1 + WEAK_SCALE)
    weak = N_SHARED + N_B_ONLY + torch.arange(N_WEAK)
    assert (labels[weak] >= 0).float().mean() < 0.2
    w = batchtopk.W_dec[:, 1].detach()
    best = (dirs @ (w / w.norm(dim=-1, keepdim=True).clamp_min(1e-9)).T).argmax(1)
    assert diff.relative_norm[best[weak]].median().item() == pytest.approx(1 / (1 + WEAK_SCALE), abs=0.05)
    # Latent Scaling does not flag the true B-only latents (A's error has no component along them)
    assert flagged[N_SHARED:N_SHARED + N_B_ONLY][b_only == 1].float().mean() <= 0.05
    ev = explained_variance(batchtopk, [a_eval, b_eval])
    assert (ev > 0.8).all(), ev


def test_latent_scaling_matches_least_squares(data, batchtopk):
    """β by the blockwise closed form equals torch.linalg.lstsq on explicitly built targets."""
    _, (a, b, _) = data
    x = torch.stack([a, b], 1)[:1024]
    diff = diff_latents(batchtopk, [x[:, 0], x[:, 1]], block=300)  # blocks that do not divide n
    with torch.no_grad():
        f = batchtopk.encode(x)
        x_hat = batchtopk.decode(f)
        w_raw = batchtopk.W_dec * batchtopk.input_scale[None, :, None]
        b_raw = batchtopk.b_dec * batchtopk.input_scale[:, None]
    alive = torch.nonzero(f.sum(0) > 0).flatten()[:6]
    for j in alive.tolist():
        own = int(diff.relative_norm[j] > 0.5)
        u = w_raw[j, own]
        pred = (f[:, j:j + 1] * u).reshape(-1, 1).double()        # Tensor[n*d, 1]: the one regressor
        for s in range(2):
            contrib = f[:, j:j + 1] * w_raw[j, s]
            targets = [x[:, s] - x_hat[:, s] + contrib, x_hat[:, s] - b_raw[s] - contrib, x[:, s] - b_raw[s]]
            for t, y in enumerate(targets):
                beta = torch.linalg.lstsq(pred, y.reshape(-1, 1).double()).solution.item()
                assert diff.beta[j, s, t].item() == pytest.approx(beta, rel=1e-3, abs=1e-4)


def test_identical_sources_stay_within_calibrated_null(data):
    """Two identical sources: calibrate the cut on one null crosscoder, check a second (another seed,
    other tokens) labels no more latents exclusive than the calibrated null rate allows."""
    (a, _, _), (a_eval, _, _) = data
    null = train_crosscoder([a, a.clone()], d_sae=256, k=8, steps=200, batch_size=256, lr=3e-3, seed=1)
    calib = calibrate_threshold(null, [a_eval, a_eval], max_null_rate=0.01)
    assert 0 < calib.threshold <= 0.1 and calib.null_rate <= 0.01
    other = train_crosscoder([a_eval, a_eval.clone()], d_sae=256, k=8, steps=200, batch_size=256, lr=3e-3, seed=2)
    diff = diff_latents(other, [a, a], threshold=calib.threshold)
    excl = (diff.exclusive_to >= 0).sum().item()
    # null rate 1% of ~256 live latents -> binomial 99.9% bound ~ 8
    assert excl <= 8, (excl, diff)
    assert diff.n_alive > 100


def test_l1_shows_shrinkage_and_latent_scaling_flags_it(data, batchtopk):
    (a, b, dirs), (a_eval, b_eval, _) = data
    l1 = train_crosscoder([a, b], d_sae=256, sparsity="l1", l1_coefficient=L1_COEFFICIENT, steps=600,
                          batch_size=256, lr=3e-3, seed=0)
    diff = diff_latents(l1, [a_eval, b_eval])
    labels, flagged = labels_of_features(l1, diff, dirs)
    weak = slice(N_SHARED + N_B_ONLY, None)
    b_only = slice(N_SHARED, N_SHARED + N_B_ONLY)
    # the artefact: features present in both (weaker in A) labelled B-only by the L1 crosscoder...
    assert (labels[weak] == 1).float().mean() >= 0.3, labels[weak]
    # ... Latent Scaling sees A's error still needs them, and flags them; the true B-only mostly not
    shrunk = labels[weak] == 1
    assert flagged[weak][shrunk].float().mean() >= 0.7
    assert flagged[b_only][labels[b_only] == 1].float().mean() <= 0.2
    # the BatchTopK crosscoder on the same data did not produce the artefact
    bt_labels, _ = labels_of_features(batchtopk, diff_latents(batchtopk, [a_eval, b_eval]), dirs)
    assert (bt_labels[weak] == 1).float().mean() < (labels[weak] == 1).float().mean()


L1_COEFFICIENT = 0.2


def test_save_load_roundtrip_and_resume(tmp_path, monkeypatch, data):
    (a, b, _), _ = data
    a, b = a[:2048], b[:2048]
    kw = dict(d_sae=64, k=4, steps=40, batch_size=128, lr=3e-3, seed=3, checkpoint_every=10)
    ref = train_crosscoder_with_history([a, b], out_dir=tmp_path / "ref", **kw).crosscoder
    loaded = CrossCoder.load(tmp_path / "ref")
    x = torch.stack([a, b], 1)[:256]
    torch.testing.assert_close(loaded(x), ref(x).detach())
    assert loaded.W_dec.shape == (64, 2, D)

    real = train_module._batch_indices

    def crash_at_25(n, batch_size, step, seed):
        if step == 25:
            raise KeyboardInterrupt("simulated crash")
        return real(n, batch_size, step, seed)

    monkeypatch.setattr(train_module, "_batch_indices", crash_at_25)
    with pytest.raises(KeyboardInterrupt):
        train_crosscoder_with_history([a, b], out_dir=tmp_path / "cut", **kw)
    assert not (tmp_path / "cut").exists()  # nothing half-written in place
    monkeypatch.setattr(train_module, "_batch_indices", real)
    resumed = train_crosscoder_with_history([a, b], out_dir=tmp_path / "cut", **kw).crosscoder
    for (name, p), q in zip(ref.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, msg=name)


def test_labels_and_errors(data, batchtopk):
    _, (a, b, _) = data
    diff = diff_latents(batchtopk, [a, b])
    assert set(diff.exclusive_to.unique().tolist()) <= {DEAD, SHARED, 0, 1}
    assert "LatentDiff(" in repr(diff)
    with pytest.raises(ValueError, match="aligned"):
        diff_latents(batchtopk, [a, b[:-1]])
    with pytest.raises(ValueError, match="threshold"):
        diff_latents(batchtopk, [a, b], threshold=0.7)
    with pytest.raises(FileNotFoundError, match="crosscoder folder"):
        CrossCoder.load("/nonexistent")


def test_step_report_section_and_cli_errors(tmp_path):
    from qsae_lens.cli import main
    from qsae_lens.sweep.steps.crosscoder import (
        CrosscoderCell,
        CrosscoderSettings,
        CrosscoderStepResult,
        report_section,
    )

    cell = CrosscoderCell("nf4", 16, [0, 1], n_alive=[100, 80], only_baseline=[2, 4], only_precision=[3, 4],
                          artefacts=[1, 0], explained_variance=[[0.8, 0.7], [0.82, 0.72]],
                          relative_norms=[0.05, 0.5, 0.97], threshold=0.1, null_rate=0.0)
    mean, lo, hi = cell.fraction("exclusive")
    assert mean == pytest.approx((5 / 100 + 8 / 80) / 2) and lo <= mean <= hi
    assert cell.fraction("artefacts")[0] == pytest.approx((1 / 5 + 0 / 8) / 2)
    section = report_section(CrosscoderStepResult("fp32", CrosscoderSettings(), {"nf4/L16": cell}))
    assert section.key == "crosscoder" and "<table>" in section.html and "plotly" in section.html
    assert section.data["cells"]["nf4/L16"]["only_precision"] == [3, 4]
    assert "feature pages" not in section.markdown.lower()
    cell.pages = "crosscoder/nf4/layer16/pages"
    section = report_section(CrosscoderStepResult("fp32", CrosscoderSettings(), {"nf4/L16": cell}))
    assert "<a href='crosscoder/nf4/layer16/pages/index.html'>nf4/L16</a>" in section.html
    assert main(["crosscode", str(tmp_path), "--precision", "nf4"]) == 2  # not a sweep folder: one line, exit 2


def test_sparse_decode_matches_dense_in_values_and_gradients():
    """The training path's embedding_bag decode equals the dense einsum on the BatchTopK mask, in
    values and in the gradients of every parameter (both for BatchTopK's variable bags, empty bags
    included, and for the fixed-size aux-k selection); the mask itself is BatchTopK's rule."""
    from qsae_lens.crosscoder import CrossCoderConfig, SparseCodes

    torch.manual_seed(0)
    cc = CrossCoder(CrossCoderConfig(n_sources=2, d_in=32, d_sae=96, k=4, init_seed=3))
    x = torch.randn(64, 2, 32)
    x[5] = 0.0  # a token with (very likely) no kept latent: an empty bag
    target = torch.randn(64, 2, 32)

    def grads(sparse: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cc.zero_grad(set_to_none=True)
        pre = cc.pre_acts(x)
        codes, _ = cc.batch_topk_sparse(pre)
        top = torch.topk(pre, 7, dim=-1)
        aux = SparseCodes.from_topk(top.values, top.indices)
        if sparse:
            out = cc.decode_sparse(codes) + 0.5 * cc.decode_sparse(aux)
        else:  # independent formula: scatter to dense, one einsum
            f, _ = cc.batch_topk(pre)
            f_aux = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
            out = torch.einsum("nm,msd->nsd", f + 0.5 * f_aux, cc.W_dec)
        (out - target).pow(2).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in cc.named_parameters() if p.grad is not None}

    out_s, g_s = grads(True)
    out_d, g_d = grads(False)
    torch.testing.assert_close(out_s, out_d, rtol=1e-5, atol=1e-5)
    assert set(g_s) == set(g_d) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    for name in g_d:
        torch.testing.assert_close(g_s[name], g_d[name], rtol=1e-4, atol=1e-5, msg=name)
    codes, _ = cc.batch_topk_sparse(cc.pre_acts(x))
    assert codes.values.numel() <= 4 * 64 and bool((codes.values > 0).all())
    torch.testing.assert_close(cc.decode_dense_reference(codes), cc.decode_sparse(codes), rtol=1e-5, atol=1e-5)


def test_sparse_and_dense_training_agree(data):
    """A short run with the sparse decode and one with the dense reference decode end at the same
    weights up to float rounding (same batches, same maths)."""
    a, b, _ = data[0]
    runs = [train_crosscoder([a, b], d_sae=64, k=4, steps=30, batch_size=128, dead_steps=2, sparse_decode=sp)
            for sp in (True, False)]
    for name, p in runs[0].state_dict().items():
        torch.testing.assert_close(p, runs[1].state_dict()[name], rtol=1e-3, atol=1e-4, msg=name)


def test_exclusive_latent_pages(tmp_path, data, batchtopk, smollm2_path):
    """Pages for exactly the exclusive latents; each page's top example is the token where the latent's
    code is largest (a dense argmax over all rows), rendered at the right cached position with the real
    tokenizer; B-only latents contribute (almost) nothing to A; relative norm and cosine are listed."""
    from transformers import AutoTokenizer

    from qsae_lens.crosscoder.pages import exclusive_latent_pages

    _, (a, b, _) = data
    diff = diff_latents(batchtopk, [a, b], threshold=0.1)
    excl = set((diff.exclusive_to >= 0).nonzero().flatten().tolist())
    assert len(excl) >= 16  # the planted B-only features (test_batchtopk_recovers_planted_exclusives)
    g = torch.Generator().manual_seed(7)
    n_win, ctx = 40, 128
    token_ids = torch.randint(100, 40_000, (n_win, ctx), generator=g)
    positions = torch.randperm(n_win * ctx, generator=g)[: a.shape[0]].sort().values  # gaps: dropped rows
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    res = exclusive_latent_pages(batchtopk, [a, b], diff, token_ids, positions, tokenizer, tmp_path / "pages",
                                 max_latents=1000, k=5)
    assert set(res.latents) == excl
    with torch.no_grad():
        f = batchtopk.encode(torch.stack([a, b], 1))
    norms = batchtopk.decoder_norms().detach()
    index = (res.path / "index.html").read_text()
    for row, j in enumerate(res.latents):
        top_pos = int(positions[f[:, j].argmax()])
        assert int(res.top_rows[row, 0]) == top_pos
        page = (res.path / f"latent_{j:06d}.html").read_text()
        focus = tokenizer.decode([int(token_ids.flatten()[top_pos])])
        import html as html_mod

        assert f">{html_mod.escape(focus)}</span>" in page and "tok focus" in page
        assert f"{float(diff.relative_norm[j]):.3f}" in page and "decoder cosine" in page
        assert f"latent_{j:06d}.html" in index
        if int(diff.exclusive_to[j]) == 1:  # B-only: what it writes into A is (almost) nothing
            assert "only source1" in page
            assert float(norms[j, 0]) < 0.1 * float(norms[j, 1])
    # the near-exclusive shared latents, when asked: those farthest from 0.5 among the shared ones
    shared = [j for j in range(diff.exclusive_to.numel()) if int(diff.exclusive_to[j]) == SHARED]
    expected = sorted(sorted(shared, key=lambda j: -abs(float(diff.relative_norm[j]) - 0.5))[:3])
    near = exclusive_latent_pages(batchtopk, [a, b], diff, token_ids, positions, tokenizer, tmp_path / "near",
                                  max_latents=0, n_lopsided=3, k=2)
    assert near.latents == expected
    assert "<td>shared</td>" in (near.path / "index.html").read_text()
