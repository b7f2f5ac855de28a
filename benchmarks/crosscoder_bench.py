"""Crosscoder training throughput against training two separate SAEs on the same caches.

Trains, on the same two aligned activation sets (two precisions' caches of one hook, or planted
synthetic sources when no cache is given), (a) one BatchTopK crosscoder of width ``d_sae`` and
(b) two ``openai_topk`` SAEs of the same width with ``qsae_lens.training.fit.train_sae_on_activations``
(SAELens's trainer), all for the same number of steps and batch size, and prints the time ratio
crosscoder / (SAE a + SAE b). Target: <= 1.3. With ``--eval-caches`` it also prints the explained
variance per source on those held-out caches, crosscoder vs the separate SAE of that source
(issue 13: within 0.03). Rows whose baseline norm exceeds 10x the median (the sweep's attention-sink
rule) are dropped from both sources.

    python benchmarks/crosscoder_bench.py --caches /tmp/qsae_xc/fp32/train /tmp/qsae_xc/nf4/train \
        --eval-caches /tmp/qsae_xc/fp32/eval /tmp/qsae_xc/nf4/eval --hook blocks.16.hook_resid_post \
        --d-sae 1024 --steps 300 --repeats 3 --dense
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def _load_pair(caches: list[str], hook: str, limit: float | None = None) -> tuple[list[torch.Tensor], float]:
    from qsae_lens.activations import load_activations

    ref, other = (load_activations(c, hook) for c in caches)
    norms = ref.norm(dim=-1)
    limit = 10.0 * float(norms.median()) if limit is None else limit
    keep = norms <= limit
    return [ref[keep], other[keep]], limit


def _sources(args: argparse.Namespace) -> list[torch.Tensor]:
    if args.caches:
        return _load_pair(args.caches, args.hook)
    g = torch.Generator().manual_seed(0)
    dirs = torch.randn(4 * args.d, args.d, generator=g)
    act = (torch.rand(args.n, 4 * args.d, generator=g) < 0.01).float()
    return [act @ dirs, act @ (dirs + 0.1 * torch.randn(dirs.shape, generator=g))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--caches", nargs=2, default=None, help="two aligned activation caches (qsae cache folders)")
    parser.add_argument("--eval-caches", nargs=2, default=None, help="two aligned held-out caches: report explained variance")
    parser.add_argument("--hook", default="blocks.16.hook_resid_post")
    parser.add_argument("--d", type=int, default=576, help="synthetic width when no caches are given")
    parser.add_argument("--n", type=int, default=16384, help="synthetic rows when no caches are given")
    parser.add_argument("--d-sae", type=int, default=1024)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats (ratios per repeat, then the median)")
    parser.add_argument("--dense", action="store_true", help="also time the dense-decode reference crosscoder")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from qsae_lens.crosscoder import train_crosscoder
    from qsae_lens.training.fit import train_sae_on_activations
    from qsae_lens.training.openai_topk import OpenAITopKTrainingSAEConfig

    limit = None
    if args.caches:
        sources, limit = _load_pair(args.caches, args.hook)
    else:
        sources = _sources(args)
    d = sources[0].shape[1]
    tokens = args.steps * args.batch_size

    def timed(fn):  # (result, wall s, cpu s of this process)
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        return out, time.perf_counter() - t0, time.process_time() - c0

    print(f"rows {sources[0].shape[0]}, d {d}, d_sae {args.d_sae}, k {args.k}, {args.steps} steps x {args.batch_size}, "
          f"torch threads {torch.get_num_threads()}, {args.repeats} interleaved repeats", flush=True)
    ratios: dict[str, list[float]] = {"sparse wall": [], "sparse cpu": [], "dense wall": [], "dense cpu": []}
    # interleaved repeats (crosscoder sparse, crosscoder dense, SAE a, SAE b, again): on a machine
    # shared with other jobs, load drifts over minutes, so each repeat's ratio compares runs that
    # saw about the same load; CPU time of the process is printed beside wall time
    for rep in range(args.repeats):
        cc, w_cc, c_cc = timed(lambda: train_crosscoder(sources, d_sae=args.d_sae, k=args.k, steps=args.steps,
                                                         batch_size=args.batch_size))
        w_dn = c_dn = float("nan")
        if args.dense:
            _, w_dn, c_dn = timed(lambda: train_crosscoder(sources, d_sae=args.d_sae, k=args.k, steps=args.steps,
                                                            batch_size=args.batch_size, sparse_decode=False))
        t_saes, c_saes, saes = [], [], []
        for i, x in enumerate(sources):
            cfg = OpenAITopKTrainingSAEConfig(d_in=d, d_sae=args.d_sae, k=args.k, init_seed=i,
                                              dead_tokens_threshold=max(args.batch_size, tokens // 4))
            fit, w, c = timed(lambda cfg=cfg, x=x, i=i: train_sae_on_activations(
                cfg, x, total_tokens=tokens, batch_size=args.batch_size, lr=2e-3, data_seed=i))
            t_saes.append(w)
            c_saes.append(c)
            saes.append(fit.sae)
        ratios["sparse wall"].append(w_cc / sum(t_saes))
        ratios["sparse cpu"].append(c_cc / sum(c_saes))
        ratios["dense wall"].append(w_dn / sum(t_saes))
        ratios["dense cpu"].append(c_dn / sum(c_saes))
        print(f"repeat {rep}: crosscoder sparse wall {w_cc:.1f} s cpu {c_cc:.1f} s; dense wall {w_dn:.1f} s cpu {c_dn:.1f} s; "
              f"SAEs wall {t_saes[0]:.1f} + {t_saes[1]:.1f} s, cpu {c_saes[0]:.1f} + {c_saes[1]:.1f} s; "
              f"ratio sparse {ratios['sparse wall'][-1]:.2f} wall / {ratios['sparse cpu'][-1]:.2f} cpu, "
              f"dense {ratios['dense wall'][-1]:.2f} wall / {ratios['dense cpu'][-1]:.2f} cpu; "
              f"load average {os.getloadavg()[0]:.1f}", flush=True)
    for name, vals in ratios.items():
        if not any(v == v for v in vals):
            continue
        print(f"ratio crosscoder ({name}) / two SAEs: median {statistics.median(vals):.2f}, "
              f"min {min(vals):.2f}, max {max(vals):.2f} (target <= 1.3)")
    if args.eval_caches:
        from qsae_lens.crosscoder import explained_variance

        evals, _ = _load_pair(args.eval_caches, args.hook, limit)
        ev_cc = explained_variance(cc, evals).tolist()
        for i, x in enumerate(evals):
            with torch.no_grad():
                x_hat = saes[i].decode(saes[i].encode(x))
            ev_sae = float(1 - (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
            print(f"source {i} ({args.eval_caches[i]}): explained variance crosscoder {ev_cc[i]:.4f}, "
                  f"separate SAE {ev_sae:.4f}, difference {ev_cc[i] - ev_sae:+.4f} (eval rows {x.shape[0]})")


if __name__ == "__main__":
    main()
