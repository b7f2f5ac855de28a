"""Frozen-SAE survival, streaming top-k / histograms, the predictor and the logit lens, against planted truths."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from qsae_lens.survival import (
    FixedBinHistogram,
    RunningTopK,
    SurvivalReport,
    feature_survival,
)


def _planted_sae(d_in: int = 64, d_sae: int = 48, seed: int = 0):
    """A real SAELens StandardSAE with orthonormal decoder rows, W_enc = W_dec^T, b_enc = -1e-3:
    it encodes ``codes @ W_dec`` back to ``codes - 1e-3`` on firing entries (codes >= 0.05) and to
    exact zeros elsewhere (the small negative bias absorbs float round-off): a planted truth."""
    from sae_lens import StandardSAE, StandardSAEConfig

    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, dtype="float32", device="cpu"))
    q, _ = torch.linalg.qr(torch.randn(d_in, d_sae, generator=torch.Generator().manual_seed(seed)))
    with torch.no_grad():
        sae.W_dec.copy_(q.T)
        sae.W_enc.copy_(q)
        sae.b_enc.fill_(-1e-3)
        sae.b_dec.zero_()
    return sae


def _codes(n: int, d_sae: int, density: float = 0.1, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    fire = torch.rand(n, d_sae, generator=g) < density
    return torch.where(fire, torch.rand(n, d_sae, generator=g) * 3 + 0.5, torch.zeros(()))


@pytest.fixture(scope="module")
def planted():
    sae = _planted_sae()
    codes = _codes(4000, 48)
    codes[:, 40:] = 0  # latents 40..47 never fire in the reference
    return sae, codes, codes @ sae.W_dec.detach()


def test_identity_survives_with_correlation_one(planted):
    sae, codes, acts = planted
    rep = feature_survival(sae, acts, acts.clone(), n_bootstrap=20, block=700)
    alive = codes.gt(0).sum(0) >= 5
    assert all(s == "survived" for s, a in zip(rep.status, alive.tolist()) if a)
    assert all(s == "dead" for s, a in zip(rep.status, alive.tolist()) if not a)
    assert torch.allclose(rep.pearson[alive], torch.ones(int(alive.sum()), dtype=torch.float64), atol=1e-6)
    assert torch.allclose(rep.firing_jaccard[alive], torch.ones(int(alive.sum()), dtype=torch.float64))
    assert rep.fractions["survived"].value == 1.0 and rep.fractions["survived"].lo == 1.0
    assert torch.allclose(rep.topk_overlap[alive], torch.ones(int(alive.sum()), dtype=torch.float64))


def test_planted_died_blurred_born(planted):
    sae, codes, acts_ref = planted
    g = torch.Generator().manual_seed(5)
    died, blurred, born = [3, 7, 11], [20, 21, 22], [44]
    cq = codes.clone()
    cq[:, died] = 0
    fire = cq[:, blurred] > 0
    # noise along the chosen latents, on their firing tokens: correlation drops, firing set kept
    cq[:, blurred] = torch.where(fire, (cq[:, blurred] + 3 * torch.randn(fire.shape, generator=g)).clamp_min(0.05), cq[:, blurred])
    cq[:, born] = (torch.rand(len(codes), 1, generator=g) < 0.1).float()
    rep = feature_survival(sae, acts_ref, cq @ sae.W_dec.detach(), n_bootstrap=50)
    st = np.array(rep.status)
    assert sorted(np.flatnonzero(st == "died").tolist()) == died
    assert sorted(np.flatnonzero(st == "blurred").tolist()) == blurred
    assert np.flatnonzero(st == "born").tolist() == born
    assert set(np.flatnonzero(st == "dead").tolist()) == set(range(40, 48)) - set(born)
    # fractions over the 40 reference-alive latents; CI brackets the point value
    f = rep.fractions
    assert f["survived"].value == pytest.approx(34 / 40) and f["died"].value == pytest.approx(3 / 40)
    for fr in f.values():
        assert fr.lo <= fr.value + 1e-12 and fr.value <= fr.hi + 1e-12
    # Pearson and Jaccard written another way (numpy, dense codes)
    with torch.no_grad():  # dense codes, the straightforward way
        a = sae.encode(acts_ref).double().numpy()
        b = sae.encode(cq @ sae.W_dec.detach()).double().numpy()
    for i in [0, 20, 21]:
        assert rep.pearson[i].item() == pytest.approx(np.corrcoef(a[:, i], b[:, i])[0, 1], abs=1e-5)
        fa, fb = a[:, i] > 0, b[:, i] > 0
        assert rep.firing_jaccard[i].item() == pytest.approx((fa & fb).sum() / (fa | fb).sum())
        assert rep.magnitude_ratio[i].item() == pytest.approx(b[fa & fb, i].sum() / a[fa & fb, i].sum(), rel=1e-5)
    # the threshold curve is non-increasing, and equals the status fraction at the default threshold
    assert all(x >= y for x, y in zip(rep.curve, rep.curve[1:]))
    assert rep.curve[rep.curve_thresholds.index(0.8)] == pytest.approx(f["survived"].value)


def test_save_load_roundtrip(planted, tmp_path):
    sae, _, acts = planted
    rep = feature_survival(sae, acts[:500], acts[:500], n_bootstrap=5, label="x")
    back = SurvivalReport.load(rep.save(tmp_path / "s"))
    assert back.status == rep.status and torch.equal(back.pearson.nan_to_num(7), rep.pearson.nan_to_num(7))
    assert back.fractions == rep.fractions and "survived" in repr(back)


def test_running_topk_equals_dense_sort():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1000, 37, generator=g) * (torch.rand(1000, 37, generator=g) < 0.3)
    top = RunningTopK(37, 9)
    for s in range(0, 1000, 128):
        top.update(x[s:s + 128], s, keep=x[s:s + 128] > 0)
    dense = x.T.sort(dim=1, descending=True)
    assert torch.equal(top.values, dense.values[:, :9])
    assert torch.equal(x.T.gather(1, top.index), dense.values[:, :9])


def test_fixed_bin_histogram_matches_numpy():
    from qsae_lens.survival.streaming import HIST_EDGES

    g = torch.Generator().manual_seed(0)
    x = torch.exp(torch.randn(500, 6, generator=g) * 2) * (torch.rand(500, 6, generator=g) < 0.5)
    h = FixedBinHistogram(6)
    for s in range(0, 500, 77):
        h.update(x[s:s + 77])
    for i in range(6):
        v = x[:, i][x[:, i] > 0].clamp(HIST_EDGES[0].item(), HIST_EDGES[-1].item() * 0.999).numpy()
        ref, _ = np.histogram(v, bins=HIST_EDGES.double().numpy())
        assert h.counts[i].tolist() == ref.tolist()
    assert int(h.counts.sum()) == int((x > 0).sum())


def test_bad_shapes_refused(planted):
    sae, _, acts = planted
    with pytest.raises(ValueError, match="same tokens"):
        feature_survival(sae, acts, acts[:10])
    assert not math.isnan(feature_survival(sae, acts[:50], acts[:50], n_bootstrap=0).n_tokens)


# ----------------------------------------------------------------------------- top examples on the real model
@pytest.fixture(scope="module")
def model_fp32(smollm2_path):
    from qsae_lens.models import load_model

    return load_model(str(smollm2_path), "fp32", device="cpu")


@pytest.fixture(scope="module")
def small_sae():
    from sae_lens import StandardSAE, StandardSAEConfig

    torch.manual_seed(0)
    sae = StandardSAE(StandardSAEConfig(d_in=576, d_sae=64, dtype="float32", device="cpu"))
    with torch.no_grad():
        sae.b_enc.fill_(-0.5)  # sparse firing on random directions
    return sae.eval()


@pytest.fixture(scope="module")
def window_tokens(model_fp32):
    from qsae_lens.corpus import tokenize_corpus

    ds = tokenize_corpus(model_fp32.tokenizer, "stdlib", context_size=32, max_windows=12, seed=0)
    return torch.tensor(ds["input_ids"], dtype=torch.long)


def test_top_examples_streaming_equals_dense_sort(model_fp32, small_sae, window_tokens):
    from qsae_lens.activations import special_token_ids
    from qsae_lens.survival.examples import quantile_examples, top_examples

    hook = "blocks.3.hook_resid_post"
    ex = top_examples(small_sae, model_fp32, window_tokens, hook_name=hook, k=5, n_samples=8, batch_size=5)
    with torch.no_grad():  # the dense way: every code stored, masked, sorted
        _, cache = model_fp32.run_with_cache(window_tokens, names_filter=[hook], stop_at_layer=4)
        codes = small_sae.encode(cache[hook].reshape(-1, 576))
    special = torch.isin(window_tokens.reshape(-1), torch.tensor(special_token_ids(model_fp32.tokenizer)))
    codes[special] = 0
    dense = codes.T.sort(dim=1, descending=True).values[:, :5]
    fired = (codes > 0).sum(0)
    assert torch.equal(ex.fire_count, fired)
    m = dense > 0
    assert torch.allclose(ex.top_values[m], dense[m], atol=1e-5)
    assert torch.allclose(codes.T.gather(1, ex.top_rows.clamp_min(0))[m], dense[m], atol=1e-5)
    assert ex.n_tokens == int((~special).sum())
    assert int(ex.hist_counts.sum()) == int(fired.sum())
    # reservoir entries are real firing entries carrying their own activation
    i = int(fired.argmax())
    q = quantile_examples(ex, i, 4)
    assert [v for v, _ in q] == sorted(v for v, _ in q)
    for v, r in q:
        assert codes[r, i].item() == pytest.approx(v, abs=1e-5)


def test_logit_lens_reproduces_the_models_logits(model_fp32, window_tokens):
    """(normalized residual * gain) @ W_U through logit_lens equals the model's own logits: the gain fold is right."""
    from qsae_lens.survival.examples import logit_lens, unembedding

    W_U, gain = unembedding(model_fp32)
    assert W_U.shape == (576, model_fp32.cfg.d_vocab) and gain is not None
    with torch.no_grad():
        logits, cache = model_fp32.run_with_cache(window_tokens[:1], names_filter=["ln_final.hook_normalized"])
    normed = cache["ln_final.hook_normalized"][0, 5:8]
    lens = logit_lens(normed, W_U, gain, n=5)
    top = logits[0, 5:8].topk(5, dim=1)
    assert torch.equal(lens.top_ids, top.indices)
    assert torch.allclose(lens.top_values, top.values, rtol=1e-4, atol=1e-3)
    assert torch.equal(lens.bottom_ids, logits[0, 5:8].topk(5, dim=1, largest=False).indices)


def test_predictor_recovers_a_planted_rule():
    """Survival planted as a noisy function of one feature: the CV AUC matches the Bayes AUC, its coefficient dominates."""
    from scipy.stats import norm

    from qsae_lens.survival.predictor import predict_survival, weight_error_alignment

    g = torch.Generator().manual_seed(0)
    X = torch.randn(2000, 3, generator=g, dtype=torch.float64)
    y = (X[:, 1] + torch.randn(2000, generator=g, dtype=torch.float64)) > 0
    pred = predict_survival(X, y, ["a", "b", "c"])
    # Bayes AUC = P(x_pos > x_neg) under the class-conditional laws of x, integrated on a grid
    # (P(y=1 | x) = Phi(x)): independent of scikit-learn
    xs = np.linspace(-6, 6, 2001)
    dens = norm.pdf(xs)
    p_pos = norm.cdf(xs)  # P(y=1 | x)
    f_pos, f_neg = dens * p_pos, dens * (1 - p_pos)
    f_pos, f_neg = f_pos / f_pos.sum(), f_neg / f_neg.sum()
    bayes = float((f_pos * np.cumsum(f_neg)).sum())
    assert pred.auc == pytest.approx(bayes, abs=0.03)
    assert abs(pred.coefficients["b"]) > 5 * max(abs(pred.coefficients["a"]), abs(pred.coefficients["c"]))
    # weight_error_alignment: an error along a decoder direction gives d_model there, 0 orthogonal to it
    W = torch.eye(4)
    e = torch.zeros(4, 3)
    e[2] = 1.0
    assert weight_error_alignment(W, [e]).tolist() == [0.0, 0.0, 4.0, 0.0]


# ----------------------------------------------------------------------------- the sweep step, end to end
@pytest.mark.slow  # two real models, real caches, the atlas: ~1-2 min of CPU
def test_sweep_step_runs_and_reuses(smollm2_path, tmp_path):
    from types import SimpleNamespace

    from sae_lens import StandardSAE, StandardSAEConfig

    from qsae_lens.activations import cache_activations
    from qsae_lens.corpus import tokenize_corpus
    from qsae_lens.models import load_model
    from qsae_lens.precision import parse_precision
    from qsae_lens.sweep.plan import CellKey, CoreResults, SweepPlan
    from qsae_lens.sweep.steps import survival as step

    layer, precs = 1, ("fp32", "int8")
    cells = tuple(CellKey(p, layer, 0) for p in precs)
    plan = SweepPlan(config=SimpleNamespace(n_bootstrap=20), out_dir=tmp_path, model_path=str(smollm2_path), n_layers=30,
                     layers=(layer,), hook="hook_resid_post", precisions=tuple(parse_precision(p) for p in precs),
                     baseline="fp32", seeds=(0,), cells=cells, device="cpu")
    models = {p: load_model(str(smollm2_path), p, device="cpu") for p in precs}
    ds = tokenize_corpus(models["fp32"].tokenizer, "stdlib", context_size=32, max_windows=10, seed=1)
    saes = {}
    for i, c in enumerate(cells):
        cache_activations(models[c.precision], ds, [plan.hook_name(layer)],
                          tmp_path / "activations" / c.precision / "eval" / f"layers{layer}", progress=False)
        torch.manual_seed(i)
        sae = StandardSAE(StandardSAEConfig(d_in=576, d_sae=48, dtype="float32", device="cpu")).eval()
        with torch.no_grad():
            sae.b_enc.fill_(-0.3)
        sae.save_model(c.dir(tmp_path))
        saes[c] = sae
    core = CoreResults(models=models, tokenizer=models["fp32"].tokenizer,
                       eval_tokens=torch.tensor(ds["input_ids"]), saes=saes, max_norms={})
    step.ATLAS_LATENTS, step.ATLAS_WINDOWS = 6, 6
    res = step.run_step(plan, core)
    rep = res.reports["int8/L1"]
    # independent check of the stored result: recompute Pearson of one alive latent densely
    from qsae_lens.activations import load_activations

    a = saes[cells[0]].encode(load_activations(plan.cache_dir("fp32", "eval", layer), plan.hook_name(layer))).detach()
    b = saes[cells[0]].encode(load_activations(plan.cache_dir("int8", "eval", layer), plan.hook_name(layer))).detach()
    i = int((a > 0).sum(0).argmax())
    assert rep.pearson[i].item() == pytest.approx(np.corrcoef(a[:, i].double(), b[:, i].double())[0, 1], abs=1e-5)
    assert "int8/L1" in res.transposed and (tmp_path / res.atlas[1]).is_file()
    sec = step.report_section(res)
    assert sec.key == "survival" and "int8/L1" in sec.markdown and "<table>" in sec.html
    json.dumps(sec.data)
    stamp = (tmp_path / "survival" / "int8" / "layer1" / "_done.json").stat().st_mtime_ns
    step.run_step(plan, core)  # same inputs: reused, not recomputed
    assert (tmp_path / "survival" / "int8" / "layer1" / "_done.json").stat().st_mtime_ns == stamp
