"""Compare two SAEs and read each number against its null.

    python examples/compare_two_saes.py runs/bf16/sae runs/nf4/sae --out compare_bf16_nf4
    python examples/compare_two_saes.py --demo --out /tmp/compare_demo

With two checkpoint folders (or hub ids) it compares them. ``--demo`` builds a pair with a known
answer instead: SAE a with random unit decoder directions, and SAE b = a with its latents shuffled,
a quarter of them replaced by new directions and every direction perturbed by noise, standing in
for "the same SAE trained on a quantized model". Expect matched cosine well above its null and
about 3/4 of latents matched above 0.9.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch


def demo_pair(folder: Path, d_in: int = 64, d_sae: int = 512, seed: int = 0) -> tuple[Path, Path, tuple]:
    """Two SAELens TopK SAEs saved with ``save_model``, and activations for the same tokens."""
    from sae_lens import TopKSAE, TopKSAEConfig

    g = torch.Generator().manual_seed(seed)
    w_a = torch.nn.functional.normalize(torch.randn(d_sae, d_in, generator=g), dim=1)
    w_b = w_a[torch.randperm(d_sae, generator=g)].clone()
    w_b[: d_sae // 4] = torch.randn(d_sae // 4, d_in, generator=g)  # features the other SAE lacks
    w_b = torch.nn.functional.normalize(w_b + 0.05 * torch.randn(d_sae, d_in, generator=g), dim=1)
    paths = []
    for name, w, precision in (("a", w_a, "bf16"), ("b", w_b, "nf4")):
        cfg = TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=16)
        cfg.metadata.hook_name = "blocks.12.hook_resid_post"
        cfg.metadata.model_name = "demo"
        cfg.metadata.precision = precision
        sae = TopKSAE(cfg)
        with torch.no_grad():
            sae.W_dec.copy_(w)
            sae.W_enc.copy_(w.T)
        sae.save_model(folder / name)
        paths.append(folder / name)
    # activations: sparse combinations of a's directions, and the same tokens seen through b's model
    # (a small perturbation, as quantization would make)
    codes = torch.relu(torch.randn(2048, d_sae, generator=g) - 2.0)
    x_a = codes @ w_a
    x_b = x_a + 0.05 * torch.randn(x_a.shape, generator=g)
    return paths[0], paths[1], (x_a, x_b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", nargs="?", help="SAE a: checkpoint folder or hub id")
    parser.add_argument("b", nargs="?", help="SAE b: checkpoint folder or hub id")
    parser.add_argument("--demo", action="store_true", help="compare a built-in pair with a known answer")
    parser.add_argument("--out", default="compare_report", help="folder for report.json/.md/.html")
    args = parser.parse_args()

    from qsae_lens.compare import compare_saes

    with tempfile.TemporaryDirectory() as tmp:
        if args.demo:
            a, b, activations = demo_pair(Path(tmp))
        elif args.a and args.b:
            a, b, activations = args.a, args.b, None
        else:
            parser.error("give two SAEs (folders or hub ids), or --demo")
        report = compare_saes(a, b, activations=activations, n_permutations=2000)

    # The report's one job is to put every number beside its baseline.
    m = report.metrics["decoder_matched_cosine"]
    print(
        f"matched cosine {m.value:.3f} (95% CI {m.ci_low:.3f}-{m.ci_high:.3f}), random SAEs score {m.null:.3f}"
    )
    shared = report.metrics["decoder_matched_fraction_above_0.9"].value
    print(f"{shared:.0%} of latents have a partner above cosine 0.9")
    for w in report.warnings:
        print("warning:", w)
    folder = report.save(args.out)
    print(report.to_markdown())
    print(f"open {folder / 'report.html'} for the figures")


if __name__ == "__main__":
    main()
