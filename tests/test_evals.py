"""qsae_lens.evals.evaluate_transfer against independent computations on the real default model.

Every number evaluate_transfer returns is recomputed here another way: the clean CE from a plain
``model(tokens)`` call and ``F.cross_entropy``; the spliced and mean-ablated CE through our own
``run_with_hooks`` hook that writes by boolean-index assignment (evals.py uses ``torch.where``);
KL with ``F.kl_div``; explained variance, L0 and dead fraction from ``run_with_cache``
activations in one shot (evals.py accumulates float64 sums over uneven batches). A real SAELens
StandardSAE built to reconstruct exactly (ReLU(x) - ReLU(-x) = x) gives the known ground truth.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

LAYER = 15
HOOK = f"blocks.{LAYER}.hook_resid_post"


@pytest.fixture(scope="module")
def setup(smollm2_path):
    from qsae_lens.activations import special_token_ids
    from qsae_lens.corpus import tokenize_corpus
    from qsae_lens.models import load_model

    model = load_model(smollm2_path, "fp32")
    ds = tokenize_corpus(model.tokenizer, "stdlib", context_size=32, max_windows=4)
    tokens = torch.tensor(ds["input_ids"], dtype=torch.long)
    specials = special_token_ids(model.tokenizer)
    keep = ~torch.isin(tokens, torch.tensor(specials))
    assert not keep[:, 0].any(), "windows start with BOS: there must be special positions to exclude"
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=[HOOK])
    x = cache[HOOK][keep].float()  # [n_pos, d_in] ordinary-token activations
    return {"model": model, "tokens": tokens, "specials": specials, "keep": keep, "x": x}


def _random_topk_sae(d_in: int, mean: torch.Tensor):
    from sae_lens import TopKSAE, TopKSAEConfig

    torch.manual_seed(0)
    sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=256, k=8))
    with torch.no_grad():
        sae.b_dec.copy_(mean)  # so the reconstruction is in the right place and EV is informative
    sae.cfg.metadata.hook_name = HOOK
    return sae.eval()


def _exact_sae(d_in: int):
    """A real SAELens StandardSAE with W_enc = [I, -I], W_dec = [I; -I], zero biases: x_hat = x exactly."""
    from sae_lens import StandardSAE, StandardSAEConfig

    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=2 * d_in))
    eye = torch.eye(d_in)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    sae.cfg.metadata.hook_name = HOOK
    return sae.eval()


def _masked_ce(logits: torch.Tensor, tokens: torch.Tensor, scored: torch.Tensor) -> float:
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="none")
    return float(ce[scored.flatten()].mean())


def _replace_hook(keep: torch.Tensor, fn):
    def hook(act, hook):  # noqa: ARG001
        out = act.clone()
        out[keep] = fn(act[keep])
        return out

    return hook


@torch.no_grad()
def test_transfer_numbers_match_independent_computation(setup):
    from qsae_lens.evals import evaluate_transfer

    model, tokens, keep, x = setup["model"], setup["tokens"], setup["keep"], setup["x"]
    scored = keep[:, :-1] & keep[:, 1:]
    mean = x.mean(0)
    ablate_with = mean + 3.0  # any given vector works; offset it so it is not the eval mean by accident
    sae = _random_topk_sae(x.shape[1], mean)

    model_evals, cells = evaluate_transfer(
        {"fp32": model}, {"rand": sae}, tokens, baseline="fp32",
        mean_activations={("fp32", HOOK): ablate_with}, special_token_ids=setup["specials"],
        batch_size=3, progress=False,  # 4 windows in batches of 3 + 1: exercises the accumulation
    )
    c = cells[("rand", "fp32")]

    clean_logits = model(tokens)
    ce_clean = _masked_ce(clean_logits, tokens, scored)
    assert model_evals["fp32"].ce_loss == pytest.approx(ce_clean, rel=1e-5)
    assert c.ce_clean == pytest.approx(ce_clean, rel=1e-5)
    assert model_evals["fp32"].n_tokens == c.n_tokens == int(scored.sum())
    assert model_evals["fp32"].ce_increase_vs_baseline == 0.0

    sp_logits = model.run_with_hooks(tokens, fwd_hooks=[(HOOK, _replace_hook(keep, sae))])
    ce_sp = _masked_ce(sp_logits, tokens, scored)
    kl = F.kl_div(F.log_softmax(sp_logits[:, :-1].float(), -1), F.log_softmax(clean_logits[:, :-1].float(), -1),
                  log_target=True, reduction="none").sum(-1)[scored].mean()
    abl_logits = model.run_with_hooks(
        tokens, fwd_hooks=[(HOOK, _replace_hook(keep, lambda a: ablate_with.expand_as(a)))]
    )
    ce_abl = _masked_ce(abl_logits, tokens, scored)
    assert c.ce_spliced == pytest.approx(ce_sp, rel=1e-4)
    assert c.ce_increase == pytest.approx(ce_sp - ce_clean, abs=1e-4)
    assert c.kl == pytest.approx(float(kl), rel=1e-3, abs=1e-5)
    assert c.ce_mean_ablation == pytest.approx(ce_abl, rel=1e-4)
    assert c.ce_recovered_vs_mean_ablation == pytest.approx((ce_abl - ce_sp) / (ce_abl - ce_clean), rel=1e-3)
    assert ce_sp > ce_clean  # a random SAE costs something

    x_hat = sae(x)
    ev = 1 - ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert c.explained_variance == pytest.approx(float(ev), abs=1e-4)
    assert c.mse == pytest.approx(float(((x - x_hat) ** 2).sum(-1).mean()), rel=1e-4)
    codes = sae.encode(x)
    assert c.l0 == pytest.approx(float((codes != 0).sum(-1).float().mean()), rel=1e-6)
    assert c.dead_fraction == pytest.approx(float((~(codes != 0).any(0)).float().mean()), abs=1e-9)
    assert 0 < c.dead_fraction < 1  # a random TopK with k=8 over ~120 tokens leaves many of 256 latents dead


@torch.no_grad()
def test_exact_reconstruction_costs_nothing(setup):
    """ReLU(x) - ReLU(-x) = x: the spliced model is the clean one, so ΔCE ≈ 0, KL ≈ 0, EV ≈ 1, recovered ≈ 1."""
    from qsae_lens.evals import evaluate_transfer

    model, x = setup["model"], setup["x"]
    d_in = x.shape[1]
    sae = _exact_sae(d_in)
    assert torch.equal(sae(x), x)
    mean = x.mean(0)
    # the same model under two labels: the model-vs-baseline KL and ΔCE must be exactly 0
    model_evals, cells = evaluate_transfer(
        {"a": model, "b": model}, {"exact": sae}, setup["tokens"], baseline="a",
        mean_activations={("a", HOOK): mean, ("b", HOOK): mean}, special_token_ids=setup["specials"],
        progress=False,
    )
    assert model_evals["b"].kl_vs_baseline == pytest.approx(0.0, abs=1e-7)
    assert model_evals["b"].ce_increase_vs_baseline == pytest.approx(0.0, abs=1e-7)
    for m in ("a", "b"):
        c = cells[("exact", m)]
        assert abs(c.ce_increase) < 1e-5
        assert abs(c.kl) < 1e-6
        assert c.explained_variance == pytest.approx(1.0, abs=1e-6)
        assert c.mse < 1e-6
        assert c.ce_recovered_vs_mean_ablation == pytest.approx(1.0, abs=1e-4)
        assert c.ce_mean_ablation > c.ce_clean + 0.1  # mean ablation of layer 15 really hurts
        # every residual coordinate is non-zero, so exactly one of its two latents fires: L0 = d_in
        assert c.l0 == pytest.approx(float((x != 0).sum(-1).float().mean()))
        assert c.l0 == pytest.approx(d_in, abs=1)
        assert c.dead_fraction == pytest.approx(float((~(sae.encode(x) != 0).any(0)).float().mean()))


def test_bad_input_is_rejected_clearly(setup):
    from qsae_lens.evals import evaluate_transfer

    model, tokens, x = setup["model"], setup["tokens"], setup["x"]
    sae = _exact_sae(x.shape[1])
    means = {("fp32", HOOK): x.mean(0)}
    kw = {"special_token_ids": setup["specials"], "progress": False}
    with pytest.raises(ValueError, match="baseline 'int8' is not one of the models"):
        evaluate_transfer({"fp32": model}, {"s": sae}, tokens, baseline="int8", mean_activations=means, **kw)
    with pytest.raises(ValueError, match=r"mean_activations lacks \('fp32', 'blocks.15.hook_resid_post'\)"):
        evaluate_transfer({"fp32": model}, {"s": sae}, tokens, baseline="fp32", mean_activations={}, **kw)
    sae.cfg.metadata.hook_name = None
    with pytest.raises(ValueError, match="has no cfg.metadata.hook_name"):
        evaluate_transfer({"fp32": model}, {"s": sae}, tokens, baseline="fp32", mean_activations=means, **kw)
    with pytest.raises(ValueError, match="tokens must be"):
        evaluate_transfer({"fp32": model}, {}, tokens[0], baseline="fp32", mean_activations=means, **kw)


@torch.no_grad()
def test_outlier_positions_are_treated_like_special_tokens(setup):
    """With max_norms, positions whose baseline activation is longer than the limit are neither
    spliced nor scored: the numbers equal a hand computation with those positions masked out."""
    from qsae_lens.evals import evaluate_transfer

    model, tokens, keep = setup["model"], setup["tokens"], setup["keep"]
    _, cache = model.run_with_cache(tokens, names_filter=[HOOK])
    norms = cache[HOOK].float().norm(dim=-1)
    limit = float(norms[keep].quantile(0.9))  # drop the longest 10% of ordinary positions
    keep2 = keep & (norms <= limit)
    assert 0 < int((keep & ~keep2).sum()) < int(keep.sum())
    scored = keep2[:, :-1] & keep2[:, 1:]
    x = cache[HOOK][keep2].float()
    mean = x.mean(0)
    sae = _random_topk_sae(x.shape[1], mean)

    model_evals, cells = evaluate_transfer(
        {"fp32": model}, {"rand": sae}, tokens, baseline="fp32", mean_activations={("fp32", HOOK): mean},
        special_token_ids=setup["specials"], max_norms={HOOK: limit}, batch_size=3, progress=False,
    )
    c = cells[("rand", "fp32")]
    assert c.n_tokens == model_evals["fp32"].n_tokens == int(scored.sum())
    clean_logits = model(tokens)
    assert c.ce_clean == pytest.approx(_masked_ce(clean_logits, tokens, scored), rel=1e-5)
    sp_logits = model.run_with_hooks(tokens, fwd_hooks=[(HOOK, _replace_hook(keep2, sae))])
    assert c.ce_spliced == pytest.approx(_masked_ce(sp_logits, tokens, scored), rel=1e-4)
    x_hat = sae(x)
    ev = 1 - ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert c.explained_variance == pytest.approx(float(ev), abs=1e-4)


@torch.no_grad()
def test_window_bootstrap_intervals_match_resampling_the_rows_directly(setup):
    """The CI from per-window sums equals the percentiles of EV and ΔCE recomputed by concatenating the
    rows (and scored positions) of each resample's windows, drawn with the same seeded indices."""
    from qsae_lens.evals import evaluate_transfer

    model, tokens, keep = setup["model"], setup["tokens"], setup["keep"]
    mean = setup["x"].mean(0)
    sae = _random_topk_sae(setup["x"].shape[1], mean)
    n_boot = 200
    _, cells = evaluate_transfer({"fp32": model}, {"rand": sae}, tokens, baseline="fp32",
                                 mean_activations={("fp32", HOOK): mean}, special_token_ids=setup["specials"],
                                 batch_size=3, n_bootstrap=n_boot, seed=7, progress=False)
    c = cells[("rand", "fp32")]

    _, cache = model.run_with_cache(tokens, names_filter=[HOOK])
    acts = cache[HOOK].float()
    scored = keep[:, :-1] & keep[:, 1:]
    clean_logp = F.log_softmax(model(tokens).float(), -1)
    sp_logp = F.log_softmax(model.run_with_hooks(tokens, fwd_hooks=[(HOOK, _replace_hook(keep, sae))]).float(), -1)
    ce = lambda lp: -lp[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1)  # noqa: E731
    d_ce = (ce(sp_logp) - ce(clean_logp)) * scored
    idx = torch.randint(tokens.shape[0], (n_boot, tokens.shape[0]), generator=torch.Generator().manual_seed(7))
    evs, dces = [], []
    for row in idx:
        x = torch.cat([acts[w][keep[w]] for w in row.tolist()]).double()
        x_hat = sae(x.float()).double()
        evs.append(1 - ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
        dces.append(d_ce[row].sum() / scored[row].sum())
    q = torch.tensor([0.025, 0.975], dtype=torch.float64)
    ev_ci = torch.quantile(torch.stack(evs), q)
    dce_ci = torch.quantile(torch.stack(dces).double(), q)
    assert c.explained_variance_ci == pytest.approx(tuple(ev_ci.tolist()), abs=1e-4)
    assert c.ce_increase_ci == pytest.approx(tuple(dce_ci.tolist()), abs=1e-3)
    # with 4 windows a percentile can coincide with the full-sample value
    assert c.explained_variance_ci[0] <= c.explained_variance <= c.explained_variance_ci[1]


def test_explained_variance_accumulator_matches_saelens():
    """qsae_lens.metrics.ExplainedVariance against SAELens's own ExplainedVarianceCalculator, and the
    edge cases decided once: no rows raises, zero variance gives 1.0 (exact) or 0.0."""
    from sae_lens.evals import ExplainedVarianceCalculator

    from qsae_lens.metrics import ExplainedVariance

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 16, generator=gen, dtype=torch.float64) * 4 + 100  # a large mean: cancellation-prone
    x_hat = x + torch.randn(300, 16, generator=gen, dtype=torch.float64)
    mask = torch.rand(300, generator=gen) > 0.3
    ours = ExplainedVariance()
    ref = ExplainedVarianceCalculator()
    for lo, hi in ((0, 7), (7, 150), (150, 300)):  # uneven batches
        ours.update(x[lo:hi], x_hat[lo:hi], mask[lo:hi])
        ref.add_batch(x_hat[lo:hi][mask[lo:hi]], x[lo:hi][mask[lo:hi]])
    assert ours.n == int(mask.sum())
    assert ours.compute() == pytest.approx(ref.compute(), abs=1e-9)
    with pytest.raises(ValueError, match="at least one row"):
        ExplainedVariance().compute()
    const = torch.ones(5, 3)
    assert ExplainedVariance().update(const, const).compute() == 1.0
    assert ExplainedVariance().update(const, const + 1).compute() == 0.0


def test_flatten_run_evals_gives_slash_keys():
    from qsae_lens.evals import flatten_run_evals

    nested = {"reconstruction_quality": {"explained_variance": 0.9, "mse": 2}, "sparsity": {"l0": 31.5},
              "note": "text", "flag": True}
    assert flatten_run_evals(nested) == {"reconstruction_quality/explained_variance": 0.9,
                                         "reconstruction_quality/mse": 2.0, "sparsity/l0": 31.5, "flag": 1.0}
