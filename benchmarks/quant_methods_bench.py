"""Every quantization method on the default model: time to quantize, weight error, model cost, forward speed.

For each precision: seconds to load + quantize (GPTQ/AWQ: first run computes and caches, later
runs read the cache; the time printed says which), the relative weight error
``||W_hat - W||_F / ||W||_F`` of the decoder linears (mean and worst layer, and mean per module
type), held-out CE and its increase and KL(fp32 || q) per token on 8 x 128 held-out windows
(document-disjoint from the calibration windows), and the forward time of a 4 x 128 batch
against fp32 (median of 3). The default model's fp32 is itself dequantized Q4_1.

    nice python benchmarks/quant_methods_bench.py [--precisions fp32 int8 nf4 rtn-w8 ...] [--out bench.json]

Prints a markdown table (the one in docs/precisions.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

DEFAULT = ["fp32", "int8", "nf4", "fp4", "rtn-w8", "rtn-w6", "rtn-w5", "rtn-w4", "rtn-w3", "rtn-w4-g64-asym",
           "gguf-q8_0", "gguf-q5_0", "gguf-q4_1", "gguf-q4_0", "gptq-w4", "awq-w4", "quanto-int8", "quanto-int4",
           "torchao-int8wo"]


def dense_weight(module: torch.nn.Module) -> torch.Tensor | None:
    """Float ``Tensor[out, in]`` a quantized linear computes with (bitsandbytes, quanto, torchao, float)."""
    from qsae_lens.models.dequantized import dequantize_linear_weight

    w = dequantize_linear_weight(module) if "bitsandbytes" in type(module).__module__ else None
    if w is not None:
        return w
    weight = getattr(module, "qweight", None)  # quanto; not `or`: a tensor has no truth value
    if weight is None:
        weight = getattr(module, "weight", None)
    if weight is None:
        return None
    if hasattr(weight, "dequantize") and type(weight).__name__ not in ("Parameter", "Tensor"):
        return weight.dequantize().float()
    return weight.detach().float()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precisions", nargs="+", default=DEFAULT)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))

    from qsae_lens.assets import default_model_path
    from qsae_lens.corpus import tokenize_corpus_splits
    from qsae_lens.models import load_model

    path = default_model_path()
    base = load_model(path, "fp32", "cpu")
    held = torch.tensor(tokenize_corpus_splits(base.tokenizer, context_size=128, max_windows=1, max_eval_windows=8)["test"]["input_ids"])
    names = [n for n, m in base.model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in f".{n}"]
    ref_w = {n: base.model.get_submodule(n).weight.detach().clone() for n in names}
    with torch.no_grad():
        ref_logp = torch.log_softmax(base(held, return_type="logits").float(), -1)

    def fwd_time(model) -> float:
        x = held[:4]
        times = []
        with torch.no_grad():
            for _ in range(3):
                t = time.perf_counter()
                model(x, return_type="logits")
                times.append(time.perf_counter() - t)
        return statistics.median(times)

    base_fwd = fwd_time(base)
    del base
    rows = []
    for p in args.precisions:
        t = time.perf_counter()
        try:
            model = load_model(path, p, "cpu")
        except Exception as err:  # report what fails (missing extra, device) and go on
            print(f"{p}: not run ({type(err).__name__}: {err})", flush=True)
            rows.append({"precision": p, "error": f"{type(err).__name__}: {err}"})
            continue
        t_load = time.perf_counter() - t
        errs: dict[str, float] = {}
        for n in names:
            w = dense_weight(model.model.get_submodule(n))
            if w is not None:
                errs[n] = float((w.float() - ref_w[n]).norm() / ref_w[n].norm())
        with torch.no_grad():
            logits = model(held, return_type="logits").float()
            logp = torch.log_softmax(logits, -1)
            ce = float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), held[:, 1:].reshape(-1)))
            kl = float((ref_logp.exp() * (ref_logp - logp)).sum(-1).mean())
        by_type: dict[str, list[float]] = {}
        for n, e in errs.items():
            by_type.setdefault(n.rsplit(".", 1)[-1], []).append(e)
        row = {"precision": p, "load_quantize_s": round(t_load, 1), "weight_rel_err_mean": statistics.mean(errs.values()) if errs else None,
               "weight_rel_err_max": max(errs.values()) if errs else None,
               "weight_rel_err_by_type": {k: round(statistics.mean(v), 5) for k, v in by_type.items()},
               "ce": ce, "kl_vs_fp32": kl, "forward_s": fwd_time(model), "fp32_forward_s": base_fwd}
        rows.append(row)
        print(json.dumps(row), flush=True)
        del model
    fp32_ce = next((r["ce"] for r in rows if r.get("precision") == "fp32" and "ce" in r), None)
    print("\n| precision | weight rel. err (mean / max) | CE | ΔCE vs fp32 | KL vs fp32 | load+quantize s | forward vs fp32 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['precision']} | not run: {r['error'][:80]} | | | | | |")
            continue
        e = "—" if r["weight_rel_err_mean"] is None else f"{r['weight_rel_err_mean']:.4f} / {r['weight_rel_err_max']:.4f}"
        d = "—" if fp32_ce is None else f"{r['ce'] - fp32_ce:+.4f}"
        print(f"| {r['precision']} | {e} | {r['ce']:.4f} | {d} | {r['kl_vs_fp32']:.4f} | {r['load_quantize_s']} | "
              f"{r['forward_s'] / r['fp32_forward_s']:.2f}x |")
    if args.out:
        from qsae_lens._io import atomic_write_json

        atomic_write_json(args.out, rows)


if __name__ == "__main__":
    main()
