"""Benchmark of compare's weight-space alignment against the methodology's own numpy formulas, same run.

Measured: best-match cosine both ways, mutual nearest neighbours and one-to-one matching between two decoder
matrices [n, d]. Reference ("methodology"): float64 numpy, the dense similarity matrix S = W1 W2ᵀ, argmax over
both axes, dense Hungarian (``scipy.optimize.linear_sum_assignment(-S)``). qsae_lens: float32 torch tiles of
``block_size``², best match both ways from one pass, exact Hungarian up to 8192², sparse candidate graph past it.

Each implementation runs in its own subprocess so that its peak memory is its own: peak resident set size from
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (tracemalloc does not see torch's allocator), reported as the
increase over the process's RSS after creating the inputs (the inputs themselves are not counted).

The pair of SAEs is realistic rather than worst-case random: 60% of b's latents are noisy copies of a's (cosine
~0.9), 40% unrelated, in shuffled order.

    python benchmarks/compare_bench.py                          # 4096x576, 16384x2048, then 65536x2048
    python benchmarks/compare_bench.py --sizes 4096x576 --big none   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

# run as a script from a checkout: make the package importable without installing it
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GIB = 1024**3


def _make_pair(n: int, d: int, seed: int):
    import torch

    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=gen)
    n_shared = int(0.6 * n)
    shared = a[:n_shared] + 0.5 * torch.randn(n_shared, d, generator=gen) * (
        a[:n_shared].norm(dim=1, keepdim=True) / d**0.5
    )
    b = torch.cat([shared, torch.randn(n - n_shared, d, generator=gen)])
    b = b[torch.randperm(n, generator=gen)]
    return a, b


def _rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _worker(impl: str, n: int, d: int, seed: int, block_size: int) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    a, b = _make_pair(n, d, seed)
    times: dict[str, float] = {}
    if impl == "methodology":
        from scipy.optimize import linear_sum_assignment

        w1, w2 = a.numpy().astype(np.float64), b.numpy().astype(np.float64)
        del a, b
        base = _rss_bytes()
        t0 = time.perf_counter()
        w1 /= np.linalg.norm(w1, axis=1, keepdims=True)
        w2 /= np.linalg.norm(w2, axis=1, keepdims=True)
        s = w1 @ w2.T
        ab, ab_idx = s.max(axis=1), s.argmax(axis=1)
        ba, ba_idx = s.max(axis=0), s.argmax(axis=0)
        t1 = time.perf_counter()
        mnn = float((ba_idx[ab_idx] == np.arange(n)).mean())
        t2 = time.perf_counter()
        r, c = linear_sum_assignment(-s)
        matched = float(s[r, c].mean())
        t3 = time.perf_counter()
        times = {"best_match_both": t1 - t0, "mnn": t2 - t1, "matching": t3 - t2}
        values = {"bm_ab": float(ab.mean()), "bm_ba": float(ba.mean()), "mnn": mnn, "matched": matched}
        method = "dense"
    else:
        from qsae_lens.compare.alignment import best_match_both, mutual_nn_fraction, one_to_one_matching

        base = _rss_bytes()
        t0 = time.perf_counter()
        ab_m, ba_m = best_match_both(a, b, block_size=block_size)
        t1 = time.perf_counter()
        mnn = mutual_nn_fraction(a, b, matches=(ab_m, ba_m))
        t2 = time.perf_counter()
        m = one_to_one_matching(a, b, block_size=block_size)
        t3 = time.perf_counter()
        times = {"best_match_both": t1 - t0, "mnn": t2 - t1, "matching": t3 - t2}
        values = {
            "bm_ab": float(ab_m.cosine.double().mean()),
            "bm_ba": float(ba_m.cosine.double().mean()),
            "mnn": mnn,
            "matched": m.mean_cosine,
        }
        method = m.method
    times["total"] = sum(times.values())
    return {
        "impl": impl,
        "n": n,
        "d": d,
        "times": times,
        "values": values,
        "matching_method": method,
        "peak_rss_increase": _rss_bytes() - base,
        "threads": torch.get_num_threads(),
    }


def _run(impl: str, n: int, d: int, seed: int, block_size: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, "--n", str(n), "--d", str(d), "--seed", str(seed)]
    cmd += ["--block-size", str(block_size)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _fmt(r: dict) -> str:
    t = r["times"]
    return (
        f"{r['impl']:>11}: total {t['total']:8.1f} s (best-match both {t['best_match_both']:.1f}, mnn {t['mnn']:.2f}, "
        f"matching {t['matching']:.1f} [{r['matching_method']}]), peak RSS +{r['peak_rss_increase'] / GIB:.2f} GiB; "
        f"bm_ab {r['values']['bm_ab']:.4f} bm_ba {r['values']['bm_ba']:.4f} mnn {r['values']['mnn']:.4f} "
        f"matched {r['values']['matched']:.4f}"
    )


def _parse_sizes(text: str) -> list[tuple[int, int]]:
    if text.strip().lower() in ("", "none"):
        return []
    return [tuple(int(x) for x in part.lower().split("x")) for part in text.split(",")]  # type: ignore[misc]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="4096x576,16384x2048", help="NxD pairs run by both implementations")
    p.add_argument("--big", default="65536x2048", help="NxD pairs run by qsae_lens only ('none' to skip)")
    p.add_argument("--memory-gib", type=float, default=24.0, help="machine memory the reference must fit in")
    p.add_argument("--block-size", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", choices=["methodology", "qsae_lens"], help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--d", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(_worker(args.worker, args.n, args.d, args.seed, args.block_size)))
        return

    print(
        f"cpu cores visible: {os.cpu_count()}, block_size {args.block_size}, peak memory = ru_maxrss increase"
    )
    for n, d in _parse_sizes(args.sizes):
        print(f"\n== {n} latents x d_model {d} ==", flush=True)
        ref = _run("methodology", n, d, args.seed, args.block_size)
        print(_fmt(ref), flush=True)
        ours = _run("qsae_lens", n, d, args.seed, args.block_size)
        print(_fmt(ours), flush=True)
        tr, to = ref["times"], ours["times"]
        print(
            f"  speed-up methodology/qsae_lens: total {tr['total'] / to['total']:.2f}x, best-match both "
            f"{tr['best_match_both'] / to['best_match_both']:.2f}x, matching {tr['matching'] / to['matching']:.2f}x; "
            f"peak memory ratio {ref['peak_rss_increase'] / max(ours['peak_rss_increase'], 1):.1f}x",
            flush=True,
        )
    for n, d in _parse_sizes(args.big):
        need = (
            2 * n * n * 8 + 2 * n * d * 8
        )  # S and -S in float64 (linear_sum_assignment(-S)), plus the inputs
        print(f"\n== {n} latents x d_model {d} ==")
        verdict = "does not fit" if need > args.memory_gib * GIB else "would fit"
        print(
            f"methodology: needs >= {need / GIB:.1f} GiB (two dense float64 {n}x{n} matrices, S and -S, "
            f"{n * n * 8 / GIB:.1f} GiB each): {verdict} in {args.memory_gib:.0f} GiB; not run",
            flush=True,
        )
        print(_fmt(_run("qsae_lens", n, d, args.seed, args.block_size)), flush=True)


if __name__ == "__main__":
    main()
