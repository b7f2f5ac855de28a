"""qsae_lens.sweep end to end on the default model (fp32 and nf4, one layer, two seeds, a tiny budget).

One serial sweep (module fixture) serves the assertions about its outputs; the process-pool and
resume tests come last because they re-run into copies of that folder. Independent truths used:
the comparison folders' recorded inputs against the SAE files' own hashes (not the code's labels),
SAE weights trained by a two-process pool against the serial ones byte for byte (both at one
torch thread per job), and file modification times for "retrained nothing".
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

TINY = dict(
    precisions=("fp32", "nf4"),
    layers=(3,),  # an early layer: each forward stops after block 3
    seeds=(0, 1),
    train_tokens=512,
    training_samples=2560,  # 40 steps of 64
    batch_size=64,
    d_sae=64,
    k=4,
    eval_windows=4,
    context_size=32,
    n_bootstrap=20,
    n_permutations=20,
    saelens_evals=False,
    analyses=("seeds",),  # the headline; every other analysis has its own end-to-end test (slow)
)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    from qsae_lens.sweep import run_precision_sweep

    out = tmp_path_factory.mktemp("sweep") / "run"
    t0 = time.time()
    result = run_precision_sweep(None, out, progress=False, threads=1, **TINY)
    return {"result": result, "out": out, "seconds": time.time() - t0}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _plan(out):
    from qsae_lens.sweep import SweepConfig, plan_sweep

    return plan_sweep(SweepConfig(**TINY), out)


def test_added_layers_are_found_in_their_own_cache_group(tmp_path):
    """A layer added later is cached in a new group folder; each layer resolves to the group holding it."""
    from qsae_lens.sweep import SweepConfig, plan_sweep

    plan = plan_sweep(SweepConfig(**{**TINY, "layers": (3, 5, 8)}), tmp_path / "run")
    for group in ("layers3_5", "layers8", "layers9.partial"):
        folder = plan.out_dir / "activations" / "nf4" / "train" / group
        folder.mkdir(parents=True)
        if not group.endswith("partial"):
            (folder / "manifest.json").write_text("{}")
    assert plan.cache_dir("nf4", "train", 5).name == "layers3_5"
    assert plan.cache_dir("nf4", "train", 8).name == "layers8"
    assert plan.find_cache_dir("nf4", "train", 9) is None and plan.find_cache_dir("fp32", "train", 3) is None
    with pytest.raises(FileNotFoundError, match="layer 9 at nf4"):
        plan.cache_dir("nf4", "train", 9)


def test_every_seed_pair_is_compared(tmp_path):
    """3 seeds, 3 precisions: 3 ceiling pairs, one floor, and per non-baseline precision each seed against
    another baseline seed (every seed of both sides exactly once) plus the first seed's same-seed pair.
    (The seed-level statistics over all 9 cross pairs come from the seeds analysis, tested in test_seeds.py.)"""
    from collections import Counter

    from qsae_lens.sweep import SweepConfig, plan_sweep
    from qsae_lens.sweep.comparisons import comparison_pairs

    plan = plan_sweep(SweepConfig(**{**TINY, "precisions": ("fp32", "int8", "nf4"), "seeds": (2, 0, 1)}), tmp_path)
    pairs = comparison_pairs(plan)
    assert Counter(p.kind for p in pairs) == {"ceiling": 3, "floor": 1, "same_seed": 2, "different_seed": 6}
    for prec in ("int8", "nf4"):
        diff = [(p.a.seed, p.b.seed) for p in pairs if p.kind == "different_seed" and p.a.precision == prec]
        assert sorted(a for a, _ in diff) == [0, 1, 2] and sorted(b for _, b in diff) == [0, 1, 2]
        assert all(a != b for a, b in diff)
    assert len({p.name for p in pairs}) == len(pairs)
    assert all(p.b.precision == "fp32" for p in pairs)
    assert {(p.a.seed, p.b.seed) for p in pairs if p.kind == "ceiling"} == {(1, 0), (2, 0), (2, 1)}
    assert len(plan.cells) == 3 * 3  # every seed at every precision


def test_report_leads_with_the_headline_and_renders_tables(sweep):
    report, out = sweep["result"].report, sweep["out"]
    keys = list(report["sections"])
    assert keys[0] == "headline" and {"models", "transfer", "alignment", "training", "timings"} <= set(keys)
    page = (out / "report.html").read_text()
    assert page.index("Does this model") < page.index("<table")  # the answer before any table
    assert "<pre>" not in page and page.count("<table") >= 4
    assert page.count("plotly.js v") == 1 and "<script src" not in page  # plotly.js inlined once: opens offline
    md = (out / "report.md").read_text()
    assert md.startswith("# qsae_lens precision sweep") and "| SAE \\ model |" in md


def test_transfer_cells_carry_window_bootstrap_intervals(sweep):
    plan = _plan(sweep["out"])
    cells = sweep["result"].report["sections"]["transfer"]["cells"]
    assert len(cells) == len(plan.cells) * len(plan.precisions)  # every seed's row at every model
    for c in cells:
        lo, hi = c["explained_variance_ci"]
        assert lo <= hi and lo - 1e-9 <= c["explained_variance"] <= hi + 0.5  # point estimate inside or near
        assert c["ce_increase_ci"][0] <= c["ce_increase_ci"][1]


def test_comparisons_are_keyed_by_the_saes_they_compared(sweep):
    """Each compare folder records the content hash of the SAE files it read: recompute them from disk."""
    from qsae_lens.sweep.comparisons import comparison_pairs

    out = sweep["out"]
    plan = _plan(out)
    pairs = comparison_pairs(plan)
    kinds = sorted(p.kind for p in pairs)
    # 2 seeds: one ceiling pair, the floor, nf4 s0 vs fp32 s1 and s1 vs s0 (cyclic), nf4 s0 vs fp32 s0
    assert kinds == ["ceiling", "different_seed", "different_seed", "floor", "same_seed"]
    for pair in pairs:
        inputs = json.loads((out / "compare" / pair.name / "_done.json").read_text())["inputs"]
        assert inputs["b"]["cell"] == pair.b.label
        folder = pair.b.dir(out)
        expected = hashlib.sha256()
        for name in ("cfg.json", "sae_weights.safetensors"):
            expected.update(name.encode())
            expected.update(_sha(folder / name).encode())
        assert inputs["b"]["sae"] == expected.hexdigest()
        assert inputs["n_bootstrap"] == TINY["n_bootstrap"]


def test_no_temporaries_and_no_lock_left(sweep):
    out = sweep["out"]
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp") or p.name.endswith(".partial")]
    assert not (out / ".qsae.lock").exists()


def test_a_second_run_is_refused_while_the_folder_is_locked(tmp_path):
    """A live process holds the lock: the sweep refuses with a message naming it, and writes nothing."""
    import socket

    from qsae_lens._io import FolderLockedError
    from qsae_lens.sweep import run_precision_sweep

    out = tmp_path / "locked"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".qsae.lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname()}))
        with pytest.raises(FolderLockedError, match=f"pid {holder.pid}"):
            run_precision_sweep(None, out, progress=False, **TINY)
        assert sorted(p.name for p in out.iterdir()) == [".qsae.lock"]
    finally:
        holder.kill()
        holder.wait()


def test_process_pool_trains_bit_identical_weights(sweep, tmp_path):
    """The same cells trained by ProcessPoolExecutor(max_workers=2) (one torch thread per job, as the
    serial fixture) give byte-identical weight files."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from qsae_lens.sweep.data import data_identity
    from qsae_lens.sweep.train import train_cells

    out = tmp_path / "pool"
    shutil.copytree(sweep["out"] / "activations", out / "activations")
    plan = _plan(out)
    ids = {p: data_identity(plan, p, "stdlib") for p in plan.precision_names}
    with ProcessPoolExecutor(max_workers=2, mp_context=get_context("spawn")) as pool:
        result = train_cells(plan, {p: {} for p in plan.precision_names}, ids, pool, threads=1)
    assert result.n_trained == len(plan.cells)
    for key in plan.cells:
        assert _sha(key.dir(out) / "sae_weights.safetensors") == _sha(key.dir(sweep["out"]) / "sae_weights.safetensors")


def test_changed_n_bootstrap_recomputes_comparisons_and_trains_nothing(sweep, tmp_path):
    from qsae_lens.sweep import run_precision_sweep

    out = tmp_path / "resume"
    shutil.copytree(sweep["out"], out)
    plan = _plan(out)
    weights = {k: (k.dir(out) / "sae_weights.safetensors").stat().st_mtime_ns for k in plan.cells}
    done = {p.parent.name: p.read_text() for p in (out / "compare").glob("*/_done.json")}
    result = run_precision_sweep(None, out, progress=False, threads=1, **{**TINY, "n_bootstrap": 30})
    assert {k: (k.dir(out) / "sae_weights.safetensors").stat().st_mtime_ns for k in plan.cells} == weights
    assert not any(v["trained_in_this_run"] for v in result.report["sections"]["training"].values())
    for name, text in done.items():
        new = json.loads((out / "compare" / name / "_done.json").read_text())["inputs"]
        assert new["n_bootstrap"] == 30 and json.loads(text)["inputs"]["n_bootstrap"] == 20
    # the models' numbers do not depend on n_bootstrap
    assert result.report["sections"]["models"] == sweep["result"].report["sections"]["models"] or \
        all(abs(result.report["sections"]["models"][p]["ce_loss"] - sweep["result"].report["sections"]["models"][p]["ce_loss"]) < 1e-9
            for p in result.report["sections"]["models"])
