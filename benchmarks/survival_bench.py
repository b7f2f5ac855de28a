"""Benchmark: streaming survival + top examples vs the straightforward dense approach (store all codes, sort).

Each measurement runs in its own subprocess so its peak resident memory (``ru_maxrss``) is its own.
The encoder is a fixed random ReLU layer ``relu(x @ W + b)`` with ``d_in = 64`` and a bias chosen so
~0.4% of latents fire per token (~64 of 16,384, like a TopK-64 SAE): encoding costs the same in both
approaches, and a small ``d_in`` keeps the benchmark about the bookkeeping, not the matmul.
Inputs are generated block by block from a seed (reference = x, quantized = x + small noise), so
the inputs themselves take no memory.

Sections:
1. dense vs streaming at the same small size (default 4,096 tokens x 16,384 latents): time, peak
   memory, and agreement of the results (Pearson, statuses, top-k values);
2. streaming at a larger size (default 16,384 tokens x 16,384 latents; ``--tokens 1048576`` for
   the full 1M): time and peak memory; the dense approach at that size is *extrapolated* from
   section 1 (memory linear in tokens: ``n * d_sae * 20`` bytes for two code matrices and a sort);
3. bounded memory at 65,536 latents: streaming peak memory at 2,048 and 8,192 tokens (it should not grow).

Run: ``nice python benchmarks/survival_bench.py`` (about 5 minutes of CPU on 2 idle cores);
``--tokens 1048576`` for the full-size section 2.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

D_IN = 64


class _Acts:
    """A lazily generated ``Tensor[n, D_IN]`` (slicing yields rows; the same seed gives the same rows)."""

    def __init__(self, n: int, noise: float, seed: int = 0) -> None:
        self.n, self.noise, self.seed = n, noise, seed
        self.shape = torch.Size([n, D_IN])
        self.ndim = 2

    CHUNK = 1024  # rows are generated in fixed chunks, so any slicing sees the same rows

    def _chunk(self, c: int) -> torch.Tensor:
        x = torch.randn(self.CHUNK, D_IN, generator=torch.Generator().manual_seed(c))
        if self.noise:
            x = x + self.noise * torch.randn(self.CHUNK, D_IN, generator=torch.Generator().manual_seed(10**9 + c))
        return x

    def __getitem__(self, sl: slice) -> torch.Tensor:
        s, e, _ = sl.indices(self.n)
        c0, c1 = s // self.CHUNK, (e - 1) // self.CHUNK + 1
        x = torch.cat([self._chunk(c) for c in range(c0, c1)])
        return x[s - c0 * self.CHUNK: e - c0 * self.CHUNK]


def _encoder(d_sae: int) -> torch.nn.Module:
    torch.manual_seed(0)
    lin = torch.nn.Linear(D_IN, d_sae)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(d_sae, D_IN) / D_IN**0.5)
        lin.bias.fill_(-2.65)  # P(N(0,1) > 2.65) = 0.4%
    return torch.nn.Sequential(lin, torch.nn.ReLU()).eval()


def _worker(kind: str, n: int, d_sae: int, k: int) -> dict:
    torch.set_num_threads(2)
    enc = _encoder(d_sae)
    ref, q = _Acts(n, 0.0), _Acts(n, 0.1)
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        if kind == "streaming":
            from qsae_lens.survival import feature_survival
            from qsae_lens.survival.examples import ExampleAccumulator

            rep = feature_survival(enc, ref, q, topk=k, n_bootstrap=100)
            acc = ExampleAccumulator(d_sae, k=k, n_samples=2 * k)
            block = max(64, 2**24 // d_sae)
            for s in range(0, n, block):
                acc.update(enc(ref[s:s + block]), s)
            ex = acc.result()
            out = {"pearson": rep.pearson, "status": rep.status, "top": ex.top_values}
        else:  # dense: every code stored, statistics over the full matrices, a full sort per latent
            a = torch.cat([enc(ref[s:s + 4096]) for s in range(0, n, 4096)])
            b = torch.cat([enc(q[s:s + 4096]) for s in range(0, n, 4096)])
            am, bm = a - a.mean(0), b - b.mean(0)
            pearson = (am * bm).sum(0) / (am.norm(dim=0) * bm.norm(dim=0))
            del am, bm
            fa, fb = a > 0, b > 0
            jac = (fa & fb).sum(0) / (fa | fb).sum(0).clamp_min(1)
            top = a.sort(dim=0, descending=True).values[:k].T
            out = {"pearson": pearson.double(), "jaccard": jac, "top": top}
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    torch.save({k_: v for k_, v in out.items() if isinstance(v, torch.Tensor)}, f"/tmp/survival_bench_{kind}_{n}_{d_sae}.pt")
    return {"kind": kind, "n": n, "d_sae": d_sae, "seconds": dt, "cpu_seconds": cpu,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def _run(kind: str, n: int, d_sae: int, k: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--_worker", kind, "--tokens", str(n), "--latents", str(d_sae),
                          "--k", str(k)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def explainer_check(sae_dir: str, layer: int, n_latents: int = 5, windows: int = 96, ctx: int = 64) -> None:
    """How good are SmolLM2-135M's labels? Detection balanced accuracy of its own labels on held-out contexts.

    For ``n_latents`` latents of a trained SAE (firing frequency 0.2%-5%): the explainer reads the
    top 8 contexts; the scorer tells the next 6 activating contexts (top 9-14) from 6 random
    contexts where the latent is silent.
    """
    from sae_lens import SAE

    from qsae_lens.assets import default_model_path
    from qsae_lens.corpus import tokenize_corpus
    from qsae_lens.interpret import Context, LocalChatModel, LocalExplainer, LocalScorer, detection_score
    from qsae_lens.models import load_model
    from qsae_lens.survival.examples import context_windows, top_examples

    torch.set_num_threads(2)
    model = load_model(str(default_model_path()), "fp32", device="cpu")
    sae = SAE.load_from_disk(sae_dir, device="cpu").eval()
    tokens = torch.tensor(tokenize_corpus(model.tokenizer, "stdlib", context_size=ctx, max_windows=windows, seed=3)["input_ids"])
    hook = f"blocks.{layer}.hook_resid_post"
    ex = top_examples(sae, model, tokens, hook_name=hook, k=14, batch_size=8)
    freq = ex.frequency
    cand = ((freq > 0.002) & (freq < 0.05)).nonzero().flatten()
    latents = cand[torch.randperm(len(cand), generator=torch.Generator().manual_seed(0))[:n_latents]].tolist()
    chat = LocalChatModel()
    explainer, scorer = LocalExplainer(chat), LocalScorer(chat)
    g = torch.Generator().manual_seed(1)
    accs = []
    for i in latents:
        rows = [r for r in ex.top_rows[i].tolist() if r >= 0]
        with torch.no_grad():
            wins = sorted({r // ctx for r in rows})
            _, cache = model.run_with_cache(tokens[wins], names_filter=[hook], stop_at_layer=layer + 1)
            codes = sae.encode(cache[hook].reshape(-1, cache[hook].shape[-1])).reshape(len(wins), ctx, -1)[:, :, i]
        pos = {w: j for j, w in enumerate(wins)}
        ctxs = [Context([model.tokenizer.decode([t]) for t in tokens[w, a:b].tolist()], codes[pos[w], a:b].tolist())
                for w, a, b in context_windows(tokens, rows)]
        label = explainer.explain(ctxs[:8])
        act_texts = [c.text for c in ctxs[8:14]]
        silent = [w for w in torch.randperm(tokens.shape[0], generator=g).tolist() if w not in pos][:6]
        non_texts = [model.tokenizer.decode(tokens[w, 20:37].tolist()) for w in silent]
        sc = detection_score(scorer, label, act_texts, non_texts)
        accs.append(sc.balanced_accuracy)
        print(f"   latent {i} (freq {float(freq[i]):.3f}): label {label!r}: {sc!r}")
    print(f"   mean detection balanced accuracy of SmolLM2-135M labels: {sum(accs) / len(accs):.3f} over {len(accs)} latents")


def real_survival(sae_dir: str, layer: int, precisions: tuple[str, ...] = ("int8", "nf4", "fp4"), windows: int = 32,
                  ctx: int = 128) -> None:
    """Survival of a trained fp32 SAE on the embedded model at each precision (same held-out tokens), with the predictor."""
    from sae_lens import SAE

    from qsae_lens.activations import special_token_ids
    from qsae_lens.assets import default_model_path
    from qsae_lens.corpus import tokenize_corpus
    from qsae_lens.models import load_model
    from qsae_lens.survival import feature_survival, predict_survival, reference_features
    from qsae_lens.survival.predictor import quantization_errors, weight_error_alignment

    torch.set_num_threads(2)
    sae = SAE.load_from_disk(sae_dir, device="cpu").eval()
    hook = f"blocks.{layer}.hook_resid_post"
    path = str(default_model_path())
    ref_model = load_model(path, "fp32", device="cpu")
    tokens = torch.tensor(tokenize_corpus(ref_model.tokenizer, "stdlib", context_size=ctx, max_windows=windows, seed=11)["input_ids"])
    keep = ~torch.isin(tokens.reshape(-1), torch.tensor(special_token_ids(ref_model.tokenizer)))

    def acts(model):
        with torch.no_grad():
            out = [model.run_with_cache(tokens[s:s + 8], names_filter=[hook], stop_at_layer=layer + 1)[1][hook]
                   for s in range(0, len(tokens), 8)]
        a = torch.cat(out).reshape(-1, out[0].shape[-1])[keep]
        norms = a.norm(dim=1)
        return a, norms

    a_ref, n_ref = acts(ref_model)
    ok = n_ref <= 10 * n_ref.median()  # the sweep's attention-sink rule (norm > 10x median left out)
    print(f"5. real survival: fp32 SAE {sae_dir} at {hook}, {int(ok.sum()):,} held-out tokens "
          "(the embedded fp32 is dequantized Q4_1)")
    for p in precisions:
        model = load_model(path, p, device="cpu")
        a_q, _ = acts(model)
        rep = feature_survival(sae, a_ref[ok], a_q[ok], label=f"fp32 SAE frozen on {p}")
        err = weight_error_alignment(sae.W_dec.detach(), quantization_errors(ref_model, model, layer))
        X, names = reference_features(rep, sae, err_align=err)
        alive = torch.tensor([s in ("survived", "blurred", "died") for s in rep.status])
        y = torch.tensor([s == "survived" for s in rep.status])
        pred = predict_survival(X[alive], y[alive], names)
        f = rep.fractions
        print(f"   {p}: survived {f['survived']!r}, blurred {f['blurred']!r}, died {f['died']!r}, counts {rep.counts()}; "
              f"median r {float(rep.pearson[alive].nanmedian()):.3f}; curve r>=0.5/0.8/0.9/0.95: "
              f"{rep.curve[10]:.3f}/{rep.curve[16]:.3f}/{rep.curve[18]:.3f}/{rep.curve[19]:.3f}; predictor {pred!r}")
        del model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=16384, help="tokens of the large streaming run (section 2)")
    ap.add_argument("--latents", type=int, default=16384)
    ap.add_argument("--dense-tokens", type=int, default=4096, help="tokens of the dense vs streaming run (section 1)")
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--skip-65k", action="store_true", help="skip section 3")
    ap.add_argument("--tokens-65k", type=lambda v: tuple(int(x) for x in v.split(",")), default=(2048, 8192),
                    help="the two token counts of section 3 (default 2048,8192)")
    ap.add_argument("--explainer-sae", help="also measure SmolLM2's labels (detection) on this trained SAE folder")
    ap.add_argument("--explainer-layer", type=int, default=16)
    ap.add_argument("--only-explainer", action="store_true", help="run only the explainer check")
    ap.add_argument("--real-sae", help="also measure survival of this trained fp32 SAE folder on the embedded model")
    ap.add_argument("--only-real", action="store_true", help="run only the real-survival section")
    ap.add_argument("--_worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._worker:
        print(json.dumps(_worker(args._worker, args.tokens, args.latents, args.k)))
        return
    if args.real_sae and args.only_real:
        real_survival(args.real_sae, args.explainer_layer)
        return
    if args.explainer_sae and args.only_explainer:
        print("4. local explainer (SmolLM2-135M-Instruct) on", args.explainer_sae)
        explainer_check(args.explainer_sae, args.explainer_layer)
        return
    n0, d = args.dense_tokens, args.latents
    dense, stream = _run("dense", n0, d, args.k), _run("streaming", n0, d, args.k)
    a = torch.load(f"/tmp/survival_bench_dense_{n0}_{d}.pt", weights_only=True)
    b = torch.load(f"/tmp/survival_bench_streaming_{n0}_{d}.pt", weights_only=True)
    ok = torch.isfinite(a["pearson"]) & torch.isfinite(b["pearson"])
    m = a["top"] > 0
    print(f"1. {n0:,} tokens x {d:,} latents (same run)")
    for r in (dense, stream):
        print(f"   {r['kind']:9s}: {r['seconds']:7.1f} s wall, {r['cpu_seconds']:7.1f} s CPU, peak RSS {r['peak_rss_gib']:.2f} GiB")
    print(f"   streaming/dense CPU time {stream['cpu_seconds'] / dense['cpu_seconds']:.2f}x, memory "
          f"{stream['peak_rss_gib'] / dense['peak_rss_gib']:.2f}x; max |Δ pearson| "
          f"{(a['pearson'][ok] - b['pearson'][ok]).abs().max():.2e}; top-k values equal: "
          f"{torch.allclose(a['top'][m], b['top'][m])}")
    big = _run("streaming", args.tokens, d, args.k)
    scale = args.tokens / n0
    base = 0.35  # GiB: interpreter + torch, measured as the idle floor of a worker
    dense_mem = base + (dense["peak_rss_gib"] - base) * scale
    print(f"2. {args.tokens:,} tokens x {d:,} latents: streaming {big['seconds']:.1f} s wall, {big['cpu_seconds']:.1f} s CPU, "
          f"peak RSS {big['peak_rss_gib']:.2f} GiB; dense extrapolated (x{scale:.0f} tokens, linear): "
          f"~{dense['cpu_seconds'] * scale:.0f} s CPU, ~{dense_mem:.1f} GiB")
    if not args.skip_65k:
        n1, n2 = args.tokens_65k
        r1, r2 = _run("streaming", n1, 65536, args.k), _run("streaming", n2, 65536, args.k)
        print(f"3. 65,536 latents, streaming: peak RSS {r1['peak_rss_gib']:.2f} GiB at {n1:,} tokens ({r1['cpu_seconds']:.0f} s CPU), "
              f"{r2['peak_rss_gib']:.2f} GiB at {n2:,} tokens ({r2['cpu_seconds']:.0f} s CPU)")
    if args.real_sae:
        real_survival(args.real_sae, args.explainer_layer)
    if args.explainer_sae:
        print("4. local explainer (SmolLM2-135M-Instruct) on", args.explainer_sae)
        explainer_check(args.explainer_sae, args.explainer_layer)


if __name__ == "__main__":
    main()
