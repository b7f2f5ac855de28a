"""qsae_lens.sweep end to end on the default model (fp32 and nf4, a tiny budget), resumability,
interruption safety, fast bad-input errors, and the ``qsae sweep`` command line.

One sweep run (module fixture) serves every assertion about its outputs; the resumability tests
come last in the file because they re-run and delete parts of that folder.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import pytest

TINY = dict(
    precisions=("fp32", "nf4"),
    train_tokens=2048,
    training_samples=25_600,  # 100 steps of 256 over ~2,000 cached vectors (~13 epochs)
    batch_size=256,  # _validate: train_tokens >= 4 batches, training_samples >= 10 batches
    lr=3e-3,
    d_sae=256,
    k=8,
    eval_windows=2,
    context_size=64,
    n_bootstrap=100,
    n_permutations=100,
    saelens_evals=True,
)
LAYER = 16  # the middle probe layer of the 30-layer SmolLM2


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    from qsae_lens.sweep import run_precision_sweep

    out = tmp_path_factory.mktemp("sweep")
    t0 = time.time()
    result = run_precision_sweep(None, out, progress=False, **TINY)
    return {"result": result, "out": out, "seconds": time.time() - t0}


def _cell(report, sae, model):
    return next(c for c in report["transfer"] if c["sae"] == sae and c["model"] == model)


def _sae_files(out: Path) -> dict[str, float]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in (out / "saes").rglob("*") if p.is_file()}


def test_report_files_and_transfer_matrix(sweep):
    out, report = sweep["out"], sweep["result"].report
    for name in ("report.json", "report.md", "report.html", "transfer.json", "sweep_config.json"):
        assert (out / name).stat().st_size > 0, name
    assert json.loads((out / "report.json").read_text())["schema_version"] == report["schema_version"]
    assert "plotly" in (out / "report.html").read_text()
    assert report["config"]["layers_resolved"] == [LAYER]
    saes = [f"fp32/L{LAYER}/s0", f"fp32/L{LAYER}/s1", f"nf4/L{LAYER}/s0"]
    assert sorted(c["sae"] for c in report["transfer"]) == sorted(saes * 2)
    for sae in saes:
        for model in ("fp32", "nf4"):
            c = _cell(report, sae, model)
            for key in ("explained_variance", "ce_clean", "ce_spliced", "ce_mean_ablation", "ce_increase", "kl",
                        "ce_recovered_vs_mean_ablation", "l0", "dead_fraction"):
                assert math.isfinite(c[key]), (sae, model, key)
            assert 0 < c["l0"] <= TINY["k"]
            assert c["ce_spliced"] > c["ce_clean"] - 0.05
            assert c["ce_mean_ablation"] > c["ce_spliced"]  # even a tiny SAE beats the mean
    m = report["models"]
    assert m["fp32"]["kl_vs_baseline"] == 0 and m["fp32"]["ce_increase_vs_baseline"] == 0
    assert m["nf4"]["kl_vs_baseline"] > 0  # nf4 changes the model's predictions
    assert "Q4_1" in " ".join(report["notes"])  # the default model's fp32 already went through Q4_1
    md = (out / "report.md").read_text()
    assert "quantization cost" in md and f"Layer {LAYER}" in md


def test_diagonal_ev_agrees_with_saelens_run_evals(sweep):
    """evals.py's explained variance on its own model vs SAELens run_evals' for the same SAE.

    Both use the same formula (1 - SS_res / SS_tot, special tokens excluded) and the same 2
    held-out windows, but run_evals draws its batches through an ActivationsStore that shuffles
    and cycles them, so the token multiset can differ: agreement within 0.05 absolute (measured: < 0.001 here).
    """
    report = sweep["result"].report
    ours = {c["sae"]: c["explained_variance"] for c in report["transfer"] if c["sae"].startswith(c["model"] + "/")}
    theirs = {k: v["reconstruction_quality/explained_variance"] for k, v in report["saelens_run_evals"].items()}
    assert sorted(ours) == sorted(theirs)
    for sae in ours:
        assert ours[sae] == pytest.approx(theirs[sae], abs=0.05), sae
        assert 0.1 < ours[sae] < 1.0  # trained SAEs (measured ~0.23-0.25), not noise


def test_comparisons_and_seed_control(sweep):
    report = sweep["result"].report
    kinds = {(c["kind"], c["a"], c["b"]): c for c in report["comparisons"]}
    assert set(kinds) == {("ceiling", "fp32", "fp32"), ("floor", "random", "fp32"),
                          ("same_seed", "nf4", "fp32"), ("different_seed", "nf4", "fp32")}
    for c in kinds.values():
        for name in ("decoder_matched_cosine", "decoder_mutual_nn_fraction", "activation_cka"):
            assert name in c["metrics"], (c["name"], name)

    def cos(kind):
        return kinds[kind]["metrics"]["decoder_matched_cosine"]["value"]

    same, diff = cos(("same_seed", "nf4", "fp32")), cos(("different_seed", "nf4", "fp32"))
    ceiling, floor = cos(("ceiling", "fp32", "fp32")), cos(("floor", "random", "fp32"))
    # a shared init keeps the latent order: same-seed pairs look alike for that reason alone
    assert same > diff + 0.1
    assert ceiling > floor
    summary = report["summary"][0]["precisions"]["nf4"]
    assert summary["precision_effect_vs_ceiling"] == pytest.approx(diff - ceiling)


def test_saved_saes_carry_precision_metadata_and_load_as_plain_topk(sweep):
    from sae_lens import SAE, TopKSAE

    out = sweep["out"]
    for precision, seed in (("fp32", 0), ("fp32", 1), ("nf4", 0)):
        folder = out / "saes" / precision / f"layer{LAYER}" / f"seed{seed}"
        cfg = json.loads((folder / "cfg.json").read_text())
        meta = cfg["metadata"]
        for key in ("precision", "quant_type", "compute_dtype", "bitsandbytes_version", "weights_sha256", "init_seed"):
            assert key in meta, (folder, key)
        assert meta["precision"] == precision and meta["init_seed"] == seed
        assert meta["hook_name"] == f"blocks.{LAYER}.hook_resid_post"
        assert cfg["architecture"] == "topk"
        sae = SAE.load_from_disk(str(folder))
        assert isinstance(sae, TopKSAE) and sae.cfg.k == TINY["k"] and sae.cfg.d_sae == TINY["d_sae"]
    nf4 = json.loads((out / "saes" / "nf4" / f"layer{LAYER}" / "seed0" / "cfg.json").read_text())["metadata"]
    fp32 = json.loads((out / "saes" / "fp32" / f"layer{LAYER}" / "seed0" / "cfg.json").read_text())["metadata"]
    assert nf4["quant_type"] == "nf4" and fp32["quant_type"] in (None, "none")
    assert nf4["weights_sha256"] != fp32["weights_sha256"] or nf4["precision"] != fp32["precision"]


def test_no_half_written_files_left(sweep):
    leftovers = [p for p in sweep["out"].rglob("*") if p.name.endswith((".partial", ".tmp")) or ".tmp-" in p.name
                 or p.name.endswith(".tmp") or ".partial" in p.name]
    assert leftovers == []


# ------------------------------------------------------------------------------------------
# resumability (mutates the fixture's folder: keep these last)


def test_rerun_retrains_nothing(sweep):
    from qsae_lens.sweep import run_precision_sweep

    out = sweep["out"]
    before = _sae_files(out)
    compare_before = {p: p.stat().st_mtime_ns for p in (out / "compare").rglob("report.json")}
    transfer_before = (out / "transfer.json").stat().st_mtime_ns
    t0 = time.time()
    result = run_precision_sweep(None, out, progress=False, **TINY)
    seconds = time.time() - t0
    assert _sae_files(out) == before
    assert {p: p.stat().st_mtime_ns for p in (out / "compare").rglob("report.json")} == compare_before
    assert (out / "transfer.json").stat().st_mtime_ns == transfer_before
    assert seconds < 0.6 * sweep["seconds"], (seconds, sweep["seconds"])
    assert result.report["transfer"] == sweep["result"].report["transfer"]


def test_deleting_one_cell_retrains_only_that_cell(sweep):
    from qsae_lens.sweep import run_precision_sweep

    out = sweep["out"]
    gone = out / "saes" / "nf4" / f"layer{LAYER}" / "seed0"
    shutil.rmtree(gone)
    before = _sae_files(out)
    ceiling = next((out / "compare").glob("*_ceiling_*")) / "report.json"
    same_seed = next((out / "compare").glob("*_same_seed_*")) / "report.json"
    ceiling_t, same_t = ceiling.stat().st_mtime_ns, same_seed.stat().st_mtime_ns
    transfer_t = (out / "transfer.json").stat().st_mtime_ns

    result = run_precision_sweep(None, out, progress=False, **{**TINY, "saelens_evals": False})  # spare ~40 s
    after = _sae_files(out)
    assert (gone / "cfg.json").exists()
    assert {k: v for k, v in after.items() if k in before} == before  # the others untouched
    assert {Path(k).parent for k in set(after) - set(before)} == {gone.relative_to(out)}
    # results computed from the deleted SAE are recomputed; those that never used it are kept
    assert same_seed.stat().st_mtime_ns != same_t
    assert ceiling.stat().st_mtime_ns == ceiling_t
    assert (out / "transfer.json").stat().st_mtime_ns != transfer_t
    assert len(result.report["transfer"]) == 6
    assert not [p for p in out.rglob("*") if ".partial" in p.name or p.name.endswith(".tmp")]


# ------------------------------------------------------------------------------------------
# bad input: clear errors before any long work


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"layers": (30,)}, ValueError, r"out of range: this model has layers 0\.\.29"),
        ({"precisions": ("fp32", "int3")}, ValueError, "int3"),
        ({"precisions": ("fp32", "nf4"), "device": "mps"}, RuntimeError, "not 'mps'|MPS is not available"),
        ({"corpus": ["", "   \n"]}, ValueError, "corpus is empty"),
        ({"corpus": []}, ValueError, "corpus is empty"),
        ({"corpus": "wikipedia"}, ValueError, "Unknown corpus 'wikipedia'"),
        ({"corpus": ["x = 1", "y = 2"]}, ValueError, "not enough for one window"),
        ({"train_tokens": 1000, "batch_size": 1024}, ValueError, "too small to train"),
        ({"train_tokens": 4096, "training_samples": 5000, "batch_size": 1024}, ValueError, "fewer than 10 steps"),
        ({"seeds": (0, 1), "ceiling_seed": 1}, ValueError, "ceiling_seed=1 must differ"),
        ({"architecture": "nope"}, ValueError, "Unknown architecture 'nope'"),
    ],
)
def test_bad_input_fails_fast(tmp_path, overrides, error, match):
    import qsae_lens.training  # noqa: F401 - pay the sae_lens import outside the timed call
    from qsae_lens.sweep import run_precision_sweep

    out = tmp_path / "run"
    t0 = time.time()
    with pytest.raises(error, match=match):
        run_precision_sweep(None, out, progress=False, **{**TINY, **overrides})
    assert time.time() - t0 < 10
    assert not out.exists()  # no activation cache, no folder at all


def test_cli_help(capsys):
    from qsae_lens.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["sweep", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for option in ("--precisions", "--layers", "--train-tokens", "--ceiling-seed", "--out"):
        assert option in text


def test_cli_parses_arguments_into_the_sweep(tmp_path):
    """Arguments reach run_precision_sweep: a layer out of range is reported with the valid range."""
    from qsae_lens.cli import build_parser, main
    from qsae_lens.sweep.run import _parse_layers_arg

    argv = ["sweep", "--precisions", "fp32,nf4", "--layers", "8,16", "--seeds", "0,2", "--d-sae", "512",
            "--out", str(tmp_path / "o")]
    args = build_parser(argv).parse_args(argv)
    assert args.precisions == "fp32,nf4" and args.d_sae == 512 and args.out == str(tmp_path / "o")
    assert _parse_layers_arg(args.layers) == (8, 16)
    assert _parse_layers_arg("probe") == "probe" and _parse_layers_arg("middle") is None
    with pytest.raises(ValueError, match=r"Layer\(s\) \[99\] out of range: this model has layers 0\.\.29"):
        main(["sweep", "--layers", "8,99", "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()
