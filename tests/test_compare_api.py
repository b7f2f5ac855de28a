"""compare_saes end to end on real SAELens SAEs saved with SAELens's own save_model.

Ground truths are independent of the code under test: identical / permuted / rotated SAEs (known
answers), numpy full-matrix formulas and scipy's Hungarian for random SAEs, explained variance and
category counts recomputed here by hand.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

D_IN, D_SAE, K = 32, 96, 8
N_TOKENS = 512
FAST = dict(n_bootstrap=300, n_permutations=500, n_null_draws=199, progress=False)


@pytest.fixture(scope="module", autouse=True)
def _null_cache(tmp_path_factory):
    """Keep the simulated-null cache of these tests out of the user's cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QSAE_LENS_CACHE", str(tmp_path_factory.mktemp("qsae_cache")))
        yield


def _unit_rows(n: int, d: int, seed: int) -> torch.Tensor:
    w = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return w / w.norm(dim=1, keepdim=True)


def _topk_sae(
    w_dec: torch.Tensor, *, b_enc=None, hook="blocks.3.hook_resid_post", model="smollm2", **metadata
):
    from sae_lens import TopKSAE, TopKSAEConfig

    cfg = TopKSAEConfig(d_in=w_dec.shape[1], d_sae=w_dec.shape[0], k=K)
    cfg.metadata.hook_name = hook
    cfg.metadata.model_name = model
    for key, value in metadata.items():
        cfg.metadata[key] = value
    sae = TopKSAE(cfg)
    with torch.no_grad():
        sae.W_dec.copy_(w_dec)
        sae.W_enc.copy_(w_dec.T)
        sae.b_enc.copy_(torch.zeros(w_dec.shape[0]) if b_enc is None else b_enc)
        sae.b_dec.zero_()
    return sae


def _save(sae, folder):
    sae.save_model(folder)
    return folder


@pytest.fixture(scope="module")
def saes(tmp_path_factory):
    """SAE folders: a; a again (identical); a with latents permuted; a random SAE; a rotated + permuted."""
    root = tmp_path_factory.mktemp("saes")
    w = _unit_rows(D_SAE, D_IN, seed=1)
    b_enc = 0.01 * torch.randn(D_SAE, generator=torch.Generator().manual_seed(5))
    perm = torch.randperm(D_SAE, generator=torch.Generator().manual_seed(2))
    q, _ = torch.linalg.qr(torch.randn(D_IN, D_IN, generator=torch.Generator().manual_seed(3)))
    out = {
        "a": _save(_topk_sae(w, b_enc=b_enc, precision="bf16", compute_dtype="bfloat16"), root / "a"),
        "a_copy": _save(
            _topk_sae(w.clone(), b_enc=b_enc.clone(), precision="nf4", quant_type="nf4"), root / "a2"
        ),
        "permuted": _save(_topk_sae(w[perm], b_enc=b_enc[perm]), root / "perm"),
        "random": _save(_topk_sae(_unit_rows(D_SAE, D_IN, seed=4)), root / "random"),
        "rotated": _save(_topk_sae((w @ q)[perm]), root / "rotated"),
    }
    out["perm"] = perm
    out["w"] = w
    return out


@pytest.fixture(scope="module")
def x_tokens():
    g = torch.Generator().manual_seed(7)
    return 0.5 + torch.randn(N_TOKENS, D_IN, generator=g)


@pytest.fixture(scope="module")
def identical_report(saes, x_tokens):
    from qsae_lens.compare import compare_saes

    return compare_saes(saes["a"], saes["a_copy"], activations=(x_tokens, x_tokens.clone()), **FAST)


def _cosine_like(name: str) -> bool:
    return any(s in name for s in ("cosine", "mutual_nn", "fraction_above", "cka", "correlation"))


def test_identical_saes_score_one_everywhere(identical_report, saes, x_tokens):
    from sae_lens import SAE

    m = identical_report.metrics
    required = {
        "decoder_cosine_best_match_ab", "decoder_cosine_best_match_ba", "encoder_cosine_best_match_ab",
        "decoder_mutual_nn_fraction", "decoder_matched_cosine", "decoder_matched_fraction_above_0.5",
        "decoder_matched_fraction_above_0.7", "decoder_matched_fraction_above_0.9",
        "decoder_procrustes_matched_cosine", "activation_cka", "activation_cka_debiased", "latent_code_cka",
        "latent_activation_correlation_matched", "cross_reconstruction_explained_variance_ab",
        "cross_reconstruction_explained_variance_ab_procrustes",
    }  # fmt: skip
    assert required <= set(m)
    for name, r in m.items():
        if _cosine_like(name):
            assert r.value == pytest.approx(1.0, abs=1e-5), name
    # every weight metric sits far above its null, with a CI and a Holm-adjusted p
    for name in ("decoder_cosine_best_match_ab", "decoder_matched_cosine", "decoder_mutual_nn_fraction"):
        assert m[name].null < 0.7 and m[name].ci_low == pytest.approx(1.0, abs=1e-5)
        assert m[name].p_value == pytest.approx(1 / 200)  # the smallest p 199 mirror-image null draws can give
        assert m[name].p_value_holm < 0.05
    # cross-reconstruction on identical inputs is the SAE's own explained variance, by hand
    sae = SAE.load_from_disk(saes["a"])
    with torch.no_grad():
        x_hat = sae.decode(sae.encode(x_tokens))
    ev = 1 - ((x_tokens - x_hat) ** 2).sum() / ((x_tokens - x_tokens.mean(0)) ** 2).sum()
    assert m["cross_reconstruction_explained_variance_ab"].value == pytest.approx(float(ev), abs=1e-5)
    assert m["cross_reconstruction_explained_variance_ab_procrustes"].value == pytest.approx(
        float(ev), abs=1e-4
    )
    # metadata and precision carried from cfg.metadata
    d = identical_report.to_dict()
    assert d["a"]["precision"] == {"precision": "bf16", "compute_dtype": "bfloat16"}
    assert d["b"]["precision"]["quant_type"] == "nf4"
    assert (d["a"]["architecture"], d["a"]["d_in"], d["a"]["d_sae"]) == ("topk", D_IN, D_SAE)
    assert identical_report.warnings == []


def test_permuted_latents_match_perfectly_while_rowwise_is_low(saes, x_tokens):
    from qsae_lens.compare import compare_saes

    rep = compare_saes(saes["a"], saes["permuted"], activations=(x_tokens, x_tokens), **FAST)
    m = rep.metrics
    for name in (
        "decoder_cosine_best_match_ab", "decoder_cosine_best_match_ba", "decoder_mutual_nn_fraction",
        "decoder_matched_cosine", "decoder_matched_fraction_above_0.9", "decoder_procrustes_matched_cosine",
        "latent_activation_correlation_matched", "latent_code_cka",
    ):  # fmt: skip
        assert m[name].value == pytest.approx(1.0, abs=1e-5), name
    # the naive row-by-row comparison (latent i of a vs latent i of b) is low for the same pair
    w, perm = saes["w"], saes["perm"]
    rowwise = float((w * w[perm]).sum(1).mean())
    assert rowwise < 0.2
    # categories: matched latents keep their category, so the transition table is diagonal
    cats = rep.to_dict()["latent_categories"]
    table = np.array(cats["transition"]["counts"])
    assert cats["source"] == "activations"
    assert table.sum() == D_SAE and np.trace(table) == D_SAE
    assert [cats["a"][n] for n in cats["names"]] == list(np.diag(table))


def _numpy_null(n_draws: int = 30):
    """Random-vs-random baseline by the methodology's full-matrix formulas (numpy + scipy Hungarian)."""
    from scipy.optimize import linear_sum_assignment

    rng = np.random.default_rng(123)
    bm, matched = [], []
    for _ in range(n_draws):
        a = rng.standard_normal((D_SAE, D_IN))
        b = rng.standard_normal((D_SAE, D_IN))
        a /= np.linalg.norm(a, axis=1, keepdims=True)
        b /= np.linalg.norm(b, axis=1, keepdims=True)
        s = a @ b.T
        bm.append(s.max(axis=1).mean())
        r, c = linear_sum_assignment(-s)
        matched.append(s[r, c].mean())
    return (np.mean(bm), np.std(bm)), (np.mean(matched), np.std(matched))


def test_random_saes_sit_at_the_null(saes):
    from qsae_lens.compare import compare_saes

    # the isotropic null is the right one for an isotropic random SAE: its numbers have a numpy twin
    rep = compare_saes(saes["a"], saes["random"], null="isotropic", **FAST)
    m = rep.metrics
    assert {r.null_kind for r in m.values() if r.null is not None} == {"isotropic"}
    (bm_mean, bm_sd), (mt_mean, mt_sd) = _numpy_null()
    for name in (
        "decoder_cosine_best_match_ab",
        "decoder_cosine_best_match_ba",
        "encoder_cosine_best_match_ab",
    ):
        assert abs(m[name].value - bm_mean) < 4 * bm_sd, name
        assert m[name].null == pytest.approx(bm_mean, abs=bm_sd)  # the reported null is the right one
    assert abs(m["decoder_matched_cosine"].value - mt_mean) < 4 * mt_sd
    assert m["decoder_matched_cosine"].null == pytest.approx(mt_mean, abs=2 * mt_sd)
    assert (
        abs(m["decoder_procrustes_matched_cosine"].value - m["decoder_procrustes_matched_cosine"].null) < 0.05
    )
    assert abs(m["decoder_mutual_nn_fraction"].value - m["decoder_mutual_nn_fraction"].null) < 0.15
    # nothing is significant after Holm
    assert all(r.p_value_holm is None or r.p_value_holm > 0.01 for r in m.values())
    # no activations and no sparsity file: categories unknown, said so
    assert rep.latent_categories["source"] is None
    # the default anisotropic null also puts an unrelated SAE at chance, and says which null it used
    aniso = compare_saes(saes["a"], saes["random"], **FAST).metrics
    assert aniso["decoder_matched_cosine"].null_kind == "anisotropic"
    assert abs(aniso["decoder_matched_cosine"].value - aniso["decoder_matched_cosine"].null) < 4 * mt_sd


def test_rotated_model_space_needs_procrustes(saes, tmp_path):
    from qsae_lens.compare import compare_saes

    # The map's moment start is computed from each training fold only, so it needs a dictionary whose
    # spectrum half its latents identify and whose coordinates are skewed (real dictionaries are both);
    # saes["rotated"] (isotropic Gaussian rows) has neither, and stays near chance, as it should.
    w = (torch.randn(D_SAE, D_IN, generator=torch.Generator().manual_seed(11)) ** 2 - 0.5) * torch.logspace(0, -3, D_IN)
    w = w / w.norm(dim=1, keepdim=True)
    q, _ = torch.linalg.qr(torch.randn(D_IN, D_IN, generator=torch.Generator().manual_seed(3)))
    a = _save(_topk_sae(w), tmp_path / "a")
    rotated = _save(_topk_sae((w @ q)[saes["perm"]]), tmp_path / "rot")
    m = compare_saes(a, rotated, **FAST).metrics
    assert m["decoder_matched_cosine"].value < 0.75
    # 48 training latents in 32 dims (2 folds of 96) recover the map only in part, but far above the
    # identity's CV score and the null (measured 0.706 against a null of 0.219)
    assert m["decoder_procrustes_matched_cosine"].value > 0.6
    assert m["decoder_procrustes_matched_cosine"].value > m["decoder_identity_cv_cosine"].value + 0.2
    assert m["decoder_procrustes_matched_cosine"].value > m["decoder_procrustes_matched_cosine"].null + 0.3


def test_schema_json_round_trip_and_save(identical_report, tmp_path):
    from qsae_lens.compare import ComparisonReport

    d = identical_report.to_dict()
    assert set(d) >= {"schema_version", "a", "b", "metrics", "latent_categories", "distributions", "warnings"}
    for meta in (d["a"], d["b"]):
        assert set(meta) >= {"architecture", "d_in", "d_sae", "hook", "model", "precision"}
    for entry in d["metrics"].values():
        assert set(entry) >= {"value", "ci_low", "ci_high", "null", "p_value"}
    dist = d["distributions"]["decoder_cosine_best_match_ab"]
    assert sum(dist["histogram"]["counts"]) == D_SAE == dist["n"]
    assert len(dist["histogram"]["edges"]) == len(dist["histogram"]["counts"]) + 1
    assert set(dist["quantiles"]) >= {"0.05", "0.5", "0.95"}

    text = identical_report.to_json(tmp_path / "r.json")
    assert json.loads(text) == d == json.loads((tmp_path / "r.json").read_text())
    assert ComparisonReport.from_json(tmp_path / "r.json").to_dict() == d

    md = identical_report.to_markdown()
    null = identical_report.metrics["decoder_matched_cosine"].null
    assert f"| decoder_matched_cosine | 1.000 | [1.000, 1.000] | {null:.3f} |" in md
    assert "decoder_cosine_best_match_ab" in repr(identical_report)

    figs = identical_report.figures()
    assert {"decoder_cosine_best_match_ab", "decoder_cosine_best_match_ba", "decoder_matched_cosine"} <= set(
        figs
    )
    assert "latent_category_transitions" in figs

    folder = identical_report.save(tmp_path / "out")
    assert sorted(p.name for p in folder.iterdir()) == ["report.html", "report.json", "report.md"]
    html = (folder / "report.html").read_text()
    assert "Plotly.newPlot" in html and len(html) > 1_000_000  # plotly.js inlined: works offline
    assert "Decoder best-match cosine, a \\u2192 b" in html and f"null {dist['null']:.3f}" in html
    assert json.loads((folder / "report.json").read_text()) == d


def test_cli_end_to_end(saes, x_tokens, tmp_path, capsys):
    from safetensors.torch import save_file

    from qsae_lens.cli import main

    save_file({"x": x_tokens}, str(tmp_path / "xa.safetensors"))
    save_file({"x": x_tokens}, str(tmp_path / "xb.safetensors"))
    out = tmp_path / "report"
    args = ["compare", str(saes["a"]), str(saes["permuted"]), "--out", str(out),
            "--activations", str(tmp_path / "xa.safetensors"), str(tmp_path / "xb.safetensors"),
            "--n-bootstrap", "200", "--n-permutations", "500", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| decoder_matched_cosine | 1.000 |" in printed and "activation_cka" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["metrics"]["latent_activation_correlation_matched"]["value"] == pytest.approx(1.0, abs=1e-5)
    assert (out / "report.html").is_file() and (out / "report.md").is_file()
    # the CLI's default null is compare_saes's: anisotropic; --null isotropic reads the uniform null
    assert report["metrics"]["decoder_matched_cosine"]["null_kind"] == "anisotropic"
    iso = tmp_path / "iso"
    assert main(["compare", str(saes["a"]), str(saes["permuted"]), "--out", str(iso), "--null", "isotropic",
                 "--n-bootstrap", "50", "--n-permutations", "50", "--no-progress"]) == 0  # fmt: skip
    capsys.readouterr()
    assert json.loads((iso / "report.json").read_text())["metrics"]["decoder_matched_cosine"]["null_kind"] == "isotropic"

    assert main(["compare", str(saes["a"]), str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "checkpoint folder" in capsys.readouterr().err


def test_bad_inputs(saes, tmp_path):
    from qsae_lens.compare import compare_saes

    wide = _save(_topk_sae(_unit_rows(D_SAE, D_IN + 8, seed=9)), tmp_path / "wide")
    with pytest.raises(ValueError, match=rf"different d_in.*d_in={D_IN}.*d_in={D_IN + 8}"):
        compare_saes(saes["a"], wide, **FAST)

    bad = _topk_sae(_unit_rows(D_SAE, D_IN, seed=10))
    with torch.no_grad():
        bad.W_dec[3, 5] = float("nan")
    with pytest.raises(ValueError, match=r"W_dec of SAE b .*1 NaN"):
        compare_saes(saes["a"], bad, **FAST)

    missing = tmp_path / "missing"
    missing.mkdir()
    (missing / "cfg.json").write_text((saes["a"] / "cfg.json").read_text())
    with pytest.raises(FileNotFoundError, match=r"missing.*is missing sae_weights\.safetensors"):
        compare_saes(missing, saes["a"], **FAST)
    corrupt = _save(_topk_sae(_unit_rows(D_SAE, D_IN, seed=11)), tmp_path / "corrupt")
    (corrupt / "sae_weights.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"SAE b: could not read the checkpoint at .*corrupt"):
        compare_saes(saes["a"], corrupt, **FAST)
    with pytest.raises(FileNotFoundError, match="no checkpoint folder"):
        compare_saes(saes["a"], tmp_path / "does_not_exist", **FAST)
    with pytest.raises(ValueError, match="same tokens"):
        compare_saes(saes["a"], saes["a"], activations=(torch.randn(10, D_IN), torch.randn(11, D_IN)), **FAST)

    # different hooks and models: runs, and says so
    other = _topk_sae(_unit_rows(D_SAE, D_IN, seed=1), hook="blocks.7.hook_resid_post", model="gpt2")
    rep = compare_saes(saes["a"], other, **FAST)
    assert any("hook points" in w and "blocks.7.hook_resid_post" in w for w in rep.warnings)
    assert any("models" in w and "gpt2" in w for w in rep.warnings)
    assert rep.metrics["decoder_matched_cosine"].value == pytest.approx(1.0, abs=1e-5)


def test_categories_from_sparsity_file(saes, tmp_path):
    """Without activations, categories come from SAELens's sparsity.safetensors (log10 frequency + 1e-10)."""
    import shutil

    from safetensors.torch import save_file

    from qsae_lens.compare import compare_saes

    freq = torch.rand(D_SAE, generator=torch.Generator().manual_seed(12)) ** 4
    freq[:5] = 0.0
    folders = []
    for name, f in (("sa", freq), ("sb", freq.flip(0))):
        folder = tmp_path / name
        shutil.copytree(saes["a"], folder)
        save_file({"sparsity": torch.log10(f + 1e-10)}, str(folder / "sparsity.safetensors"))
        folders.append(folder)
    cats = compare_saes(*folders, **FAST).latent_categories
    f = freq.double()
    expected = {
        "dead": int((f == 0).sum()),
        "rare": int(((f > 0) & (f < 0.01)).sum()),
        "common": int(((f >= 0.01) & (f < 0.5)).sum()),
        "frequent": int((f >= 0.5).sum()),
    }
    assert cats["source"] == "sparsity.safetensors"
    assert cats["a"] == expected == cats["b"]
    assert sum(map(sum, cats["transition"]["counts"])) == D_SAE
    assert not math.isnan(sum(expected.values()))


def test_hub_ids_resolve_through_saelens(saes, tmp_path, monkeypatch):
    """'owner/repo/sae_id' and (repo, sae_id) load through SAELens's from_pretrained from a hub cache
    laid out as huggingface_hub writes it (offline: the hub is unreachable here)."""
    import shutil

    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    from qsae_lens.compare import compare_saes

    repo_id, commit = "my-org/qsae-test-saes", "89abcdef0123456789abcdef0123456789abcdef"
    repo = tmp_path / "hub" / repo_folder_name(repo_id=repo_id, repo_type="model")
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for sae_id, key in (("resid3-bf16", "a"), ("resid3-perm", "permuted")):
        shutil.copytree(saes[key], repo / "snapshots" / commit / sae_id)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    rep = compare_saes(f"{repo_id}/resid3-bf16", (repo_id, "resid3-perm"), **FAST)
    assert rep.a["source"] == f"{repo_id}/resid3-bf16" and rep.b["source"] == f"{repo_id}/resid3-perm"
    assert rep.metrics["decoder_matched_cosine"].value == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match=r"SAE b: could not load 'nope' from 'my-org/qsae-test-saes'"):
        compare_saes(saes["a"], (repo_id, "nope"), **FAST)
    with pytest.raises(ValueError, match="neither a local folder nor a hub id"):
        compare_saes(saes["a"], "not-a-release/x", **FAST)


def test_code_cka_is_debiased_and_alive_only_excludes_dead_latents(saes):
    """Independent tokens: debiased code CKA ~ 0 (the biased form sits far above it when d_sae ~ n);
    latents that never fire are left out of decoder_matched_cosine_alive (checked against a hand mask)."""
    from sae_lens import SAE

    from qsae_lens.compare import compare_saes
    from qsae_lens.compare.activation_metrics import sae_codes
    from qsae_lens.compare.alignment import one_to_one_matching
    from qsae_lens.compare.cka import linear_cka

    g = torch.Generator().manual_seed(9)
    x_a, x_b = torch.randn(160, D_IN, generator=g), torch.randn(160, D_IN, generator=g)
    rep = compare_saes(saes["a"], saes["random"], activations=(x_a, x_b), **FAST)
    m = rep.metrics
    assert abs(m["latent_code_cka"].value) < 0.05
    sa, sb = SAE.load_from_disk(saes["a"]), SAE.load_from_disk(saes["random"])
    ca, cb = sae_codes(sa, x_a, 64), sae_codes(sb, x_b, 64)
    match = one_to_one_matching(sa.W_dec.detach(), sb.W_dec.detach())
    assert linear_cka(ca[:, match.rows], cb[:, match.cols]) > abs(m["latent_code_cka"].value) + 0.05
    # on 12 tokens (at most 96 firings of k=8) some latents never fire: they are left out
    few = compare_saes(saes["a"], saes["random"], activations=(x_a[:12], x_b[:12]), **FAST).metrics
    ca, cb = ca[:12], cb[:12]
    alive = (ca > 0).any(0)[match.rows] & (cb > 0).any(0)[match.cols]
    assert 0 < int(alive.sum()) < match.rows.numel()
    assert few["decoder_matched_cosine_alive"].value == pytest.approx(float(match.cosine[alive].double().mean()), abs=1e-6)
