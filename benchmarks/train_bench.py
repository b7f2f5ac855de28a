"""Training benchmarks for issue 4, each printing a ratio against a reference measured in the same run.

Sections (run all with ``python benchmarks/train_bench.py``, or pick with ``--sections``):
  1. sae   — SAE training throughput (tokens/s) of qsae_lens's registered ``openai_topk``
             against SAELens's built-in ``topk``, same config (d_in 576, d_sae 4096, k 32),
             same cached activations, same SAELens ``SAETrainer``.
  2. model — HookedQuantizedLM (``qsae_lens.models.load_model``) against the raw transformers
             forward at the same precision (a separately loaded ``AutoModelForCausalLM`` with the
             same BitsAndBytesConfig), same tokens, warm-up, interleaved repeats, medians: the full
             forward, and ``run_with_cache(stop_at_layer=L+1)`` against the HF model cut to its
             first L+1 layers. Timing helpers shared with ``benchmarks/models_overhead.py``.
  3. sweep — one sweep cell end to end against plain SAELens, same model (embedded SmolLM2 fp32),
             hook, d_sae, k, batch, token budget and tokenized stdlib windows:
             (a) plain ``LanguageModelSAETrainingRunner`` with SAELens's built-in ``topk``, once with
                 the model honouring ``stop_at_layer`` (HookedQuantizedLM) and once through a wrapper
                 that drops it (all 30 layers, as in the issue's 658 tok/s measurement);
             (b) ``cache_activations`` once + ``train_sae_on_activations`` (``openai_topk``), as
                 ``qsae_lens.sweep`` does; (c) (b) with a second seed trained from the same cache.

    python benchmarks/train_bench.py                                 # all sections
    python benchmarks/train_bench.py --sections sweep --cell-tokens 32768
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from qsae_lens.precision import Precision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # models_overhead's timing helpers


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


def section_model_overhead(args: argparse.Namespace) -> None:
    """2. HookedQuantizedLM vs the raw transformers forward at the same precision."""
    from qsae_lens.assets import default_model_path
    from qsae_lens.precision import parse_precision

    for name in args.precisions:
        _model_overhead_at(default_model_path(), parse_precision(name), args)


def _model_overhead_at(path: Path, prec: Precision, args: argparse.Namespace) -> None:
    from models_overhead import print_ratio_table, time_interleaved

    from qsae_lens.corpus import tokenize_corpus
    from qsae_lens.models import load_model
    from qsae_lens.models.loading import load_hf_model

    stop = args.layer + 1
    hook = f"blocks.{args.layer}.hook_resid_post"
    model = load_model(path, prec, "cpu")
    # separate HF copies: the wrapper's forward hooks stay on its own copy
    hf = load_hf_model(path, prec, "cpu", None)
    hf_cut = load_hf_model(path, prec, "cpu", None)
    hf_cut.model.layers = hf_cut.model.layers[:stop]  # Llama layout (the embedded SmolLM2)
    tokens = torch.tensor(
        tokenize_corpus(model.tokenizer, "stdlib", context_size=args.context, max_windows=args.model_batch)[
            "input_ids"
        ]
    )
    with torch.no_grad():  # the cut HF model computes exactly norm(blocks.L.hook_resid_post)
        _, cache = model.run_with_cache(tokens, names_filter=[hook], stop_at_layer=stop)
        diff = (hf_cut.model.norm(cache[hook]) - hf_cut.model(tokens, use_cache=False).last_hidden_state).abs().max()
    raw, raw_cut = "raw HF forward", f"raw HF, first {stop} layers only"
    wrap_cut = f"HookedQuantizedLM run_with_cache stop_at_layer={stop}"
    cases = {
        raw: lambda: hf(tokens, use_cache=False),
        "HookedQuantizedLM forward": lambda: model(tokens),
        "raw HF forward, output_hidden_states": lambda: hf(tokens, use_cache=False, output_hidden_states=True),
        raw_cut: lambda: hf_cut.model(tokens, use_cache=False),
        wrap_cut: lambda: model.run_with_cache(tokens, names_filter=[hook], stop_at_layer=stop),
    }
    times = time_interleaved(cases, args.repeats)
    print(
        f"\n[2] wrapper overhead, SmolLM2-135M {prec.name}, {tuple(tokens.shape)} stdlib tokens, "
        f"{torch.get_num_threads()} threads, median of {args.repeats} after warm-up "
        f"(check: max |norm(cache) - cut HF| = {float(diff):.2g})"
    )
    print_ratio_table(times, raw, ratio_to={raw_cut: raw_cut, wrap_cut: raw_cut})
    print(
        f"    ratio wrapper/raw: forward {statistics.median(times['HookedQuantizedLM forward']) / statistics.median(times[raw]):.2f}x, "
        f"stop_at_layer {statistics.median(times[wrap_cut]) / statistics.median(times[raw_cut]):.2f}x"
    )


class _ForwardTimer:
    """Replaces ``model.run_with_cache`` on one instance to time the LM forward and count its tokens.

    With ``honour_stop_at_layer=False`` it drops ``stop_at_layer``: a model wrapper without
    ``stop_at_layer`` support, so every forward runs all layers (what the issue's plain-SAELens
    measurement paid). ``remove()`` restores the class's method.
    """

    def __init__(self, model: torch.nn.Module, *, honour_stop_at_layer: bool = True) -> None:
        self.model, self.honour = model, honour_stop_at_layer
        self.seconds, self.tokens, self.calls = 0.0, 0, 0
        self._run = model.run_with_cache
        model.run_with_cache = self  # instance attribute shadows the bound method

    def __call__(self, tokens: torch.Tensor, *args, **kwargs):
        if not self.honour:
            kwargs.pop("stop_at_layer", None)
        t0 = time.perf_counter()
        out = self._run(tokens, *args, **kwargs)
        self.seconds += time.perf_counter() - t0
        self.tokens += tokens.numel()
        self.calls += 1
        return out

    def remove(self) -> None:
        del self.model.run_with_cache


@dataclass
class CellTiming:
    """One way of training SAE(s) from the LM: end-to-end seconds and where they went."""

    name: str
    training_tokens: int
    """SAE training samples, summed over the SAEs trained."""
    seconds: float
    lm_forward_s: float
    lm_tokens: int
    """Tokens the LM forwarded (SAELens reads whole buffers; special tokens are forwarded, not trained on)."""
    sae_train_s: float
    other_s: float
    """Cache writing/reading (ours) or buffer mixing and setup (SAELens's store)."""

    @property
    def tokens_per_s(self) -> float:
        return self.training_tokens / self.seconds

    def __repr__(self) -> str:
        return (
            f"{self.name:<52s} {self.tokens_per_s:7.0f} train tok/s | {self.seconds:6.1f} s = "
            f"LM fwd {self.lm_forward_s:5.1f} s ({100 * self.lm_forward_s / self.seconds:3.0f}%, "
            f"{self.lm_tokens} tok) + SAE {self.sae_train_s:5.1f} s + other {self.other_s:4.1f} s"
        )


def _plain_saelens_cell(model, dataset, args, tmp: Path, *, honour_stop_at_layer: bool) -> CellTiming:
    """(a) SAELens's own runner streaming activations through its ActivationsStore (built-in topk)."""
    from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner
    from sae_lens.config import LoggingConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAEConfig

    tag = "stop" if honour_stop_at_layer else "full"
    cfg = LanguageModelSAERunnerConfig(
        sae=TopKTrainingSAEConfig(d_in=model.cfg.d_model, d_sae=args.d_sae, k=args.k),
        model_name="smollm2-135m-fp32",
        hook_name=f"blocks.{args.layer}.hook_resid_post",
        is_dataset_tokenized=True,
        context_size=args.context,
        prepend_bos=False,  # the windows already start with BOS
        exclude_special_tokens=True,
        training_tokens=args.cell_tokens,
        train_batch_size_tokens=args.batch,
        store_batch_size_prompts=args.cache_batch,
        n_batches_in_buffer=args.buffer_batches,
        lr=args.lr,
        device="cpu",
        dtype="float32",
        seed=0,
        logger=LoggingConfig(log_to_wandb=False),
        checkpoint_path=str(tmp / f"ckpt-{tag}"),
        output_path=str(tmp / f"saelens-{tag}"),
        verbose=False,
    )
    timer = _ForwardTimer(model, honour_stop_at_layer=honour_stop_at_layer)
    try:
        t0 = time.perf_counter()
        # SAELens calls set_format("torch") on the dataset it is given: hand it a copy
        runner = LanguageModelSAETrainingRunner(cfg, override_model=model, override_dataset=dataset.with_format(None))
        runner.run()
        seconds = time.perf_counter() - t0
    finally:
        timer.remove()
    # the trainer's own step time is not exposed: SAE time = total - LM forward - nothing else we can
    # separate, so "other" (buffer filling/mixing, setup, save) is folded into the SAE share here
    name = f"(a) plain SAELens runner, topk, {'stop_at_layer' if honour_stop_at_layer else 'all 30 layers'}"
    return CellTiming(name, args.cell_tokens, seconds, timer.seconds, timer.tokens, seconds - timer.seconds, 0.0)


def section_sweep_cell(args: argparse.Namespace) -> None:
    """3. A qsae_lens sweep cell (cache once, train from the tensor) vs plain SAELens's runner."""
    from transformers import AutoTokenizer

    import qsae_lens.training  # noqa: F401 - registers openai_topk with SAELens
    from qsae_lens.activations import cache_activations, load_activations
    from qsae_lens.assets import default_model_path
    from qsae_lens.corpus import tokenize_corpus
    from qsae_lens.models import load_model
    from qsae_lens.training import OpenAITopKTrainingSAEConfig
    from qsae_lens.training.fit import train_sae_on_activations

    path = default_model_path()
    hook = f"blocks.{args.layer}.hook_resid_post"
    # windows: enough non-special tokens for the budget (BOS + EOS separators are excluded), plus
    # headroom for SAELens's store, which reads whole buffers ahead of training
    cell_windows = math.ceil(1.05 * args.cell_tokens / (args.context - 2))
    buffer_windows = args.buffer_batches + 2 * args.cache_batch  # SAELens's buffer: n_batches_in_buffer * context tokens
    dataset = tokenize_corpus(
        AutoTokenizer.from_pretrained(path), "stdlib", context_size=args.context, max_windows=cell_windows + 2 * buffer_windows
    )
    model = load_model(path, "fp32", "cpu")
    print(
        f"\n[3] sweep cell vs plain SAELens: SmolLM2-135M fp32 (Q4_1-dequantized weights), {hook}, d_sae {args.d_sae}, "
        f"k {args.k}, batch {args.batch}, {args.cell_tokens} training tokens, stdlib windows of {args.context}, "
        f"{torch.get_num_threads()} threads"
    )
    with torch.no_grad():  # warm-up, so that no side pays first-call costs
        model.run_with_cache(torch.tensor(dataset[: args.cache_batch]["input_ids"]), names_filter=[hook])
    rows: list[CellTiming] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for honour in args.saelens_modes:
            rows.append(_plain_saelens_cell(model, dataset, args, tmp, honour_stop_at_layer=honour == "stop"))

        # (b) the sweep's way: one forward pass cached to disk, SAEs trained from the tensor
        timer = _ForwardTimer(model)
        try:
            t0 = time.perf_counter()
            folder = cache_activations(
                model, dataset, [hook], tmp / "acts", aggregation="all", exclude_special_tokens=True,
                batch_size=args.cache_batch, max_tokens=cell_windows * args.context, progress=False,
            )  # fmt: skip
            acts = load_activations(folder, hook)
            cache_s = time.perf_counter() - t0
        finally:
            timer.remove()
        train_s = []
        for seed in (0, 1):
            t0 = time.perf_counter()
            train_sae_on_activations(
                OpenAITopKTrainingSAEConfig(
                    d_in=acts.shape[1], d_sae=args.d_sae, k=args.k, init_seed=seed, dead_tokens_threshold=200_000
                ),
                acts, total_tokens=args.cell_tokens, batch_size=args.batch, lr=args.lr, data_seed=seed,
                out_dir=tmp / f"ours-seed{seed}", metadata={"init_seed": seed, "hook_name": hook},
            )  # fmt: skip
            train_s.append(time.perf_counter() - t0)
        rows.append(
            CellTiming("(b) qsae_lens cell: cache once + openai_topk", args.cell_tokens, cache_s + train_s[0],
                       timer.seconds, timer.tokens, train_s[0], cache_s - timer.seconds)
        )  # fmt: skip
        rows.append(
            CellTiming("(c) qsae_lens, 2 seeds from one cache (amortised)", 2 * args.cell_tokens,
                       cache_s + sum(train_s), timer.seconds, timer.tokens, sum(train_s), cache_s - timer.seconds)
        )  # fmt: skip
        print(f"  cached {acts.shape[0]} activation vectors (1 epoch of the {args.cell_tokens}-token budget)")

    for row in rows:
        print(f"    {row!r}")
    ours, amortised = rows[-2], rows[-1]
    for ref in rows[:-2]:
        print(
            f"    ratio vs {ref.name[4:]}: cell {ours.tokens_per_s / ref.tokens_per_s:.2f}x, "
            f"2 seeds amortised {amortised.tokens_per_s / ref.tokens_per_s:.2f}x"
        )
    print(f"    issue target: >= 2x the issue's plain-SAELens 658 tok/s = 1316 tok/s; cell measured {ours.tokens_per_s:.0f}")


SECTIONS = {"sae": section_sae_throughput, "model": section_model_overhead, "sweep": section_sweep_cell}


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
    g = parser.add_argument_group("sections model and sweep")
    g.add_argument("--layer", type=int, default=15, help="block whose hook_resid_post is read")
    g.add_argument("--context", type=int, default=128, help="tokens per window")
    g.add_argument("--precisions", nargs="+", default=["fp32", "nf4"], help="model section (int8 optional)")
    g.add_argument("--model-batch", type=int, default=4, help="model section: windows per forward")
    g.add_argument("--repeats", type=int, default=5, help="model section: timed repeats (median)")
    g.add_argument("--cell-tokens", type=int, default=32_768, help="sweep section: SAE training tokens")
    g.add_argument("--cache-batch", type=int, default=8, help="sweep section: windows per LM forward (both sides)")
    g.add_argument(
        "--buffer-batches", type=int, default=20,
        help="sweep section: SAELens n_batches_in_buffer (its default; buffer = this x context tokens >= --batch)",
    )  # fmt: skip
    g.add_argument(
        "--saelens-modes", nargs="+", default=["stop", "full"], choices=["stop", "full"],
        help="sweep section: plain SAELens with stop_at_layer honoured, and/or all layers forwarded",
    )  # fmt: skip
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    for name in args.sections:
        SECTIONS[name](args)


if __name__ == "__main__":
    main()
