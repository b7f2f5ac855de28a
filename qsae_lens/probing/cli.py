"""``qsae probe``: probe tasks at several precisions and layers; writes probe.json, report.md, report.html."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qsae_lens.probing.tasks import BUILTIN_TASKS


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err


def add_probe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="HF id, local folder or .gguf (default: the embedded SmolLM2-135M)")
    parser.add_argument("--precisions", default="fp32,int8,nf4,fp4", help="comma-separated (first is the baseline)")
    parser.add_argument("--layers", type=_ints, default=[16], help="comma-separated block indices (default 16)")
    parser.add_argument("--tasks", default=",".join(BUILTIN_TASKS),
                        help=f"comma-separated: {', '.join(BUILTIN_TASKS)}, or sae_probes:<dataset> (extra 'probes')")
    parser.add_argument("--sae", action="append", default=[], metavar="LAYER=FOLDER",
                        help="an SAELens SAE folder for a layer, applied at every precision (repeatable)")
    parser.add_argument("--n-examples", type=int, default=1200, help="rows per task (classes balanced; speech tasks <= 300)")
    parser.add_argument("--cv", type=int, default=5, help="grouped cross-validation folds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="probe_out", help="output folder")


def run_probe_command(args: argparse.Namespace) -> int:
    from qsae_lens._io import atomic_write_json, atomic_write_text
    from qsae_lens.probing.api import probe_sweep
    from qsae_lens.probing.report import probe_html_page, probe_markdown

    saes = {}
    for spec in args.sae:
        layer, sep, folder = spec.partition("=")
        if not sep or not layer.strip().isdigit():
            raise ValueError(f"--sae expects LAYER=FOLDER, got {spec!r}")
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"--sae folder {folder!r} does not exist")
        from sae_lens import SAE

        saes[int(layer)] = SAE.load_from_disk(folder, device=args.device).eval()
    if args.n_examples < 20 * args.cv:
        raise ValueError(f"--n-examples {args.n_examples} is too small for {args.cv} folds: use at least {20 * args.cv}.")
    tasks = [t for t in args.tasks.split(",") if t]
    precisions = [p for p in args.precisions.split(",") if p]
    result = probe_sweep(None, tasks, args.layers, model_path=args.model, precisions=precisions, saes=saes,
                         n_examples=args.n_examples, cv=args.cv, seed=args.seed, device=args.device,
                         on_precision=lambda p: print(f"probing at {p} ...", file=sys.stderr))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "probe.json", result.to_json())
    atomic_write_text(out / "report.md", "# Probing across precisions\n\n" + probe_markdown(result) + "\n")
    atomic_write_text(out / "report.html", probe_html_page(result))
    print(probe_markdown(result))
    print(f"wrote {out / 'probe.json'}, {out / 'report.md'}, {out / 'report.html'}", file=sys.stderr)
    return 0
