"""Interventions against independent truths: raw PyTorch hooks, planted directions, hand formulas."""

from __future__ import annotations

import functools

import pytest
import torch

HOOK = "blocks.3.hook_resid_post"
PROMPTS = ["def add(a, b):", "The capital of France is", "import numpy as np", "Once upon a time there"]


@pytest.fixture(scope="module")
def model(smollm2_path):
    from qsae_lens.models import load_model

    return load_model(smollm2_path, "fp32", "cpu")


@pytest.fixture(scope="module")
def sae():
    from sae_lens import StandardSAE, StandardSAEConfig

    torch.manual_seed(0)
    cfg = StandardSAEConfig(d_in=576, d_sae=128, dtype="float32", device="cpu")
    cfg.metadata.hook_name = HOOK
    s = StandardSAE(cfg).eval()
    with torch.no_grad():
        s.b_dec.normal_(0, 0.5)
        s.b_enc.normal_(0, 0.1)
        s.b_enc[7] = -1e4  # latent 7 never fires: clamping it to 0 is "clamp to current"
    return s


def _rel(a, b):
    return float((a - b).abs().max().detach() / b.abs().max().detach())


def _tokens(model):
    return model.to_tokens(PROMPTS[:2], padding_side="left")


def test_zero_strength_and_clamp_to_current_change_nothing(model, sae):
    from qsae_lens.interventions import steer, steer_feature

    toks = _tokens(model)
    clean = model(toks)
    with steer(model, torch.randn(576), 0.0, hook_name=HOOK):
        assert _rel(model(toks), clean) < 1e-5
    with steer_feature(model, sae, 3, 0.0, mode="add"):
        assert _rel(model(toks), clean) < 1e-5
    with steer_feature(model, sae, 7, 0.0, mode="clamp"):  # splice with error term, latent already 0
        assert _rel(model(toks), clean) < 1e-5
    with steer_feature(model, sae, 7, 5.0, mode="clamp"):  # a real clamp does change the logits
        assert _rel(model(toks), clean) > 1e-3


def test_steer_equals_raw_pytorch_forward_hook(model):
    from qsae_lens.interventions import steer

    v = torch.randn(576, generator=torch.Generator().manual_seed(1))
    toks = _tokens(model)
    with steer(model, v, 3.0, hook_name=HOOK):
        ours = model(toks)

    def raw(module, args, output):  # noqa: ARG001  -- decoder layer 3's output is resid_post 3
        if isinstance(output, tuple):
            return (output[0] + 3.0 * v, *output[1:])
        return output + 3.0 * v

    handle = model.hf_model.model.layers[3].register_forward_hook(raw)
    try:
        ref = model(toks)
    finally:
        handle.remove()
    assert _rel(ours, ref) < 1e-5


def test_clamp_equals_hand_written_splice(model, sae):
    """clamp(latent=5, value=2) == x + (2 - f_5(x)) W_dec[5] with f = ReLU((x - b_dec) W_enc + b_enc)."""
    from qsae_lens.interventions import steer_feature

    toks = _tokens(model)
    with steer_feature(model, sae, 5, 2.0, mode="clamp"):
        ours = model(toks)
    W_enc, b_enc, W_dec, b_dec = (t.detach() for t in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))

    def raw(module, args, output):  # noqa: ARG001
        x = output[0] if isinstance(output, tuple) else output
        f5 = torch.relu((x - b_dec) @ W_enc[:, 5] + b_enc[5])
        y = x + (2.0 - f5)[..., None] * W_dec[5]
        return (y, *output[1:]) if isinstance(output, tuple) else y

    handle = model.hf_model.model.layers[3].register_forward_hook(raw)
    try:
        ref = model(toks)
    finally:
        handle.remove()
    assert _rel(ours, ref) < 1e-4


def test_caa_recovers_planted_direction(model):
    """Pairs that differ only by a planted direction at the hook give it back exactly; pairs of
    different texts plus the planted offset give it back once it dominates the text differences."""
    from qsae_lens.interventions import caa_from_activations, collect_activations, steer

    planted = torch.randn(576, generator=torch.Generator().manual_seed(2))
    planted = planted / planted.norm()
    negatives = ["x = 1", "print('hi')", "# a comment", "for i in range(3):"]
    positives = ["y = 2", "return None", "# another one", "while True:"]
    neg = collect_activations(model, negatives, hook_name=HOOK, aggregation="mean")
    with steer(model, planted, 600.0, hook_name=HOOK):
        pos_same = collect_activations(model, negatives, hook_name=HOOK, aggregation="mean")
        pos = collect_activations(model, positives, hook_name=HOOK, aggregation="last")
    exact = caa_from_activations(pos_same, neg)
    assert float(torch.nn.functional.cosine_similarity(exact.vector, planted, dim=0)) > 0.9999
    assert abs(exact.norm - 600.0) < 1e-2 * 600.0 and exact.pair_agreement > 0.9999
    neg_last = collect_activations(model, negatives, hook_name=HOOK, aggregation="last")
    noisy = caa_from_activations(pos, neg_last)
    # Different texts add a residual difference of norm ~130 here (measured): cos(600, 130) ~ 0.977.
    assert float(torch.nn.functional.cosine_similarity(noisy.vector, planted, dim=0)) > 0.95, noisy
    assert noisy.pair_agreement > 0.9


def test_zero_ablation_of_all_latents_leaves_the_error_term(model, sae):
    """With b_dec = 0, zero-ablating every latent (error term kept) = replacing x by x - SAE(x)."""
    from sae_lens import StandardSAE

    from qsae_lens.interventions import ablate

    s = StandardSAE(sae.cfg).eval()
    s.load_state_dict(sae.state_dict())
    with torch.no_grad():
        s.b_dec.zero_()
    toks = _tokens(model)
    with ablate(model, s, None, mode="zero"):
        ours = model(toks)
    W_enc, b_enc, W_dec = (t.detach() for t in (s.W_enc, s.b_enc, s.W_dec))

    def raw(module, args, output):  # noqa: ARG001
        x = output[0] if isinstance(output, tuple) else output
        err = x - torch.relu(x @ W_enc + b_enc) @ W_dec
        return (err, *output[1:]) if isinstance(output, tuple) else err

    handle = model.hf_model.model.layers[3].register_forward_hook(raw)
    try:
        ref = model(toks)
    finally:
        handle.remove()
    assert _rel(ours, ref) < 1e-4


def test_mean_ablation_and_direction_ablation(model, sae):
    from qsae_lens.interventions import ablate, ablate_direction, intervention_effect

    toks = _tokens(model)
    _, cache = model.run_with_cache(toks, names_filter=[HOOK])
    acts = cache[HOOK].reshape(-1, 576)
    # Mean-ablating a latent that never fires changes nothing (its mean is 0).
    clean = model(toks)
    with ablate(model, sae, [7], mode="mean", cache=acts):
        assert _rel(model(toks), clean) < 1e-5
    # After projecting u out, the activation the next hook sees has no component along u.
    u = torch.randn(576, generator=torch.Generator().manual_seed(4))
    seen = {}
    with ablate_direction(model, u, hook_name=HOOK):
        model.run_with_hooks(toks, fwd_hooks=[(HOOK, lambda a, hook: seen.setdefault("x", a))])
    assert float((seen["x"] @ (u / u.norm())).abs().max()) < 1e-3
    effect = intervention_effect(model, toks, lambda: ablate(model, sae, None, mode="resample", cache=acts),
                                 n_resamples=200)
    assert effect.kl.value > 0 and effect.n_sequences == 2


def test_generated_positions_only_and_strength_sweep(model):
    from qsae_lens.interventions import logprob_diff_measure, steer, strength_sweep

    v = torch.randn(576, generator=torch.Generator().manual_seed(5)) * 8
    plain = model.generate(PROMPTS[1], max_new_tokens=3, do_sample=False, return_type="tokens")
    with steer(model, v, 20.0, hook_name=HOOK, positions="generated"):
        gen_only = model.generate(PROMPTS[1], max_new_tokens=3, do_sample=False, return_type="tokens")
    n = model.to_tokens(PROMPTS[1]).shape[1]
    assert torch.equal(gen_only[:, : n + 1], plain[:, : n + 1])  # the first new token comes from the prompt pass
    sweep = strength_sweep(model, v, [0.0, 10.0], PROMPTS, hook_name=HOOK,
                           measure=logprob_diff_measure(model, " #", " return"), n_resamples=200)
    zero, big = sweep.points
    assert abs(zero.effect.value) < 1e-5 and zero.kl.value < 1e-6
    assert big.kl.value > 1e-3 and big.kl.ci_low <= big.kl.value <= big.kl.ci_high


def test_transfer_identical_models_ratio_one(model, sae):
    from qsae_lens.interventions import feature_effect_correlation, intervention_transfer, steer_feature
    from qsae_lens.interventions.caa import logprob_diff_measure

    iv = functools.partial(steer_feature, sae=sae, latent=3, strength=30.0)
    res = intervention_transfer({"fp32": model, "same": model}, lambda m: iv(m),
                                PROMPTS[:3], lambda m: logprob_diff_measure(m, " #", " return"), n_resamples=200)
    assert abs(res.effects["same"].ratio.value - 1.0) < 1e-9
    corr = feature_effect_correlation({"fp32": model, "same": model}, sae, [1, 2, 3], PROMPTS[:1], strength=30.0)
    assert abs(corr.pearson["same"] - 1.0) < 1e-9 and corr.effects["fp32"].shape == (3,)


@pytest.mark.slow
def test_sweep_step_measurements_and_section(model, sae, smollm2_path):
    """The sweep step's measurements at fp32 and nf4 (the baseline's CAA ratio is 1 by construction),
    and its report section renders. (At layer 3 the nf4 effect came out negative: -2.56 vs fp32 > 0.)"""
    import math
    import time

    from qsae_lens.models import load_model
    from qsae_lens.sweep.steps.interventions import compute_interventions, report_section

    nf4 = load_model(smollm2_path, "nf4", "cpu")
    tokens = model.to_tokens(["def add(a, b):\n    return a + b\n# done", "import os\nprint(os.getcwd())"])
    t0 = time.perf_counter()
    res = compute_interventions({"fp32": model, "nf4": nf4}, sae, tokens, baseline="fp32", hook_name=HOOK, layer=3)
    elapsed = time.perf_counter() - t0
    assert abs(res.caa["fp32"]["ratio"] - 1.0) < 1e-9 and res.caa["fp32"]["effect"] > 0
    assert math.isfinite(res.caa["nf4"]["effect"]) and len(res.latents) == 8
    section = report_section(res)
    assert "Interventions across precisions" == section.title and "nf4" in section.markdown
    print(f"compute_interventions fp32+nf4: {elapsed:.1f} s; {res.caa}; r={res.feature_pearson}")
