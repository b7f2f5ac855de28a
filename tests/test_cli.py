"""``qsae``'s exit codes: a bad input is one line on stderr and exit 2, with no traceback and no folder.

Table-driven over issue 15's list of bad ``qsae sweep`` inputs (each rejected by
:func:`qsae_lens.sweep.config.validate_config` before any model is loaded), a bad flag value for
every subcommand, and one case through a real subprocess to check the process exit status itself.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from qsae_lens.cli import main

SWEEP_BAD = [
    (["--precisions", "fp32,int3"], "Unknown precision 'int3'"),
    (["--precisions", ""], "precisions is empty"),
    (["--layers", "99"], "out of range: this model has layers 0..29"),
    (["--layers", "a,b"], "--layers takes"),
    (["--d-sae", "0"], "d-sae must be a positive integer"),
    (["--k", "-1"], "1 <= k < d_sae"),
    (["--d-sae", "64", "--k", "64"], "1 <= k < d_sae=64"),  # not the default d_sae, which may change
    (["--train-tokens", "0"], "train-tokens must be a positive integer"),
    (["--eval-windows", "0"], "eval-windows must be a positive integer"),
    (["--architecture", "foo"], "Unknown architecture 'foo'"),
    (["--lr", "-1"], "lr must be a positive finite number"),
    (["--lr", "abc"], "--lr takes a number"),
    (["--batch-size", "0"], "batch-size must be a positive integer"),
    (["--context-size", "0"], "context-size must be a positive integer"),
    (["--seeds", "a"], "seeds must be comma-separated ints"),
    (["--seeds", "3"], "at least two seeds"),
    (["--model", "/no/such/model"], "no such file or folder"),
    (["--model", "{tmp}"], "is not a model"),
    (["--out", "{file}"], "is a file, not a folder"),
    (["--analyses", "nosuch"], "Unknown analysis 'nosuch'"),
    (["--executor", "nosuch"], "invalid choice"),
    (["--no-such-flag"], "unrecognized arguments"),
]


@pytest.mark.parametrize(("flags", "message"), SWEEP_BAD, ids=[" ".join(f) or "empty" for f, _ in SWEEP_BAD])
def test_bad_sweep_input_is_one_line_and_exit_2(flags, message, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    out = tmp_path / "out"
    flags = [f.format(tmp=tmp_path, file=a_file) for f in flags]
    argv = ["sweep", *flags] + ([] if "--out" in flags else ["--out", str(out)])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("qsae sweep: error: "), err
    assert message in err
    assert "Traceback" not in err
    assert not out.exists(), "a rejected run must not create (or poison) its output folder"


@pytest.mark.parametrize("argv", [
    ["cache", "--context-size", "abc"],
    ["compare", "a", "b", "--out", "o", "--n-bootstrap", "x"],
    ["publish", "--no-such-flag", "f", "r"],
    ["nosuchcommand"],
])
def test_every_subcommand_answers_a_bad_flag_with_exit_2(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err and "Traceback" not in err


def test_exit_status_of_the_real_process(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "qsae_lens", "sweep", "--d-sae", "0", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "qsae sweep: error: d-sae must be a positive integer; got 0."
    assert "Traceback" not in proc.stderr and not out.exists()


def test_a_failure_during_a_run_is_exit_1_with_a_hint(monkeypatch, capsys):
    import qsae_lens.sweep.run as run

    def boom(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(run, "run_precision_sweep", boom)
    monkeypatch.setattr(run, "plan_sweep", lambda *a, **k: None)
    assert main(["sweep", "--out", "unused"]) == 1
    err = capsys.readouterr().err
    assert "RuntimeError: disk on fire" in err and "QSAE_DEBUG=1" in err and "Traceback" not in err
