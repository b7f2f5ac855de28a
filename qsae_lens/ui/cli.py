"""`qsae ui`: serve the steering page for one SAE at two (or more) precisions on localhost."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_ui_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``qsae ui``."""
    parser.add_argument("--sae", required=True, help="SAE checkpoint folder (cfg.json + sae_weights.safetensors)")
    parser.add_argument("--model", default=None, help="model path or hub id (default: the embedded SmolLM2-135M)")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "nf4"], help="precisions to load (default fp32 nf4)")
    parser.add_argument("--port", type=int, default=7860, help="local port (default 7860; 0 = any free port)")
    parser.add_argument("--host", default="127.0.0.1", help="local address only: 127.0.0.1, localhost or ::1")
    parser.add_argument("--examples", type=int, default=16,
                        help="code-corpus windows used for strength units and top examples (0 = none)")
    parser.add_argument("--device", default="cpu")


def run_ui_command(args: argparse.Namespace) -> int:
    """Load the models and the SAE, then serve until interrupted."""
    from sae_lens import SAE

    from qsae_lens.assets import default_model_path
    from qsae_lens.models import load_model
    from qsae_lens.ui.app import LOCAL_HOSTS, SteeringApp, make_server

    if args.host not in LOCAL_HOSTS:
        raise ValueError(f"--host must be local ({', '.join(LOCAL_HOSTS)}); got {args.host!r}.")
    if not (Path(args.sae) / "cfg.json").is_file():
        raise FileNotFoundError(f"--sae {args.sae}: no cfg.json there; pass an SAE checkpoint folder.")
    sae = SAE.load_from_disk(args.sae, device=args.device).eval()
    model_path = args.model or default_model_path()
    models = {p: load_model(model_path, p, args.device) for p in args.precisions}
    tokens = None
    if args.examples > 0:
        from qsae_lens.corpus import tokenize_corpus

        ds = tokenize_corpus(next(iter(models.values())).tokenizer, "stdlib", context_size=64,
                             max_windows=args.examples)
        tokens = ds.with_format("torch")["input_ids"]
    server = make_server(SteeringApp(models, sae, example_tokens=tokens), args.host, args.port)
    print(f"qsae ui: http://{args.host}:{server.server_port}/  (Ctrl-C to stop)", file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
