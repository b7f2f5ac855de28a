"""Bad input to ``qsae cache``, ``qsae compare`` and ``qsae publish``: one line on stderr, exit status 2,
no traceback, checked before any work, and nothing created where the output would go.

In-process through ``qsae_lens.cli.main`` (the sae_lens import is paid once), plus one real
``python -m qsae_lens`` process to check the exit status and stderr a shell sees."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


class Payload:
    """A plain Python object pickled beside a tensor."""


@pytest.fixture(scope="module")
def places(tmp_path_factory) -> dict[str, Path]:
    """Two small SAE folders, a file, a pickled .pt file and an empty folder to point flags at."""
    from sae_lens import TopKSAE, TopKSAEConfig

    root = tmp_path_factory.mktemp("cli_errors")
    for name in ("sae_a", "sae_b"):
        TopKSAE(TopKSAEConfig(d_in=16, d_sae=32, k=4)).save_model(root / "saes" / name)
    (root / "a_file.txt").write_text("not a folder\n")
    (root / "not_json.json").write_text("{oops")

    # any non-tensor object (here a class defined in this module) makes weights_only=True refuse it
    torch.save({"x": torch.zeros(3, 16), "extra": Payload()}, root / "pickled.pt")
    return {"root": root, "a": root / "saes" / "sae_a", "b": root / "saes" / "sae_b", "saes": root / "saes",
            "file": root / "a_file.txt", "pt": root / "pickled.pt", "not_json": root / "not_json.json"}


# (name, argv with {placeholders}, a fragment the one-line message must contain)
CASES = [
    ("cache max-tokens 0", ["cache", "--max-tokens", "0", "--out", "{root}/c1"], "less than one window"),
    ("cache max-tokens < window", ["cache", "--max-tokens", "64", "--context-size", "128", "--out", "{root}/c2"],
     "less than one window"),
    ("cache bad layers", ["cache", "--layers", "first", "--out", "{root}/c3"], "--layers takes"),
    ("cache negative layer", ["cache", "--layers", "-1", "--out", "{root}/c4"], "start at 0"),
    ("cache layer out of range", ["cache", "--model", "{model}", "--layers", "0,99", "--out", "{root}/c5"],
     "out of range"),
    ("cache layer out of range, default model", ["cache", "--layers", "99", "--out", "{root}/c10"], "out of range"),
    ("cache bad precision", ["cache", "--precision", "int3", "--out", "{root}/c6"], "int3"),
    ("cache bad hook", ["cache", "--hook", "resid_middle", "--out", "{root}/c7"], "--hook must be one of"),
    ("cache batch size 0", ["cache", "--batch-size", "0", "--out", "{root}/c8"], "--batch-size must be a positive"),
    ("cache missing corpus", ["cache", "--corpus", "{root}/no_such_corpus", "--out", "{root}/c9"],
     "neither one of"),
    ("cache out is a file", ["cache", "--out", "{file}"], "is a file"),
    ("compare out is a file", ["compare", "{a}", "{b}", "--out", "{file}"], "is a file"),
    ("compare out under a file", ["compare", "{a}", "{b}", "--out", "{file}/report"], "is a file"),
    ("compare missing folder", ["compare", "{root}/missing_sae", "{b}", "--out", "{root}/o1"],
     "no such checkpoint folder"),
    ("compare block size 0", ["compare", "{a}", "{b}", "--block-size", "0", "--out", "{root}/o2"],
     "--block-size must be a positive"),
    ("compare pickled activations", ["compare", "{a}", "{b}", "--activations", "{pt}", "{pt}", "--out", "{root}/o3"],
     "pickled Python objects"),
    ("publish missing folder", ["publish", "{root}/missing", "org/name", "--dry-run", "--stage-dir", "{root}/p1"],
     "is not a folder"),
    ("publish bad repo id", ["publish", "{saes}", "no-slash", "--dry-run", "--stage-dir", "{root}/p2"],
     "Invalid hub repo id"),
    ("publish evals not json", ["publish", "{saes}", "org/name", "--dry-run", "--stage-dir", "{root}/p3",
                                "--evals", "{not_json}"], "cannot read JSON"),
]


@pytest.mark.parametrize(("name", "argv", "fragment"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_creates_nothing(places, smollm2_path, capsys, name, argv, fragment):
    from qsae_lens.cli import main

    subs = {k: str(v) for k, v in places.items()} | {"model": str(smollm2_path)}
    argv = [a.format(**subs) for a in argv]
    before = sorted(p.relative_to(places["root"]) for p in places["root"].rglob("*"))
    rc = main(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == 2, (name, rc, err)
    assert len(lines) == 1 and lines[0].startswith(f"qsae {argv[0]}: error:"), err
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in err + out and "weights_only=False" not in err
    assert sorted(p.relative_to(places["root"]) for p in places["root"].rglob("*")) == before  # nothing created


def test_compare_refuses_a_read_only_out_folder_before_computing(places, capsys):
    from qsae_lens.cli import main

    locked = places["root"] / "locked"
    locked.mkdir()
    # chattr +i stops even root; chmod stops everyone else
    immutable = subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode == 0
    if not immutable:
        if os.geteuid() == 0:
            locked.rmdir()
            pytest.skip("root writes into chmod-read-only folders and chattr +i is refused here")
        locked.chmod(0o555)
    try:
        rc = main(["compare", str(places["a"]), str(places["b"]), "--out", str(locked / "report")])
    finally:
        subprocess.run(["chattr", "-i", str(locked)], capture_output=True)
        locked.chmod(0o755)
        locked.rmdir()
    err = capsys.readouterr().err
    assert rc == 2 and "cannot write" in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.slow  # ~15-25 s: a fresh interpreter imports torch, transformers and sae_lens
def test_a_real_process_exits_2_with_one_line(tmp_path):
    """What a shell sees: ``python -m qsae_lens cache --max-tokens 0``."""
    proc = subprocess.run(
        [sys.executable, "-m", "qsae_lens", "cache", "--max-tokens", "0", "--out", str(tmp_path / "c")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    lines = [line for line in proc.stderr.splitlines() if line.startswith("qsae")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and len(lines) == 1 and "less than one window" in lines[0]
    assert not (tmp_path / "c").exists()
