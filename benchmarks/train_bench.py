"""Training benchmarks for issue 4, each printing a ratio against a reference measured in the same run.

Sections (run all with ``python benchmarks/train_bench.py``, or pick with ``--sections``):
  1. sae   — SAE training throughput (tokens/s) of qsae_lens's registered ``openai_topk``
             against SAELens's built-in ``topk``, same config (d_in 576, d_sae 4096, k 32),
             same cached activations, same SAELens ``SAETrainer``.
  2. model — (to be added) quantized-model wrapper overhead against the raw transformers forward.
  3. sweep — (to be added) one sweep cell end to end against plain SAELens on the same config.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@dataclass
class Throughput:
    """Tokens per second of one trainer, measured over ``steps`` timed steps after warm-up."""

    name: str
    tokens_per_s: float
    seconds_per_step: float
    steps: int

    def __repr__(self) -> str:
        return f"{self.name:<38s} {self.tokens_per_s:10.0f} tok/s  ({self.seconds_per_step * 1e3:7.1f} ms/step, {self.steps} steps)"


def _cached_activations(n_batches: int, batch: int, d_in: int, seed: int = 0) -> torch.Tensor:
    """Tensor[n_batches, batch, d_in]: a fixed stand-in for cached residual activations
    (heavy-tailed norms around ~174, like SmolLM2's non-special tokens)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_batches, batch, d_in, generator=g)
    scale = torch.empty(n_batches, batch, 1).exponential_(1.0, generator=g) * 0.5 + 0.75
    return x / x.norm(dim=-1, keepdim=True) * 174.0 * scale


def _time_trainer(
    name: str, sae, acts: torch.Tensor, steps: int, warmup: int, lr: float, dead_feature_window: int = 1000
) -> Throughput:
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    n_batches, batch, _ = acts.shape
    cfg = SAETrainerConfig(
        total_training_samples=(steps + warmup) * batch,
        train_batch_size_samples=batch,
        lr=lr,
        lr_end=lr,
        dead_feature_window=dead_feature_window,
        logger=LoggingConfig(log_to_wandb=False),
    )
    trainer = SAETrainer(cfg, sae, iter(()))
    # trainer.step is the body of SAETrainer.fit (forward, backward, clip, Adam, firing stats).
    for i in range(warmup):
        trainer.step(acts[i % n_batches])
        trainer.n_training_steps += 1
    start = time.perf_counter()
    for i in range(steps):
        trainer.step(acts[(warmup + i) % n_batches])
        trainer.n_training_steps += 1
    elapsed = time.perf_counter() - start
    return Throughput(name, steps * batch / elapsed, elapsed / steps, steps)


def section_sae_throughput(args: argparse.Namespace) -> None:
    """1. openai_topk vs SAELens topk: same shapes, k, lr, batch and activations."""
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    from qsae_lens.training import OpenAITopKTrainingSAE, OpenAITopKTrainingSAEConfig

    d_in, d_sae, k, batch = 576, args.d_sae, args.k, args.batch
    acts = _cached_activations(args.n_cached_batches, batch, d_in)
    print(
        f"\n[1] SAE training throughput: d_in {d_in}, d_sae {d_sae}, k {k}, batch {batch} tokens, "
        f"{torch.get_num_threads()} threads"
    )

    rows: list[tuple[str, Throughput, Throughput]] = []
    # SAELens counts its dead window in steps (dead = steps since fired > window), ours in tokens
    # (dead = tokens since fired >= threshold): window 0 / threshold 1 make every latent that
    # did not fire in the previous step dead, so both aux losses run on every step.
    for label, ours_dead_tokens, theirs_dead_steps in (
        ("no dead latents (aux idle)", 10_000_000, 10**9),
        ("non-firing latents dead (aux every step)", 1, 0),
    ):
        torch.manual_seed(0)
        theirs = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k))
        ours = OpenAITopKTrainingSAE(
            OpenAITopKTrainingSAEConfig(
                d_in=d_in, d_sae=d_sae, k=k, init_seed=0, dead_tokens_threshold=ours_dead_tokens
            )
        )
        ref = _time_trainer(
            "sae_lens topk", theirs, acts, args.steps, args.warmup, args.lr, theirs_dead_steps
        )
        mine = _time_trainer("qsae_lens openai_topk", ours, acts, args.steps, args.warmup, args.lr)
        rows.append((label, ref, mine))

    for label, ref, mine in rows:
        print(f"  {label}")
        print(f"    {ref!r}")
        print(f"    {mine!r}")
        print(f"    ratio openai_topk / sae_lens topk: {mine.tokens_per_s / ref.tokens_per_s:.2f}x")


# Section 2 (lead): quantized-model wrapper overhead vs raw transformers forward, same precision.
# Section 3 (lead): one sweep cell end to end vs plain SAELens on the same config.
SECTIONS = {"sae": section_sae_throughput}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    parser.add_argument("--d-sae", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1024, help="training batch in tokens")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per trainer")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--n-cached-batches", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for name in args.sections:
        SECTIONS[name](args)


if __name__ == "__main__":
    main()
