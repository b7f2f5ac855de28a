"""Cost of HookedQuantizedLM over the raw Hugging Face forward, and of the routes it was chosen over.

Reference, measured in the same run and interleaved: ``hf_model(input_ids)`` on the same tokens.
Prints median seconds and the ratio to that reference for: the wrapper's forward (no hooks), its
``run_with_cache`` of one hook, ``stop_at_layer`` (what SAELens calls), TransformerLens 3.9's
``TransformerBridge`` (compatibility mode, no processing) and SAELens's ``HookedProxyLM``.

    python benchmarks/models_overhead.py [--precision nf4] [--batch 4] [--context 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import torch

from qsae_lens.assets import default_model_path
from qsae_lens.models import load_model
from qsae_lens.models.loading import load_hf_model
from qsae_lens.precision import parse_precision


def time_interleaved(cases: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each call, ``repeats`` times each, after one warm-up call per case.

    Warm-up first because bitsandbytes repacks 4-bit weights on the first CPU call; the repeats
    are interleaved (case A, B, C, A, B, C, ...) so that load from other jobs hits every case alike.
    Runs under ``torch.no_grad()``.
    """
    times: dict[str, list[float]] = {name: [] for name in cases}
    with torch.no_grad():
        for fn in cases.values():
            fn()
        for _ in range(repeats):
            for name, fn in cases.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return times


def print_ratio_table(times: dict[str, list[float]], reference: str, *, ratio_to: dict[str, str] | None = None) -> None:
    """Markdown table of median seconds per case and its ratio to ``reference`` (a key of ``times``).

    ``ratio_to`` maps a case to another reference case for its ratio (default: ``reference``).
    """
    ratio_to = ratio_to or {}
    print("| case | median s | ratio | to |\n|---|---:|---:|---|")
    for name, ts in times.items():
        ref_name = ratio_to.get(name, reference)
        med, ref = statistics.median(ts), statistics.median(times[ref_name])
        print(f"| {name} | {med:.3f} | {med / ref:.2f} | {ref_name} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="nf4")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layer", type=int, default=5, help="hook layer for the stop_at_layer case")
    parser.add_argument("--no-bridge", action="store_true", help="skip TransformerBridge / HookedProxyLM")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    warnings.filterwarnings("ignore")

    path = default_model_path()
    model = load_model(path, args.precision, "cpu")
    # every route gets its own copy of the HF model: the wrapper's hooks stay on its copy, and the
    # bridge switches its copy to eager attention
    prec = parse_precision(args.precision)
    hf = load_hf_model(path, prec, "cpu", None)
    tokens = torch.randint(3, model.cfg.d_vocab, (args.batch, args.context))
    hook = f"blocks.{args.layer}.hook_resid_post"

    cases: dict[str, Callable[[], object]] = {
        "raw HF forward (reference)": lambda: hf(tokens, use_cache=False),
        "HookedQuantizedLM forward": lambda: model(tokens),
        "HookedQuantizedLM run_with_cache (1 hook)": lambda: model.run_with_cache(tokens, names_filter=[hook]),
        f"HookedQuantizedLM run_with_cache stop_at_layer={args.layer + 1}": lambda: model.run_with_cache(
            tokens, names_filter=[hook], stop_at_layer=args.layer + 1
        ),
    }
    boot: dict[str, float] = {}
    if not args.no_bridge:
        from sae_lens.load_model import HookedProxyLM
        from transformer_lens.model_bridge import TransformerBridge

        t0 = time.perf_counter()
        bridge = TransformerBridge.boot_transformers(
            str(path), hf_model=load_hf_model(path, prec, "cpu", None), tokenizer=model.tokenizer, device="cpu")
        bridge.enable_compatibility_mode(no_processing=True, disable_warnings=True)
        boot["TransformerBridge"] = time.perf_counter() - t0
        cases["TransformerBridge forward"] = lambda: bridge(tokens)
        cases[f"TransformerBridge run_with_cache stop_at_layer={args.layer + 1}"] = lambda: bridge.run_with_cache(
            tokens, names_filter=[hook], stop_at_layer=args.layer + 1
        )
        t0 = time.perf_counter()
        # HookedProxyLM hooks HF module names, with a permanent hook on every submodule
        proxy = HookedProxyLM(load_hf_model(path, prec, "cpu", None), model.tokenizer)
        boot["HookedProxyLM"] = time.perf_counter() - t0
        proxy_hook = f"model.layers.{args.layer}"
        cases["HookedProxyLM forward (hooks on every module)"] = lambda: proxy(tokens)
        cases[f"HookedProxyLM run_with_cache stop_at_layer={args.layer + 1}"] = lambda: proxy.run_with_cache(
            tokens, names_filter=[proxy_hook], stop_at_layer=args.layer + 1
        )

    times = time_interleaved(cases, args.repeats)
    print(f"SmolLM2-135M {args.precision}, CPU x{torch.get_num_threads()}, tokens {args.batch}x{args.context}, "
          f"median of {args.repeats}")
    print_ratio_table(times, "raw HF forward (reference)")
    for name, seconds in boot.items():
        print(f"boot {name}: {seconds:.2f} s")


if __name__ == "__main__":
    main()
