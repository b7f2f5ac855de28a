"""Seed-to-seed sharing against d_sae and training length: the trade-off table of docs/sweep.md.

Caches fp32 ``blocks.16.hook_resid_post`` activations of the embedded SmolLM2 on the stdlib corpus once
(24,576 tokens, attention sinks > 10x the median norm dropped, as the sweep does), trains 3 seeds of
``openai_topk`` per grid point, then reads every baseline seed pair against the mirror-image null
(``nulls.reflection_basis``/``nulls.reflect``, 199 draws per pair) with ``seeds.sharing_bar``:

    python benchmarks/seed_tradeoff.py train 256:32:102400:2e-3 1024:32:307200:2e-3   # d_sae:k:samples:lr
    python benchmarks/seed_tradeoff.py analyse          # prints one JSON line per grid point

Results go under ``--root`` (default /tmp/qsae_validity); a trained seed is not retrained.
"""

from __future__ import annotations

import argparse
import json
import time
from itertools import combinations
from pathlib import Path

import torch

HOOK = "blocks.16.hook_resid_post"
SEEDS = (0, 1, 2)
NULL_DRAWS = 199


def _activations(root: Path) -> torch.Tensor:
    """Tensor[n, 576] cached fp32 training activations, sinks dropped (cached under ``root`` once)."""
    from qsae_lens.activations import cache_activations, load_activations

    cache = root / "acts_fp32_L16"
    if not any(cache.glob("*.json")):
        from transformers import AutoTokenizer

        from qsae_lens.assets import default_model_path
        from qsae_lens.corpus import corpus_texts, tokenize_corpus_splits
        from qsae_lens.models import load_model

        path = Path(default_model_path())
        tok = (AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name) if path.suffix == ".gguf"
               else AutoTokenizer.from_pretrained(str(path)))  # fmt: skip
        splits = tokenize_corpus_splits(tok, corpus_texts("stdlib"), context_size=128, max_windows=24576 // 128,
                                        max_eval_windows=16, seed=0)  # fmt: skip
        model = load_model(str(path), "fp32", device="cpu")
        cache_activations(model, splits["train"], [HOOK], cache, aggregation="all", exclude_special_tokens=True,
                          progress=False)  # fmt: skip
    acts = load_activations(cache, HOOK)
    norms = acts.norm(dim=-1)
    return acts[norms <= 10 * float(norms.median())]


def train(root: Path, grid: list[str]) -> None:
    import qsae_lens.training  # noqa: F401 - registers openai_topk
    from qsae_lens.training import ARCHITECTURES
    from qsae_lens.training.fit import train_sae_on_activations

    acts = _activations(root)
    for point in grid:
        d_sae, k, samples, lr = (f(x) for f, x in zip((int, int, int, float), point.split(":"), strict=True))
        for seed in SEEDS:
            out = root / "saes" / f"d{d_sae}_k{k}_n{samples}_lr{lr:g}" / f"seed{seed}"
            if (out / "cfg.json").exists():
                continue
            cfg = ARCHITECTURES["openai_topk"](d_in=acts.shape[1], d_sae=d_sae, k=k, init_seed=seed,
                                               dead_tokens_threshold=50_000)  # fmt: skip
            t0 = time.time()
            res = train_sae_on_activations(cfg, acts, total_tokens=samples, batch_size=256, lr=lr, data_seed=seed,
                                           out_dir=out)  # fmt: skip
            rec = {"d_sae": d_sae, "k": k, "samples": samples, "lr": lr, "seed": seed, "seconds": time.time() - t0,
                   "dead_fraction": res.dead_fraction,
                   "final_loss": res.loss_history[-1] if res.loss_history else None}  # fmt: skip
            (out.parent / f"train_seed{seed}.json").write_text(json.dumps(rec))
            print(json.dumps(rec), flush=True)


def analyse(root: Path) -> None:
    from safetensors.torch import load_file

    from qsae_lens.compare.alignment import mutual_nearest_neighbours, one_to_one_matching
    from qsae_lens.compare.nulls import reflect, reflection_basis
    from qsae_lens.compare.seeds import sharing_bar

    rows = []
    for cfg_dir in sorted((root / "saes").iterdir()):
        seeds = sorted(p for p in cfg_dir.glob("seed*") if (p / "sae_weights.safetensors").exists())
        if len(seeds) < len(SEEDS):
            continue
        dec = {int(p.name[4:]): load_file(p / "sae_weights.safetensors")["W_dec"].float() for p in seeds}
        obs, nul, mnn_o, mnn_n, matched, matched_null = {}, {}, {}, {}, [], []
        for s, t in combinations(sorted(dec), 2):
            a, b = dec[s], dec[t]
            basis = reflection_basis(b)
            mirrors = [reflect(b, basis, seed=100 * s + t + 7919 * (i + 1)) for i in range(NULL_DRAWS)]
            m = one_to_one_matching(a, b)
            obs[(s, t)], mnn_o[(s, t)] = m.cosine, mutual_nearest_neighbours(a, b).double()
            null_matchings = [one_to_one_matching(a, z) for z in mirrors]
            nul[(s, t)] = torch.stack([x.cosine for x in null_matchings])
            mnn_n[(s, t)] = torch.stack([mutual_nearest_neighbours(a, z).double() for z in mirrors])
            matched.append(m.mean_cosine)
            matched_null.append(sum(x.mean_cosine for x in null_matchings) / NULL_DRAWS)
        bar = sharing_bar(obs, nul, mnn_observed=mnn_o, mnn_null=mnn_n)
        rec = json.loads((cfg_dir / "train_seed0.json").read_text())
        rows.append({
            "config": cfg_dir.name, "d_sae": rec["d_sae"], "k": rec["k"], "samples": rec["samples"], "lr": rec["lr"],
            "mse": round(rec["final_loss"]["mse_loss"], 4),
            "matched": round(sum(matched) / len(matched), 3), "matched_null": round(sum(matched_null) / len(matched), 3),
            "frac05": [round(x, 3) for x in bar.observed], "frac05_null": [round(x, 3) for x in bar.null],
            "p": [float(f"{x:.2g}") for x in bar.p_values],
            "mnn": [round(x, 3) for x in bar.mnn_observed], "mnn_null": [round(x, 3) for x in bar.mnn_null],
            "mnn_p": [float(f"{x:.2g}") for x in bar.mnn_p_values], "cleared": bar.cleared,
        })  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    (root / "tradeoff_mirror.json").write_text(json.dumps(rows, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["train", "analyse"])
    ap.add_argument("grid", nargs="*", help="train: d_sae:k:training_samples:lr per grid point")
    ap.add_argument("--root", type=Path, default=Path("/tmp/qsae_validity"))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.what == "train":
        if not args.grid:
            ap.error("train needs at least one d_sae:k:training_samples:lr")
        train(args.root, args.grid)
    else:
        analyse(args.root)


if __name__ == "__main__":
    main()
