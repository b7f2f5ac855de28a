"""Generation speed: HookedQuantizedLM.generate (no hooks, with a steering hook) vs raw HF generate.

Greedy, batch 1, fixed number of new tokens (EOS ignored), median of --repeats runs after a warm-up,
at each precision. Overhead = 1 - ours/HF tokens per second. Run with ``nice``:

    nice python benchmarks/generate_bench.py --precisions fp32 nf4 --new-tokens 32 --repeats 3

The numbers in docs/interventions.md came from that command.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def main() -> None:
    from qsae_lens.assets import default_model_path
    from qsae_lens.interventions import steer
    from qsae_lens.models import load_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "nf4"])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    prompt, n = "def fibonacci(n):\n    ", args.new_tokens
    rows = []
    for prec in args.precisions:
        model = load_model(default_model_path(), prec, "cpu")
        enc = model.tokenizer([prompt], return_tensors="pt")
        v = torch.randn(model.cfg.d_model)

        def hf(model=model, enc=enc):
            with torch.no_grad():
                model.hf_model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                        pad_token_id=model.tokenizer.pad_token_id)

        def ours(model=model):
            model.generate(prompt, max_new_tokens=n, do_sample=False, stop_at_eos=False, prepend_bos=False)

        def ours_hooked(model=model, v=v):
            with steer(model, v, 1.0, hook_name="blocks.15.hook_resid_post"):
                ours(model)

        t = {name: _time(fn, args.repeats) for name, fn in (("hf", hf), ("ours", ours), ("ours_hooked", ours_hooked))}
        row = {"precision": prec, **{f"{k}_tok_s": n / s for k, s in t.items()},
               "overhead_no_hooks": 1 - t["hf"] / t["ours"], "overhead_hooked": 1 - t["hf"] / t["ours_hooked"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
        del model
    print("\n| precision | HF generate tok/s | ours tok/s | ours + steering hook tok/s | overhead | overhead hooked |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['precision']} | {r['hf_tok_s']:.1f} | {r['ours_tok_s']:.1f} | {r['ours_hooked_tok_s']:.1f} | "
              f"{r['overhead_no_hooks']:+.1%} | {r['overhead_hooked']:+.1%} |")


if __name__ == "__main__":
    main()
