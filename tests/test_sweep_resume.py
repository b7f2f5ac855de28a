"""Crash injection: a sweep killed (SIGKILL) just before each kind of atomic rename, then re-run, ends
with the same outputs as an uninterrupted run, no temporaries, and no stale lock in the way.

The child process replaces ``os.replace`` by a wrapper that kills the process when the rename's
destination has a given name (``seed0``: a cell folder; ``transfer``; a comparison folder;
``report.json``; ``manifest.json``: an activation cache). Killing there is the worst moment: all the
work of that write is done and nothing is in place. Also: ``--seeds 0,2`` then ``--seeds 2,0`` reuse
every comparison under the right labels (checked against the SAE files' own hashes); a process-pool
worker SIGKILLed mid-cell, then a re-run, completes with no partial file; submitit's local executor
trains the same bytes as the serial run. Slow (several sweeps): ``pytest -m slow tests/test_sweep_resume.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

TINY = dict(precisions=("fp32", "nf4"), layers=(3,), seeds=(0, 1), train_tokens=512, training_samples=2560,
            batch_size=64, d_sae=64, k=4, eval_windows=4, context_size=32, n_bootstrap=20, n_permutations=20,
            saelens_evals=False, analyses=())
# tests/test_sweep.py's tiny sweep without the analyses (each has its own step test; here they would
# add ~1 of the ~4 minutes every sweep takes on a loaded 2-core machine)

CHILD = """
import json, os, signal, sys
target = os.environ["QSAE_TEST_CRASH_AT"]
real_replace = os.replace
def replace(src, dst, *args, **kwargs):
    if os.path.basename(os.fspath(dst)) == target:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst, *args, **kwargs)
os.replace = replace
from qsae_lens.sweep import run_precision_sweep
run_precision_sweep(None, sys.argv[1], progress=False, threads=1, **json.loads(sys.argv[2]))
"""

CRASH_POINTS = ["manifest.json", "seed0", "transfer", "L3_ceiling_fp32s1_vs_fp32s0", "report.json"]


def _settings() -> str:
    return json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in TINY.items()})


def _fingerprint(out: Path) -> dict[str, str]:
    """Hashes of what must not depend on an interruption: weights, transfer numbers, comparison metrics."""
    fp = {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(out.glob("saes/*/layer*/seed*/sae_weights.safetensors"))}
    transfer = json.loads((out / "transfer" / "transfer.json").read_text())
    fp["transfer"] = hashlib.sha256(json.dumps([transfer["models"], transfer["cells"]], sort_keys=True).encode()).hexdigest()
    for p in sorted(out.glob("compare/*/report.json")):
        metrics = json.loads(p.read_text())["metrics"]
        fp[p.parent.name] = hashlib.sha256(json.dumps(metrics, sort_keys=True).encode()).hexdigest()
    return fp


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from qsae_lens.sweep import run_precision_sweep

    out = tmp_path_factory.mktemp("ref") / "run"
    run_precision_sweep(None, out, progress=False, threads=1, **TINY)
    return out


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_killed_before_a_rename_then_rerun_matches_the_uninterrupted_run(point, reference, tmp_path):
    from qsae_lens.sweep import run_precision_sweep

    out = tmp_path / "run"
    child = subprocess.run([sys.executable, "-c", CHILD, str(out), _settings()], env={**os.environ,
                           "QSAE_TEST_CRASH_AT": point}, capture_output=True, text=True, timeout=3000)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert (out / ".qsae.lock").exists()  # left by the killed run: must be taken over as stale
    run_precision_sweep(None, out, progress=False, threads=1, **TINY)
    assert _fingerprint(out) == _fingerprint(reference)
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert (out / "report.html").exists() and not (out / ".qsae.lock").exists()


def _check_labels(out: Path, rows: list[dict]) -> None:
    """Each report row names the cells its comparison folder recorded, and those are the SAEs now on disk
    (the recorded checkpoint hash equals the cell folder's own content hash: not the code's labels)."""
    from qsae_lens.sweep.reuse import sae_identity

    assert rows
    for row in rows:
        inputs = json.loads((out / "compare" / row["name"] / "_done.json").read_text())["inputs"]
        for side in ("a", "b"):
            assert inputs[side]["cell"] == row[side]
            if not row[side].startswith("random"):
                precision, layer, seed = row[side].split("/")
                folder = out / "saes" / precision / f"layer{layer[1:]}" / f"seed{seed[1:]}"
                assert inputs[side]["sae"] == sae_identity(folder), (row["name"], side)


def test_reordered_seeds_reuse_comparisons_under_the_right_labels(reference, tmp_path):
    """Issue 15's case: ``--seeds 0,2`` (here extending a finished 0,1 sweep), then ``--seeds 2,0``: the
    second run recomputes nothing, and every comparison is reported under the cells it compared."""
    from qsae_lens.sweep import run_precision_sweep

    out = tmp_path / "run"
    shutil.copytree(reference, out)
    first = run_precision_sweep(None, out, progress=False, threads=1, **{**TINY, "seeds": (0, 2)})
    _check_labels(out, first.report["sections"]["alignment"]["comparisons"])
    before = {p.parent.name: p.read_text() for p in out.glob("compare/*/_done.json")}
    assert any("s2" in name for name in before)
    result = run_precision_sweep(None, out, progress=False, threads=1, **{**TINY, "seeds": (2, 0)})
    after = {p.parent.name: p.read_text() for p in out.glob("compare/*/_done.json")}
    assert after == before  # nothing recomputed, nothing relabelled
    assert not any(v["trained_in_this_run"] for v in result.report["sections"]["training"].values())
    _check_labels(out, result.report["sections"]["alignment"]["comparisons"])


WORKER_HOOK = """
import os, signal


def call(fn, job):
    \"\"\"Run ``fn(job)``; in the job of the cell named by QSAE_TEST_KILL_CELL, SIGKILL this worker when
    it writes train_stats.json into the cell's temporary folder (the SAE weights already written).\"\"\"
    if job.folder.endswith(os.environ["QSAE_TEST_KILL_CELL"]):
        real_replace = os.replace

        def replace(src, dst, *args, **kwargs):
            if os.path.basename(os.fspath(dst)) == "train_stats.json":
                os.kill(os.getpid(), signal.SIGKILL)
            return real_replace(src, dst, *args, **kwargs)

        os.replace = replace
    return fn(job)
"""

POOL_CHILD = """
import json, sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
import qsae_test_worker_hook
from qsae_lens.sweep import run_precision_sweep


class Hooked:
    def __init__(self, pool):
        self.pool = pool

    def submit(self, fn, *args, **kwargs):
        return self.pool.submit(qsae_test_worker_hook.call, fn, *args, **kwargs)


with ProcessPoolExecutor(max_workers=2, mp_context=get_context("spawn")) as pool:
    run_precision_sweep(None, sys.argv[1], executor=Hooked(pool), progress=False, threads=1, **json.loads(sys.argv[2]))
"""


def test_worker_killed_mid_cell_then_rerun_completes_with_no_partial_file(reference, tmp_path):
    """A ProcessPoolExecutor worker is SIGKILLed inside a training job (weights written in the cell's
    temporary folder, not renamed): the sweep fails, the half-built cell is not in place; re-running
    completes with the uninterrupted run's outputs and no temporary left."""
    from qsae_lens.sweep import run_precision_sweep

    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "qsae_test_worker_hook.py").write_text(WORKER_HOOK)
    out = tmp_path / "run"
    env = {**os.environ, "QSAE_TEST_KILL_CELL": os.path.join("fp32", "layer3", "seed1"),
           "PYTHONPATH": os.pathsep.join([str(hooks), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.run([sys.executable, "-c", POOL_CHILD, str(out), _settings()], env=env,
                           capture_output=True, text=True, timeout=3000)
    assert child.returncode == 1 and "BrokenProcessPool" in child.stderr, child.stderr[-2000:]
    cell = out / "saes" / "fp32" / "layer3"
    partial = [p for p in cell.iterdir() if p.name.startswith(".seed1.") and p.name.endswith(".tmp")]
    assert partial and (partial[0] / "sae_weights.safetensors").exists()  # killed mid-cell, as intended
    assert not (cell / "seed1").exists()
    run_precision_sweep(None, out, progress=False, threads=1, **TINY)
    assert _fingerprint(out) == _fingerprint(reference)
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert (out / "report.html").exists() and not (out / ".qsae.lock").exists()


def test_submitit_local_executor_matches_the_serial_run(reference, tmp_path):
    """``--executor slurm`` on a machine without SLURM: submitit's AutoExecutor runs each cell as a local
    job (its own process); weights are byte-identical to the serial run's (one torch thread each), the
    transfer numbers equal, and the comparison values agree to float32 round-off."""
    pytest.importorskip("submitit", reason="the slurm extra: pip install 'qsae-lens[slurm]'")
    from qsae_lens.sweep import run_precision_sweep
    from qsae_lens.sweep.executors import make_executor

    executor = make_executor("slurm", log_dir=tmp_path / "jobs", slurm={"timeout_min": 30})
    if executor.cluster != "local":
        pytest.skip(f"a real {executor.cluster} cluster is here; this test only runs submitit's local executor")
    out = tmp_path / "run"
    run_precision_sweep(None, out, executor=executor, progress=False, threads=1, **TINY)
    mine, ref = _fingerprint(out), _fingerprint(reference)
    same = [k for k in ref if k.startswith("saes/") or k == "transfer"]
    assert {k: mine[k] for k in same} == {k: ref[k] for k in same}  # weights and transfer: the same bytes
    # The comparisons run in this process, whose torch thread count the serial run had set to 1 (its
    # training jobs ran here) but this run did not: metric values agree to float32 round-off, not bitwise.
    for p in sorted(reference.glob("compare/*/report.json")):
        a = json.loads(p.read_text())["metrics"]
        b = json.loads((out / "compare" / p.parent.name / "report.json").read_text())["metrics"]
        assert a.keys() == b.keys()
        for name in a:
            if isinstance(a[name], dict) and a[name].get("value") is not None:
                assert b[name]["value"] == pytest.approx(a[name]["value"], rel=1e-4, abs=1e-5), (p.parent.name, name)
    assert list((tmp_path / "jobs").glob("*_result.pkl"))  # the cells really ran as submitit jobs
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
