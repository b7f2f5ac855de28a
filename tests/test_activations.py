"""Probe layers, Welford statistics and the activation cache, checked against direct computations.

The model is a real TransformerLens ``HookedTransformer`` (random weights, SmolLM2's tokenizer) so
the cache is exercised through the public HookedRootModule interface; SAELens's own runner then
trains from the cache. One test runs the real default model through ``qsae_lens.models``.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from qsae_lens.activations import (
    RunningStats,
    cache_activations,
    load_activations,
    probe_layers,
    read_cache_info,
    special_token_ids,
)

CTX = 16
HOOKS = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z", "blocks.2.hook_resid_post"]


@pytest.fixture(scope="module")
def tiny_model(smollm2_path: Path):
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    cfg = HookedTransformerConfig(
        n_layers=3, d_model=32, n_ctx=64, d_head=8, n_heads=4, d_mlp=64, d_vocab=len(tokenizer),
        act_fn="gelu", normalization_type="LN", seed=0,
    )  # fmt: skip
    model = HookedTransformer(cfg, tokenizer=tokenizer)
    return model.eval()


@pytest.fixture(scope="module")
def windows(tiny_model):
    from qsae_lens.corpus import tokenize_corpus

    return tokenize_corpus(tiny_model.tokenizer, "stdlib", context_size=CTX, max_windows=20)


@contextmanager
def count_forward_passes(model, fail_after: int | None = None):
    """Count calls of the embedding hook (one per forward pass); optionally raise after N of them."""
    calls = [0]

    def hook(module, inputs, output):
        if fail_after is not None and calls[0] >= fail_after:
            raise KeyboardInterrupt("simulated interruption")
        calls[0] += 1

    handle = model.hook_embed.register_forward_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


def direct(model, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every hook from one full, unstopped forward pass, heads flattened: Tensor[b, ctx, d]."""
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=HOOKS)
    return {h: cache[h].reshape(*tokens.shape, -1) for h in HOOKS}


def test_probe_layers_follow_the_methodology() -> None:
    assert probe_layers(48) == [0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 46, 47]
    assert probe_layers(30) == [0, 4, 8, 12, 16, 20, 24, 28, 29]
    assert probe_layers(5) == [0, 3, 4] and probe_layers(2) == [0, 1] and probe_layers(1) == [0]
    for bad in (0, -3, 2.5, True, "12"):
        with pytest.raises(ValueError, match="positive int"):
            probe_layers(bad)  # type: ignore[arg-type]


def test_running_stats_equal_torch_on_the_concatenation() -> None:
    gen = torch.Generator().manual_seed(0)
    # a large offset makes a naive sum-of-squares variance lose digits; Welford/Chan must not
    batches = [1e4 + torch.randn(n, 7, generator=gen) * torch.arange(1, 8) for n in (1, 5, 64, 0, 33)]
    stats = RunningStats()
    for b in batches:
        stats.update(b.to(torch.float32 if len(b) == 64 else torch.float64))
    full = torch.cat([b if len(b) != 64 else b.to(torch.float32).double() for b in batches])
    assert stats.count == len(full) == 103
    torch.testing.assert_close(stats.mean, full.mean(0), rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(stats.var(), full.var(0), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(stats.var(correction=0), full.var(0, correction=0), rtol=1e-9, atol=1e-9)
    # merging two accumulators = one accumulator over everything; JSON round-trip is exact
    a, b = RunningStats().update(full[:40]), RunningStats().update(full[40:])
    torch.testing.assert_close(a.merge(b).var(), full.var(0), rtol=1e-9, atol=1e-9)
    back = RunningStats.from_json(json.loads(json.dumps(stats.to_json())))
    assert torch.equal(back.mean, stats.mean) and back.count == stats.count
    torch.testing.assert_close(back.var(), stats.var(), rtol=1e-15, atol=0)
    with pytest.raises(ValueError, match="dimension mismatch"):
        stats.update(torch.zeros(2, 3))


def test_cache_all_equals_a_direct_run_without_special_tokens(tiny_model, windows, tmp_path) -> None:
    tokens = torch.tensor(windows["input_ids"])
    with count_forward_passes(tiny_model) as calls:
        out = cache_activations(tiny_model, windows, HOOKS, tmp_path / "c", batch_size=6, batches_per_shard=2, progress=False)
    assert calls[0] == 4  # ceil(20 / 6) batches, one pass each for all three hooks
    ref = direct(tiny_model, tokens)
    special = torch.isin(tokens, torch.tensor([tiny_model.tokenizer.bos_token_id, tiny_model.tokenizer.eos_token_id]))
    assert special[:, 0].all() and special.sum() > 20  # BOS on every window, EOS between documents

    info = read_cache_info(out)
    assert info.n_windows == 20 and info.n_positions == 20 * CTX and info.n_vectors == int((~special).sum())
    assert info.d_in == {h: 32 for h in HOOKS} and info.special_token_ids == [1, 2]
    for h in HOOKS:
        got = load_activations(out, h)
        torch.testing.assert_close(got, ref[h][~special], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(load_activations(out, h, exclude_special_tokens=False), ref[h].reshape(-1, 32))
        assert torch.equal(load_activations(out, h, max_rows=50), got[:50])
        kept = ref[h][~special].double()
        torch.testing.assert_close(info.stats[h].mean, kept.mean(0), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(info.stats[h].var(), kept.var(0), rtol=1e-5, atol=1e-6)
    # a finished cache with the same settings is returned without running the model again
    with count_forward_passes(tiny_model) as calls:
        assert cache_activations(tiny_model, windows, HOOKS, out, batch_size=6, batches_per_shard=2, progress=False) == out
    assert calls[0] == 0
    with pytest.raises(FileExistsError, match="different settings"):
        cache_activations(tiny_model, windows, HOOKS, out, aggregation="mean", progress=False)


def test_last_and_mean_aggregate_over_ordinary_tokens(tiny_model, windows, tmp_path) -> None:
    eos = tiny_model.tokenizer.eos_token_id
    tokens = torch.tensor(windows["input_ids"])[:6].clone()
    tokens[0, -3:] = eos  # the last ordinary token of window 0 is at position CTX-4
    tokens[1, :] = eos  # window 1 has no ordinary token: dropped
    ref = direct(tiny_model, tokens)
    specials = torch.tensor(special_token_ids(tiny_model.tokenizer))
    keep_windows = [i for i in range(6) if i != 1]
    for aggregation in ("last", "mean"):
        out = cache_activations(tiny_model, tokens, HOOKS, tmp_path / aggregation, aggregation=aggregation, batch_size=4, progress=False)
        for h in HOOKS:
            expected = []
            for i in keep_windows:  # written as a plain loop: an independent formulation
                positions = [p for p in range(CTX) if int(tokens[i, p]) not in specials.tolist()]
                rows = ref[h][i, positions]
                expected.append(rows[-1] if aggregation == "last" else rows.mean(0))
            torch.testing.assert_close(load_activations(out, h), torch.stack(expected), rtol=1e-5, atol=1e-5)
        info = read_cache_info(out)
        assert info.n_vectors == 5 and info.rows_per_window == 1 and info.stats[HOOKS[0]].count == 5


def test_interrupted_cache_resumes_and_skips_finished_shards(tiny_model, windows, tmp_path) -> None:
    out = tmp_path / "resume"
    kwargs = dict(batch_size=4, batches_per_shard=1, progress=False)
    with count_forward_passes(tiny_model, fail_after=3), pytest.raises(KeyboardInterrupt):
        cache_activations(tiny_model, windows, HOOKS, out, **kwargs)
    partial = tmp_path / "resume.partial"
    assert not out.exists()  # nothing that looks finished
    assert sorted(p.name for p in partial.glob("data-*")) == ["data-00000.arrow", "data-00001.arrow", "data-00002.arrow"]
    assert not list(partial.glob(".tmp-*"))
    with pytest.raises(FileNotFoundError, match="incomplete .*3 shard"):
        load_activations(out, HOOKS[0])
    with pytest.raises(FileExistsError, match="different settings"):
        cache_activations(tiny_model, windows, HOOKS[:1], out, **kwargs)

    with count_forward_passes(tiny_model) as calls:
        cache_activations(tiny_model, windows, HOOKS, out, **kwargs)
    assert calls[0] == 5 - 3  # only the unfinished batches ran
    assert not partial.exists()
    tokens = torch.tensor(windows["input_ids"])
    special = torch.isin(tokens, torch.tensor(special_token_ids(tiny_model.tokenizer)))
    ref = direct(tiny_model, tokens)
    for h in HOOKS:
        torch.testing.assert_close(load_activations(out, h), ref[h][~special], rtol=1e-5, atol=1e-5)
        kept = ref[h][~special].double()
        torch.testing.assert_close(read_cache_info(out).stats[h].var(), kept.var(0), rtol=1e-5, atol=1e-6)


def test_bad_input_gives_clear_errors(tiny_model, windows, tmp_path) -> None:
    with pytest.raises(KeyError, match=r"blocks\.9\.hook_resid_post.*Valid hook names.*blocks\.0\.hook_resid_pre"):
        cache_activations(tiny_model, windows, ["blocks.9.hook_resid_post"], tmp_path / "x", progress=False)
    with pytest.raises(ValueError, match="aggregation"):
        cache_activations(tiny_model, windows, HOOKS, tmp_path / "x", aggregation="max", progress=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no windows"):
        cache_activations(tiny_model, windows.select([]), HOOKS, tmp_path / "x", progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_activations(tmp_path / "nowhere", HOOKS[0])
    out = cache_activations(tiny_model, windows.select(range(2)), HOOKS[:1], tmp_path / "ok", progress=False)
    with pytest.raises(KeyError, match=r"Valid hook names: \['blocks\.0\.hook_resid_post'\]"):
        load_activations(out, "blocks.1.hook_resid_post")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not an activation cache"):
        cache_activations(tiny_model, windows, HOOKS, tmp_path / "junk", progress=False)


def test_sae_lens_runner_trains_from_the_cache(tiny_model, windows, tmp_path) -> None:
    from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig
    from sae_lens.saes.standard_sae import StandardTrainingSAEConfig
    from sae_lens.util import get_special_token_ids

    assert special_token_ids(tiny_model.tokenizer) == sorted(get_special_token_ids(tiny_model.tokenizer))
    hook = HOOKS[2]
    out = cache_activations(tiny_model, windows, HOOKS, tmp_path / "c", batch_size=8, progress=False)
    info = read_cache_info(out)
    cfg = LanguageModelSAERunnerConfig(
        sae=StandardTrainingSAEConfig(d_in=info.d_in[hook], d_sae=64),
        model_name="tiny", **info.sae_lens_config_kwargs(hook),
        training_tokens=1024, train_batch_size_tokens=64, store_batch_size_prompts=4, n_batches_in_buffer=8,
        lr=1e-3, device="cpu", seed=0, output_path=str(tmp_path / "sae"), checkpoint_path=None,
        logger=LoggingConfig(log_to_wandb=False), verbose=False,
    )  # fmt: skip
    # SAELens calls set_format('torch') on the dataset it is given: hand it a copy, not the fixture
    runner = LanguageModelSAETrainingRunner(cfg, override_model=tiny_model, override_dataset=windows.with_format(None))
    store = runner.activations_store
    assert store.cached_activation_dataset is not None
    # SAELens's first raw batch, special tokens filtered its own way, is our first 4 windows' rows
    first = store.get_filtered_llm_batch()
    n_first = int((~torch.isin(torch.tensor(windows["input_ids"][:4]), torch.tensor(info.special_token_ids))).sum())
    torch.testing.assert_close(first, load_activations(out, hook)[:n_first])
    store.current_row_idx = 0
    w_dec_init = runner.sae.W_dec.detach().clone()
    with count_forward_passes(tiny_model) as calls:
        sae = runner.run()
    assert calls[0] == 0  # trained from disk: the language model never ran
    assert torch.isfinite(sae.W_dec).all() and not torch.allclose(sae.W_dec, w_dec_init)
    assert (tmp_path / "sae" / "cfg.json").exists()


def test_default_model_cache_and_cli(smollm2_path, tmp_path) -> None:
    models = pytest.importorskip("qsae_lens.models")
    if not hasattr(models, "load_model"):
        pytest.skip("qsae_lens.models.load_model is not in this checkout yet")
    from qsae_lens.cli import main
    from qsae_lens.corpus import tokenize_corpus

    model = models.load_model(str(smollm2_path), precision="fp32")
    windows = tokenize_corpus(model.tokenizer, "stdlib", context_size=24, max_windows=3)
    hooks = ["blocks.0.hook_resid_post", "blocks.12.hook_resid_post"]
    out = cache_activations(model, windows, hooks, tmp_path / "smol", batch_size=3, progress=False)
    tokens = torch.tensor(windows["input_ids"])
    special = torch.isin(tokens, torch.tensor(special_token_ids(model.tokenizer)))
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=hooks)
    for h in hooks:
        torch.testing.assert_close(load_activations(out, h), cache[h][~special].float(), rtol=1e-4, atol=1e-4)
    info = read_cache_info(out)
    assert info.precision_metadata is not None and info.precision_metadata.get("precision") == "fp32"
    # the norm trap: BOS sits at position 0 with a huge norm and is excluded from the cache
    assert cache[hooks[1]][:, 0].norm(dim=-1).min() > 50 * load_activations(out, hooks[1]).norm(dim=-1).max()

    cli_out = tmp_path / "cli"
    assert main(["cache", "--model", str(smollm2_path), "--layers", "0,29", "--max-tokens", "32",
                 "--context-size", "16", "--aggregation", "last", "--out", str(cli_out), "--no-progress"]) == 0  # fmt: skip
    cli_info = read_cache_info(cli_out)
    assert cli_info.hook_names == ["blocks.0.hook_resid_post", "blocks.29.hook_resid_post"]
    assert cli_info.n_vectors == 2 and cli_info.d_in["blocks.29.hook_resid_post"] == 576


def test_cache_cli_arguments() -> None:
    from qsae_lens.cli import build_parser

    argv = ["cache", "--layers", "probe", "--precision", "nf4", "--aggregation", "mean"]
    args = build_parser(argv).parse_args(argv)
    assert (args.layers, args.precision, args.aggregation, args.hook, args.corpus) == ("probe", "nf4", "mean", "resid_post", "stdlib")
    # --layers is parsed by qsae_lens.layers (the sweep's rule) when the command runs, so a bad
    # value is one line and exit 2 there (tests/test_cli_errors.py), not an argparse exit
    from qsae_lens.activations import _check_cache_args
    from qsae_lens.layers import parse_layers_arg

    argv = ["cache", "--layers", "0,4, 8"]
    args = build_parser(argv).parse_args(argv)
    assert args.layers == "0,4, 8" and _check_cache_args(args)[0] == parse_layers_arg("0,4,8") == (0, 4, 8)
    from qsae_lens.activations import _resolve_layers

    assert _resolve_layers(parse_layers_arg("probe"), 30) == [0, 4, 8, 12, 16, 20, 24, 28, 29]
    assert _resolve_layers(parse_layers_arg("middle"), 30) == [16]
