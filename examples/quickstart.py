"""Quickstart: a 4-bit model behind TransformerLens hooks, an SAE trained on it with SAELens's own
runner, and a comparison with an SAE trained on the fp32 model. Runs on a laptop CPU in a few minutes.

    python examples/quickstart.py [--tokens 20000] [--layer 16] [--out quickstart_out]

Everything here is the public API: qsae_lens.load_model (a HookedRootModule that SAELens takes as
it is), qsae_lens.tokenize_corpus (windows SAELens reads with is_dataset_tokenized=True), the
"openai_topk" architecture registered with SAELens by importing qsae_lens.training, and
qsae_lens.compare_saes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner

import qsae_lens
from qsae_lens.assets import default_model_path
from qsae_lens.training import OpenAITopKTrainingSAEConfig, safe_logging_config


def train(model, dataset, hook: str, tokens: int, out: Path, seed: int) -> Path:
    """Train an openai_topk SAE on ``model`` with SAELens's runner, streaming activations from the model."""
    cfg = LanguageModelSAERunnerConfig(
        sae=OpenAITopKTrainingSAEConfig(d_in=model.cfg.d_model, d_sae=1024, k=16, init_seed=seed,
                                        dead_tokens_threshold=tokens // 2),
        model_name="SmolLM2-135M-Instruct", hook_name=hook, dataset_path="qsae_lens/stdlib",
        is_dataset_tokenized=True, context_size=64, prepend_bos=False, exclude_special_tokens=True,
        training_tokens=tokens, train_batch_size_tokens=256, store_batch_size_prompts=8, n_batches_in_buffer=8,
        lr=2e-3, device="cpu", seed=seed, output_path=str(out), logger=safe_logging_config(),
        n_checkpoints=0, eval_batch_size_prompts=4, n_eval_batches=1,
    )
    LanguageModelSAETrainingRunner(cfg, override_model=model, override_dataset=dataset).run()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=20_000, help="training tokens per SAE")
    parser.add_argument("--layer", type=int, default=16)
    parser.add_argument("--out", default="quickstart_out")
    args = parser.parse_args()
    torch.manual_seed(0)
    out = Path(args.out)
    hook = f"blocks.{args.layer}.hook_resid_post"

    # 1. the same model at two precisions, with real bitsandbytes kernels for nf4
    fp32 = qsae_lens.load_model(default_model_path(), "fp32")
    nf4 = qsae_lens.load_model(default_model_path(), "nf4")
    print("nf4 metadata:", nf4.precision_metadata)
    tokens = nf4.to_tokens("def add(a, b):\n    return a + b\n")
    loss, cache = nf4.run_with_cache(tokens, return_type="loss", names_filter=hook)
    print(f"nf4 loss {loss.item():.3f}; {hook} has shape {tuple(cache[hook].shape)}")

    # 2. SAEs trained with SAELens's own runner on each model
    dataset = qsae_lens.tokenize_corpus(nf4.tokenizer, "stdlib", context_size=64, max_windows=2 * args.tokens // 64)
    sae_fp32 = train(fp32, dataset, hook, args.tokens, out / "sae_fp32", seed=0)
    sae_nf4 = train(nf4, dataset, hook, args.tokens, out / "sae_nf4", seed=1)

    # 3. how alike are their features? every number beside its null
    report = qsae_lens.compare_saes(sae_nf4, sae_fp32, n_bootstrap=200, n_permutations=500)
    print(report.to_markdown())
    report.save(out / "comparison")
    print(f"open {out / 'comparison' / 'report.html'}")


if __name__ == "__main__":
    main()
