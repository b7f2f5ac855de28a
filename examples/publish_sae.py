"""Stage SAEs for the hub with a precision-aware card, inspect it, and (optionally) publish it.

    python examples/publish_sae.py OUT_DIR                       # dry run: stage only, no network
    python examples/publish_sae.py OUT_DIR --publish my-org/name # upload (needs HF_TOKEN or `hf auth login`)

The two SAEs here are untrained (random weights) so the example runs in seconds without a model;
in practice pass the folders written by ``qsae sweep`` / SAELens training, or ``qsae publish FOLDER``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from huggingface_hub import ModelCard
from sae_lens import SAE, TopKSAE, TopKSAEConfig

from qsae_lens.hub import publish_saes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="absent or empty folder to stage into")
    parser.add_argument("--publish", metavar="REPO_ID", default=None, help="also upload to this org/name")
    args = parser.parse_args()

    torch.manual_seed(0)
    saes = {}
    for precision, quant_type in [("fp32", None), ("nf4", "nf4")]:
        sae = TopKSAE(TopKSAEConfig(d_in=576, d_sae=2304, k=32))
        # what HookedQuantizedLM.precision_metadata and the sweep put on every SAE (plain JSON only)
        for key, value in {
            "precision": precision,
            "quant_type": quant_type,
            "compute_dtype": "float32",
            "double_quant": False,
            "hook_name": "blocks.15.hook_resid_post",
            "model_name": "HuggingFaceTB/SmolLM2-135M-Instruct",
        }.items():
            sae.cfg.metadata[key] = value
        saes[f"blocks.15.hook_resid_post-{precision}"] = sae

    repo_id = args.publish or "my-org/smollm2-135m-saes"
    staged = publish_saes(saes, repo_id, stage_only=True, stage_dir=args.out_dir)
    print(f"staged {sorted(p.name for p in staged.iterdir())} in {staged}")
    card = ModelCard.load(staged / "README.md")
    print("card tags:", card.data.tags)
    for sae_id in saes:  # what a user of the repo will load: plain SAELens
        print(sae_id, "->", SAE.load_from_disk(staged / sae_id).cfg.metadata.precision)

    if args.publish:
        print("published:", publish_saes(saes, args.publish))


if __name__ == "__main__":
    main()
