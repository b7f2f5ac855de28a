"""Probing: planted truths for probes and control tasks, error-rate control of the latent tests over
repeated simulations, scipy per-latent loops as the reference, and real-model feature extraction."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qsae_lens.probing import (
    control_task_labels,
    latent_scores,
    latent_tests,
    sparse_probe,
    top_latents,
    train_probe,
)
from qsae_lens.probing.probes import cv_splits


def _planted(n: int = 1200, d: int = 32, n_types: int = 120, n_groups: int = 40, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    direction = rng.normal(size=d)
    direction /= np.linalg.norm(direction)
    x = rng.normal(size=(n, d)) + 4.0 * np.outer(2 * labels - 1, direction)
    return x.astype(np.float32), labels, rng.integers(0, n_types, n), rng.integers(0, n_groups, n)


def test_planted_direction_is_probed_and_its_control_task_stays_at_chance():
    x, y, types, groups = _planted()
    r = train_probe(x, y, types=types, groups=groups, cv=5)
    assert r.accuracy.value > 0.95
    # the features say nothing about the per-type random labels: control accuracy near 1/2
    assert abs(r.control_accuracy.value - 0.5) < 0.07
    assert r.selectivity.value > 0.38
    assert r.accuracy.ci_low <= r.accuracy.value <= r.accuracy.ci_high
    assert np.isclose(r.selectivity.value, r.accuracy.value - r.control_accuracy.value)


def test_one_hot_word_types_memorise_high_control_low_selectivity():
    # Hewitt & Liang's warning: features that identify the word type let a probe fit *any* labelling
    # of types, so the control task is learnt as well as the real one and selectivity is near 0.
    rng = np.random.default_rng(1)
    n, n_types = 1500, 30
    types = rng.integers(0, n_types, n)
    y = (types % 3 == 0).astype(np.int64)  # the task is a function of the type
    x = np.eye(n_types, dtype=np.float32)[types]
    r = train_probe(x, y, types=types, groups=rng.integers(0, 50, n), cv=5)
    assert r.accuracy.value > 0.98
    assert r.control_accuracy.value > 0.95
    assert abs(r.selectivity.value) < 0.05


def test_control_labels_constant_per_type_keep_class_frequencies():
    rng = np.random.default_rng(2)
    types = rng.integers(0, 3000, 30000)
    labels = rng.choice([0, 1, 2], size=30000, p=[0.6, 0.3, 0.1])
    ctl = control_task_labels(types, labels, seed=5)
    order = np.argsort(types, kind="stable")
    t_sorted, c_sorted = types[order], ctl[order]
    same = t_sorted[1:] == t_sorted[:-1]
    assert np.all(c_sorted[1:][same] == c_sorted[:-1][same])
    # per-type draws from the label distribution: over 3000 types the shares are within ~3 SE
    uniq_first = np.unique(types, return_index=True)[1]
    share = np.bincount(ctl[uniq_first], minlength=3) / len(uniq_first)
    assert np.allclose(share, [0.6, 0.3, 0.1], atol=0.03)
    assert np.array_equal(ctl, control_task_labels(types, labels, seed=5))


def test_grouped_splits_never_leak_a_group():
    rng = np.random.default_rng(3)
    groups = rng.integers(0, 23, 700)
    labels = rng.integers(0, 4, 700)
    splits = cv_splits(labels, groups, cv=5, seed=1)
    tested = np.concatenate([te for _, te in splits])
    assert np.array_equal(np.sort(tested), np.arange(700))  # every row tested exactly once
    for tr, te in splits:
        assert not set(groups[tr]) & set(groups[te])
    with pytest.raises(ValueError, match="groups"):
        cv_splits(labels, groups % 3, cv=5)


def test_latent_scores_and_sparse_probe_find_a_planted_latent():
    rng = np.random.default_rng(4)
    n, d = 900, 300
    y = rng.integers(0, 3, n)
    codes = np.maximum(rng.normal(size=(n, d)), 0).astype(np.float32)
    codes[:, 7] += 3.0 * (y == 2)
    # reference: the formula written as a loop over classes with boolean masks
    ref = np.max([np.abs(codes[y == c].mean(0) - codes[y != c].mean(0)) for c in range(3)], axis=0)
    assert np.allclose(latent_scores(codes, y).numpy(), ref, atol=1e-6)
    assert top_latents(codes, y, 1)[0] == 7
    sp = sparse_probe(codes, y, ks=(1, 5), groups=rng.integers(0, 30, n), cv=5)
    assert sp.top_latents[0] == 7
    # one latent separates class 2 from the rest (~2/3 accuracy: classes 0 and 1 look alike)
    assert 0.6 < sp.accuracy[0].value < 0.72


def _simulate(test: str, correction: str, n_sims: int, m: int = 200, m1: int = 20, n: int = 40, effect: float = 1.2):
    rng = np.random.default_rng(5)
    false_any, fdp, power = [], [], []
    y = np.r_[np.zeros(n, np.int64), np.ones(n, np.int64)]
    for _ in range(n_sims):
        x = rng.normal(size=(2 * n, m))
        x[n:, :m1] += effect  # planted effects on the first m1 latents
        r = latent_tests(x, y, test=test, correction=correction, alpha=0.05).rejected.numpy()
        false_rej = r[m1:].sum()
        false_any.append(false_rej > 0)
        fdp.append(false_rej / max(r.sum(), 1))
        power.append(r[:m1].mean())
    return np.mean(false_any), np.mean(fdp), np.mean(power)


def test_holm_controls_fwer_and_bh_controls_fdr_over_simulations():
    n_sims = 300
    se = np.sqrt(0.05 * 0.95 / n_sims)
    fwer, _, power_holm = _simulate("welch", "holm", n_sims)
    assert fwer <= 0.05 + 3 * se and power_holm > 0.3
    # an uncorrected family of 180 true nulls would reject somewhere almost always: 1 - 0.95**180 ~ 1
    _, fdr, power_bh = _simulate("welch", "bh", n_sims)
    assert fdr <= 0.05 + 3 * se and power_bh >= power_holm
    fwer_mw, _, _ = _simulate("mannwhitney", "holm", 60)
    assert fwer_mw <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / 60)


def test_vectorised_tests_equal_scipy_per_latent_loop():
    from scipy import stats

    rng = np.random.default_rng(6)
    n, d = 150, 25
    y = (rng.random(n) < 0.4).astype(np.int64)
    codes = np.maximum(rng.normal(size=(n, d)) + 0.5 * y[:, None] * (np.arange(d) % 3 == 0), 0)
    codes[:, 4] = 0.0  # a dead latent: no test possible, p = 1
    welch = latent_tests(torch.tensor(codes), torch.tensor(y), test="welch", block=7)
    mw = latent_tests(codes, y, test="mannwhitney", correction="bh", block=7)
    for j in range(d):
        a, b = codes[y == 1, j], codes[y == 0, j]
        if j == 4:
            assert welch.p_value[j] == 1.0 and mw.p_value[j] == 1.0 and welch.effect_size[j] == 0.0
            continue
        t = stats.ttest_ind(a, b, equal_var=False)
        u = stats.mannwhitneyu(a, b, alternative="two-sided")
        assert np.isclose(welch.statistic[j].item(), t.statistic) and np.isclose(welch.p_value[j].item(), t.pvalue)
        assert np.isclose(mw.statistic[j].item(), u.statistic) and np.isclose(mw.p_value[j].item(), u.pvalue)
        pooled = np.sqrt((np.sum((a - a.mean()) ** 2) + np.sum((b - b.mean()) ** 2)) / (len(a) + len(b) - 2))
        assert np.isclose(welch.effect_size[j].item(), (a.mean() - b.mean()) / pooled)
    # Holm by its definition, written out: sorted p times (m - i), running max, capped at 1
    p = welch.p_value.numpy()
    o = np.argsort(p)
    adj = np.minimum(1, np.maximum.accumulate(p[o] * (d - np.arange(d))))
    assert np.allclose(welch.p_corrected.numpy()[o], adj)
    assert torch.equal(welch.rejected, welch.p_corrected <= 0.05)


def test_python_token_labels_match_hand_labels(smollm2_path):
    from transformers import AutoTokenizer

    from qsae_lens.probing.tasks import TOKEN_CLASSES, python_char_classes, token_classes

    src = "if value == 42:  # answer\n    name = 'text'\n"
    chars = python_char_classes(src)
    expect = {"if": "keyword", "value": "identifier", "==": "operator", "42": "number", "# answer": "comment",
              "name": "identifier", "=": "operator", "'text'": "string"}
    for piece, cls in expect.items():
        i = src.index(piece if piece != "=" else " = ") + (1 if piece == "=" else 0)
        assert set(chars[i:i + len(piece)].tolist()) == {TOKEN_CLASSES.index(cls)}, piece
    assert chars[src.index(":")] == TOKEN_CLASSES.index("operator") and chars[2] == -1
    tok = AutoTokenizer.from_pretrained(smollm2_path)
    enc = tok(src, add_special_tokens=False, return_offsets_mapping=True)
    cls = token_classes(chars, np.asarray(enc["offset_mapping"]))
    for tid, c, (a, b) in zip(enc["input_ids"], cls, enc["offset_mapping"]):
        text = src[a:b].strip()
        if text in expect:
            assert TOKEN_CLASSES[c] == expect[text], (tok.decode([tid]), TOKEN_CLASSES[c])


def test_task_features_equal_a_direct_forward(smollm2_path):
    from qsae_lens.models import load_model
    from qsae_lens.probing.api import task_features
    from qsae_lens.probing.tasks import build_task

    model = load_model(smollm2_path, "fp32", "cpu")
    tok_task = build_task("py_keyword", model.tokenizer, n_examples=60, max_docs=12, context=48)
    seq_task = build_task("shakespeare_king", model.tokenizer, n_examples=8, context=24)
    feats = task_features(model, [tok_task, seq_task], [1], batch_size=4, progress=False)
    assert feats[("py_keyword", 1)].shape == (len(tok_task.labels), 576)
    hook = "blocks.1.hook_resid_post"
    for row in (0, len(tok_task.labels) - 1):
        w = torch.tensor([tok_task.windows[tok_task.window_index[row]]])
        _, cache = model.run_with_cache(w, names_filter=[hook], stop_at_layer=2, return_type=None)
        assert torch.allclose(feats[("py_keyword", 1)][row], cache[hook][0, tok_task.position[row]], atol=1e-4)
    w = torch.tensor([seq_task.windows[0]])
    _, cache = model.run_with_cache(w, names_filter=[hook], stop_at_layer=2, return_type=None)
    assert torch.allclose(feats[("shakespeare_king", 1)][0], cache[hook][0, 1:].mean(0), atol=1e-4)
    # labels: the decoded token at each keyword row is a Python keyword
    import keyword

    for row in np.flatnonzero(tok_task.labels == 1)[:10]:
        text = model.tokenizer.decode([tok_task.windows[tok_task.window_index[row]][tok_task.position[row]]]).strip()
        assert keyword.iskeyword(text), text


def test_probe_command_rejects_bad_sae_spec():
    import argparse

    from qsae_lens.probing.cli import add_probe_arguments, run_probe_command

    p = argparse.ArgumentParser()
    add_probe_arguments(p)
    with pytest.raises(ValueError, match="LAYER=FOLDER"):
        run_probe_command(p.parse_args(["--sae", "nolayer"]))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_probe_command(p.parse_args(["--sae", "3=/nonexistent/sae"]))


def test_unknown_task_and_missing_probes_extra_are_clear_errors():
    import importlib.util

    from qsae_lens.probing.tasks import build_task

    with pytest.raises(ValueError, match="Unknown probing task"):
        build_task("no_such_task", tokenizer=None)
    if importlib.util.find_spec("sae_probes") is None:  # the 'probes' extra is not installed here
        with pytest.raises(ImportError, match=r"qsae-lens\[probes\]"):
            build_task("sae_probes:5_hist_fig_ismale", tokenizer=None)


@pytest.mark.slow
def test_probe_sweep_and_sweep_step_end_to_end(smollm2_path, tmp_path, monkeypatch):
    """Two precisions, a real (randomly initialised) SAELens SAE applied to both, the report page,
    and the sweep step computed once then reused."""
    from sae_lens import StandardSAE, StandardSAEConfig

    import qsae_lens.sweep.steps.probing as step
    from qsae_lens.models import load_model
    from qsae_lens.precision import parse_precision
    from qsae_lens.probing.api import ProbeSweepResult, probe_sweep
    from qsae_lens.probing.report import probe_html_page
    from qsae_lens.probing.tasks import build_task
    from qsae_lens.sweep.plan import CellKey, CoreResults, SweepPlan
    from qsae_lens.sweep.reuse import DONE

    torch.manual_seed(0)
    models = {p: load_model(smollm2_path, p, "cpu") for p in ("fp32", "int8")}
    sae = StandardSAE(StandardSAEConfig(d_in=576, d_sae=256)).eval()
    task = build_task("py_keyword", models["fp32"].tokenizer, n_examples=160, max_docs=20, context=48)
    res = probe_sweep(models, [task], [2], saes={2: sae}, ks=(1, 5), top_k=10, progress=False)
    assert {(r.precision, r.source) for r in res.probes} == {(p, s) for p in models for s in ("resid", "sae")}
    # keyword vs identifier is readable from the residual after two blocks
    assert res.probe("py_keyword", "fp32", 2).accuracy > 0.85
    assert res.probe("py_keyword", "int8", 2).accuracy > 0.85
    assert [o.overlap for o in res.overlap if o.precision == "fp32"] == [1.0]  # the baseline with itself
    assert len(res.sparse) == 2 * 2
    again = ProbeSweepResult.from_json(json.loads(json.dumps(res.to_json())))
    assert again.probes == res.probes and again.overlap == res.overlap
    page = probe_html_page(res)
    # plotly.js inlined (the bundle is > 1 MB), nothing fetched from a server
    assert len(page) > 1_000_000 and "<script src=" not in page and "py_keyword" in page

    out = tmp_path / "sweep"
    key = CellKey("fp32", 2, 0)
    sae.save_model(str(key.dir(out)))
    plan = SweepPlan(config=None, out_dir=out, model_path=str(smollm2_path), n_layers=30, layers=(2,),
                     hook="hook_resid_post", precisions=tuple(parse_precision(p) for p in models), baseline="fp32",
                     seeds=(0,), cells=(key,), device="cpu")
    core = CoreResults(models=models, tokenizer=models["fp32"].tokenizer, eval_tokens=None, saes={key: sae},
                       max_norms={})
    monkeypatch.setattr(step, "TASKS", ("py_keyword",))
    monkeypatch.setattr(step, "N_EXAMPLES", 120)
    first = step.run_step(plan, core)
    stamp = (plan.step_dir(step.NAME) / DONE).stat().st_mtime_ns
    second = step.run_step(plan, core)
    assert (plan.step_dir(step.NAME) / DONE).stat().st_mtime_ns == stamp  # reused, not recomputed
    assert first.probes == second.probes and {r.source for r in first.probes} == {"resid", "sae"}
    section = step.report_section(first)
    assert section.key == "probing" and "selectivity" in section.markdown and "<table>" in section.html
