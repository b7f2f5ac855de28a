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
        --d-sae 1024 --steps 300
"""

from __future__ import annotations

import argparse
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
    t0, c0 = time.perf_counter(), time.process_time()
    cc = train_crosscoder(sources, d_sae=args.d_sae, k=args.k, steps=args.steps, batch_size=args.batch_size)
    t_cc, c_cc = time.perf_counter() - t0, time.process_time() - c0
    t_saes, c_saes, saes = [], [], []
    for i, x in enumerate(sources):
        cfg = OpenAITopKTrainingSAEConfig(d_in=d, d_sae=args.d_sae, k=args.k, init_seed=i,
                                          dead_tokens_threshold=max(args.batch_size, tokens // 4))
        t0, c0 = time.perf_counter(), time.process_time()
        fit = train_sae_on_activations(cfg, x, total_tokens=tokens, batch_size=args.batch_size, lr=2e-3, data_seed=i)
        t_saes.append(time.perf_counter() - t0)
        c_saes.append(time.process_time() - c0)
        saes.append(fit.sae)
    print(f"rows {sources[0].shape[0]}, d {d}, d_sae {args.d_sae}, k {args.k}, {args.steps} steps x {args.batch_size}, "
          f"torch threads {torch.get_num_threads()}")
    # CPU time of this process beside wall time: on a shared machine the wall-time ratio moves with others' load
    print(f"crosscoder: wall {t_cc:.1f} s, cpu {c_cc:.1f} s; SAEs: wall {t_saes[0]:.1f} + {t_saes[1]:.1f} = "
          f"{sum(t_saes):.1f} s, cpu {c_saes[0]:.1f} + {c_saes[1]:.1f} = {sum(c_saes):.1f} s")
    print(f"ratio crosscoder / two SAEs = {t_cc / sum(t_saes):.2f} wall, {c_cc / sum(c_saes):.2f} cpu (target <= 1.3)")
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
