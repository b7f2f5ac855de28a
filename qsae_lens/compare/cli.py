"""``qsae compare A B [--activations XA XB] [--hook NAME] --out FOLDER``: compare two SAEs and write
report.json, report.md and report.html into FOLDER; the markdown summary is printed.

A and B are SAELens checkpoint folders or hub ids (``release/sae_id`` or ``owner/repo/sae_id``).
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import tempfile
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
        default="anisotropic",
        choices=["anisotropic", "isotropic", "auto", "analytic", "simulate", "none"],
        help="the random-SAE baseline, as compare_saes(null=...): anisotropic (default: the target dictionary "
        "mirrored across random axes of its own shape), isotropic (uniform directions), auto (= anisotropic), "
        "analytic/simulate (isotropic reference computed in closed form or simulated), none",
    )
    parser.add_argument(
        "--block-size", type=int, default=4096, help="latents per block of the similarity matrix"
    )
    parser.add_argument("--device", default=None, help="torch device for the computation (default cpu)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def check_output_folder(out: str | Path, flag: str = "--out") -> Path:
    """Refuse, before any work, an output folder that cannot be written: a file, a folder under a
    file, or a folder where a file cannot be created (read-only). Creates nothing that stays."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{flag} {out} is a file, not a folder; choose a folder for the report.")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(f"{flag} {out}: {existing} is a file, so no folder can be created there.")
    try:  # os.access says yes to root on a read-only mount; a real probe file does not lie
        fd, probe = tempfile.mkstemp(prefix=".qsae-write-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise PermissionError(
            f"{flag} {out}: cannot write in {existing} ({err.strerror}); choose a writable folder."
        ) from None
    return out


def _check_local_sae(ref: str, flag: str) -> None:
    """An SAE argument that is unmistakably a local path (absolute, ./, ../, ~) must be a folder."""
    if not ref.startswith(("/", "./", "../", "~")):
        return  # may be a hub id ('release/sae_id', 'owner/repo/sae_id'): compare_saes resolves it
    path = Path(ref).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"SAE {flag} {ref}: no such checkpoint folder (a folder holding cfg.json and sae_weights.safetensors)."
        )


def run_compare_command(args: argparse.Namespace) -> int:
    """Run the comparison, save the report, print the markdown. Returns 0, 2 on bad input (one line
    on stderr, checked before any computation where possible), 1 when writing the report fails."""
    try:
        check_output_folder(args.out)
        _check_local_sae(args.a, "a")
        _check_local_sae(args.b, "b")
        for flag, value in (("--n-bootstrap", args.n_bootstrap), ("--n-permutations", args.n_permutations)):
            if value < 0:
                raise ValueError(f"{flag} must be >= 0, got {value}.")
        if args.block_size <= 0:
            raise ValueError(f"--block-size must be a positive number of latents, got {args.block_size}.")
    except (ValueError, OSError) as e:
        print(f"qsae compare: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2

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
        print(f"qsae compare: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    try:
        out = report.save(args.out)
    except OSError as e:
        print(f"qsae compare: failed: cannot write the report into {args.out} ({e})", file=sys.stderr)
        return 1
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

        try:
            x = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            # torch's own message suggests switching weights_only off, i.e. running the file's code: never.
            raise ValueError(
                f"--activations: {path} holds pickled Python objects besides tensors, which qsae_lens does not "
                "load (unpickling can run code). Save the tensor as safetensors instead: "
                "safetensors.torch.save_file({'x': tensor}, 'x.safetensors')."
            ) from None
        if not isinstance(x, torch.Tensor):
            raise ValueError(
                f"--activations: {path} holds a {type(x).__name__}, expected one Tensor[n, d_in]"
            )
        return x
    raise ValueError(
        f"--activations: {path} is neither a cached-activation folder nor a .safetensors/.pt file"
    )
