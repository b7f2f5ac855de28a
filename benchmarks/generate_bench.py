"""Generation speed: HookedQuantizedLM.generate (no hooks, with a steering hook) vs raw HF generate.

Greedy, batch 1, fixed number of new tokens (EOS ignored), at each precision. The three variants run
interleaved (HF, ours, ours+hook, HF, ours, ...) for --repeats rounds after one warm-up round, so slow
drift in the machine's load hits all three alike; each variant's time is the median over rounds, and
the overhead's spread is the interquartile range of the per-round ratios. Overhead = 1 - ours/HF tokens
per second. On an idle machine:

    python benchmarks/generate_bench.py --precisions fp32 nf4 --new-tokens 32 --repeats 9

The numbers in docs/interventions.md came from that command.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # models_overhead's timing helper
from models_overhead import time_interleaved  # noqa: E402


def _overhead(ours: list[float], hf: list[float]) -> tuple[float, float, float]:
    """Median and interquartile range of the per-round overheads 1 - t_hf / t_ours (one round: that value)."""
    per_round = sorted(1 - h / o for h, o in zip(hf, ours))
    q = statistics.quantiles(per_round, n=4, method="inclusive") if len(per_round) > 1 else per_round * 3
    return statistics.median(per_round), q[0], q[-1]


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
                model.hf_model.generate(
                    **enc,
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    pad_token_id=model.tokenizer.pad_token_id,
                )

        def ours(model=model):
            model.generate(prompt, max_new_tokens=n, do_sample=False, stop_at_eos=False, prepend_bos=False)

        def ours_hooked(model=model, v=v):
            with steer(model, v, 1.0, hook_name="blocks.15.hook_resid_post"):
                ours(model)

        runs = time_interleaved({"hf": hf, "ours": ours, "ours_hooked": ours_hooked}, args.repeats)
        ov, ov_lo, ov_hi = _overhead(runs["ours"], runs["hf"])
        ovh, ovh_lo, ovh_hi = _overhead(runs["ours_hooked"], runs["hf"])
        row = {
            "precision": prec,
            **{f"{k}_tok_s": n / statistics.median(v) for k, v in runs.items()},
            "overhead_no_hooks": ov,
            "overhead_no_hooks_iqr": [ov_lo, ov_hi],
            "overhead_hooked": ovh,
            "overhead_hooked_iqr": [ovh_lo, ovh_hi],
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        del model
    print(
        f"\n{args.repeats} interleaved rounds, {n} new tokens, {args.threads} threads; overhead: median "
        "[interquartile range of per-round overheads]"
    )
    print(
        "| precision | HF generate tok/s | ours tok/s | ours + steering hook tok/s | overhead | overhead hooked |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        (a, b), (c, d) = r["overhead_no_hooks_iqr"], r["overhead_hooked_iqr"]
        print(
            f"| {r['precision']} | {r['hf_tok_s']:.1f} | {r['ours_tok_s']:.1f} | {r['ours_hooked_tok_s']:.1f} | "
            f"{r['overhead_no_hooks']:+.1%} [{a:+.1%}, {b:+.1%}] | {r['overhead_hooked']:+.1%} [{c:+.1%}, {d:+.1%}] |"
        )


if __name__ == "__main__":
    main()
