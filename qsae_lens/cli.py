"""The ``qsae`` command line: ``qsae sweep``, ``qsae compare``, ``qsae publish``, ``qsae cache``.

Each subcommand is a thin layer over a public function; its options are added by the module
that owns the work (``add_<name>_arguments`` / ``run_<name>_command``), imported only when that
subcommand runs, so ``qsae --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
import typing

USAGE_ERROR = 2
"""Exit status for a usage or input error (one line on stderr, no traceback)."""
RUN_ERROR = 1
"""Exit status for a failure during the run."""


class UsageError(Exception):
    """A bad flag or value, reported as one line and exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises :class:`UsageError` instead of printing usage and exiting, so every
    usage error (unknown flag, missing value, bad choice) is one line like any other bad input."""

    def error(self, message: str) -> typing.NoReturn:
        raise UsageError(message)

# subcommand -> (module, one-line help)
_SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "sweep": ("qsae_lens.sweep", "train SAEs at several precisions and report how their features transfer"),
    "compare": ("qsae_lens.compare.cli", "compare two SAEs (checkpoint folders or hub ids)"),
    "publish": ("qsae_lens.hub", "publish SAE folders to the Hugging Face hub with a precision-aware card"),
    "cache": ("qsae_lens.activations", "cache a model's activations at one precision for SAELens and compare"),
    "steer": ("qsae_lens.interventions.cli", "steer a latent or a CAA vector at several precisions; print generations and effects"),
    "ui": ("qsae_lens.ui.cli", "serve the steering page (two precisions side by side) on localhost"),
    "atlas": ("qsae_lens.sweep.steps.survival", "write the offline feature browser of a finished sweep's frozen SAE"),
    "crosscode": ("qsae_lens.sweep.steps.crosscoder", "model diffing: a crosscoder over a sweep's baseline and one precision"),
    "probe": ("qsae_lens.probing.cli", "probe tasks (with control tasks) on residuals and SAE codes across precisions"),
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = _Parser(prog="qsae", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in _SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:  # only import the module whose arguments we need
            getattr(importlib.import_module(module), f"add_{name}_arguments")(p)
    return parser


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. Exit 2: bad usage or input (one line on stderr, no traceback);
    exit 1: a failure during the run (one line, the traceback with ``QSAE_DEBUG=1``); 0: done."""
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), "")
    try:
        parser = build_parser(argv)
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return USAGE_ERROR
        module = importlib.import_module(_SUBCOMMANDS[args.command][0])
        return int(getattr(module, f"run_{args.command}_command")(args) or 0)
    except (UsageError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError) as e:
        print(f"qsae {command}: error: {_one_line(e)}".replace("qsae : ", "qsae: "), file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print(f"qsae {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a failure during the run: one line unless asked for the traceback
        if os.environ.get("QSAE_DEBUG"):
            traceback.print_exc()
        print(f"qsae {command}: failed: {type(e).__name__}: {_one_line(e)} "
              "(run with QSAE_DEBUG=1 for the traceback)", file=sys.stderr)
        return RUN_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
