"""``qsae compare A B [--activations XA XB] [--hook NAME] --out FOLDER``: compare two SAEs and write
report.json, report.md and report.html into FOLDER; the markdown summary is printed.

A and B are SAELens checkpoint folders or hub ids (``release/sae_id`` or ``owner/repo/sae_id``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``qsae compare`` (called by ``qsae_lens.cli`` when the subcommand is chosen)."""
    parser.add_argument(
        "a", help="SAE a: checkpoint folder, or hub id 'release/sae_id' / 'owner/repo/sae_id'"
    )
    parser.add_argument("b", help="SAE b: as a")
    parser.add_argument(
        "--activations",
        nargs=2,
        metavar=("XA", "XB"),
        help="activations for the same tokens at a's and b's sources: two cached-activation folders "
        "(qsae cache), or two .safetensors/.pt files holding one Tensor[n, d_in] each; turns on CKA, "
        "latent correlation, cross-reconstruction and category metrics",
    )
    parser.add_argument(
        "--hook", help="hook name to read from cached-activation folders (default: each SAE's own hook_name)"
    )
    parser.add_argument("--out", required=True, help="folder for report.json, report.md and report.html")
    parser.add_argument(
        "--n-bootstrap", type=int, default=1000, help="bootstrap resamples per CI (default 1000)"
    )
    parser.add_argument(
        "--n-permutations", type=int, default=10000, help="permutations per test (default 10000)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--null",
        default="auto",
        choices=["auto", "analytic", "simulate", "none"],
        help="how the random-SAE baseline is obtained (default auto)",
    )
    parser.add_argument(
        "--block-size", type=int, default=4096, help="latents per block of the similarity matrix"
    )
    parser.add_argument("--device", default=None, help="torch device for the computation (default cpu)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_compare_command(args: argparse.Namespace) -> int:
    """Run the comparison, save the report, print the markdown. Returns 0, or 2 on bad input."""
    from qsae_lens.compare.api import compare_saes

    try:
        activations = None
        if args.activations:
            activations = (
                _read_activation_arg(args.activations[0]),
                _read_activation_arg(args.activations[1]),
            )
        report = compare_saes(
            args.a,
            args.b,
            activations=activations,
            hook=args.hook,
            block_size=args.block_size,
            n_bootstrap=args.n_bootstrap,
            n_permutations=args.n_permutations,
            seed=args.seed,
            null=args.null,
            device=args.device,
            progress=not args.no_progress,
        )
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"qsae compare: error: {e}", file=sys.stderr)
        return 2
    out = report.save(args.out)
    print(report.to_markdown())
    print(f"\nWrote {out / 'report.json'}, {out / 'report.md'}, {out / 'report.html'}")
    return 0


def _read_activation_arg(value: str):
    """A folder stays a path (read by ``load_activations`` at the SAE's hook); a file is read as one tensor."""
    path = Path(value)
    if path.is_dir():
        return path
    if not path.exists():
        raise FileNotFoundError(f"--activations: no folder or file at {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        if len(tensors) != 1:
            raise ValueError(
                f"--activations: {path} holds {len(tensors)} tensors ({', '.join(tensors)}); expected exactly one "
                f"Tensor[n, d_in]"
            )
        return next(iter(tensors.values()))
    if path.suffix in (".pt", ".pth"):
        import torch

        x = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(x, torch.Tensor):
            raise ValueError(
                f"--activations: {path} holds a {type(x).__name__}, expected one Tensor[n, d_in]"
            )
        return x
    raise ValueError(
        f"--activations: {path} is neither a cached-activation folder nor a .safetensors/.pt file"
    )
