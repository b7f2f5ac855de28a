"""Crash injection: a sweep killed (SIGKILL) just before each kind of atomic rename, then re-run, ends
with the same outputs as an uninterrupted run, no temporaries, and no stale lock in the way.

The child process replaces ``os.replace`` by a wrapper that kills the process when the rename's
destination has a given name (``seed0``: a cell folder; ``transfer``; a comparison folder;
``report.json``; ``manifest.json``: an activation cache). Killing there is the worst moment: all the
work of that write is done and nothing is in place. Also: reordered seeds reuse every comparison
under the right labels. Slow (several sweeps): ``pytest -m slow tests/test_sweep_resume.py``.
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
            saelens_evals=False)  # the same as tests/test_sweep.py

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


def test_reordered_seeds_reuse_comparisons_under_the_right_labels(reference, tmp_path):
    from qsae_lens.sweep import run_precision_sweep

    out = tmp_path / "run"
    shutil.copytree(reference, out)
    before = {p.parent.name: p.read_text() for p in out.glob("compare/*/_done.json")}
    result = run_precision_sweep(None, out, progress=False, threads=1, **{**TINY, "seeds": (1, 0)})
    after = {p.parent.name: p.read_text() for p in out.glob("compare/*/_done.json")}
    assert after == before  # nothing recomputed, nothing relabelled
    rows = result.report["sections"]["alignment"]["comparisons"]
    for row in rows:
        inputs = json.loads(before[row["name"]])["inputs"]
        assert inputs["a"]["cell"] == row["a"] and inputs["b"]["cell"] == row["b"]
