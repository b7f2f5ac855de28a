"""Overhead of cache_activations against the bare forward passes it has to make.

Reference, measured in the same run: a loop of ``model.run_with_cache`` over the same batches
with the same ``names_filter`` and ``stop_at_layer`` (the model work and nothing else). Prints
cache time / reference time: the cost of masking, statistics, arrow conversion and disk writes.

    python benchmarks/cache_bench.py [--windows 64] [--context 128] [--precision fp32]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from qsae_lens.activations import cache_activations, probe_layers, stop_at_layer_for
from qsae_lens.assets import default_model_path
from qsae_lens.corpus import tokenize_corpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--precision", default="fp32")
    args = parser.parse_args()

    from qsae_lens.models import load_model

    model = load_model(str(default_model_path()), precision=args.precision)
    hooks = [f"blocks.{layer}.hook_resid_post" for layer in probe_layers(model.cfg.n_layers)]
    windows = tokenize_corpus(model.tokenizer, "stdlib", context_size=args.context, max_windows=args.windows)
    tokens = torch.tensor(windows["input_ids"])
    stop = stop_at_layer_for(hooks)

    @torch.inference_mode()
    def forward_loop() -> float:
        t0 = time.perf_counter()
        for start in range(0, len(tokens), args.batch_size):
            model.run_with_cache(tokens[start : start + args.batch_size], names_filter=hooks, stop_at_layer=stop)
        return time.perf_counter() - t0

    forward_loop()  # warm-up
    first = forward_loop()

    tmp = Path(tempfile.mkdtemp(prefix="qsae-cache-bench-"))
    try:
        t0 = time.perf_counter()
        cache_activations(model, windows, hooks, tmp / "c", batch_size=args.batch_size, progress=False)
        cached = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in (tmp / "c").iterdir())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # the machine is shared: time the reference before and after, and keep the faster
    reference = min(first, forward_loop())
    n_tok = args.windows * args.context
    print(f"{len(hooks)} hooks x {n_tok} tokens at {args.precision}: forward loop {reference:.2f} s, "
          f"cache_activations {cached:.2f} s, ratio {cached / reference:.2f}x, {size / 2**20:.0f} MiB on disk")  # fmt: skip


if __name__ == "__main__":
    main()
