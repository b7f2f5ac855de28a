"""The ``qsae`` command line: ``qsae sweep``, ``qsae compare``, ``qsae publish``, ``qsae cache``.

Each subcommand is a thin layer over a public function; its options are added by the module
that owns the work (``add_<name>_arguments`` / ``run_<name>_command``), imported only when that
subcommand runs, so ``qsae --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help)
_SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "sweep": ("qsae_lens.sweep", "train SAEs at several precisions and report how their features transfer"),
    "compare": ("qsae_lens.compare.cli", "compare two SAEs (checkpoint folders or hub ids)"),
    "publish": ("qsae_lens.hub", "publish SAE folders to the Hugging Face hub with a precision-aware card"),
    "cache": ("qsae_lens.activations", "cache a model's activations at one precision for SAELens and compare"),
    "steer": ("qsae_lens.interventions.cli", "steer a latent or a CAA vector at several precisions; print generations and effects"),
    "ui": ("qsae_lens.ui.cli", "serve the steering page (two precisions side by side) on localhost"),
    "probe": ("qsae_lens.probing.cli", "probe tasks (with control tasks) on residuals and SAE codes across precisions"),
    "atlas": ("qsae_lens.sweep.steps.survival", "write the offline feature browser of a finished sweep's frozen SAE"),
    "crosscode": ("qsae_lens.sweep.steps.crosscoder", "model diffing: a crosscoder over a sweep's baseline and one precision"),
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qsae", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in _SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:  # only import the module whose arguments we need
            getattr(importlib.import_module(module), f"add_{name}_arguments")(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(_SUBCOMMANDS[args.command][0])
    return int(getattr(module, f"run_{args.command}_command")(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
