"""qsae_lens.models: hook-by-hook equivalence with TransformerLens, real bitsandbytes kernels,
stop_at_layer, modifying hooks, SAELens's runner end to end, bad input, and other architectures.

Reference computations are independent of the wrapper: TransformerLens's own HookedTransformer
(built by TL's weight conversion), HF's ``output_hidden_states``, and ``F.cross_entropy``.
"""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from qsae_lens.models import load_dequantized_hooked_transformer, load_model

N_LAYERS = 30


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(scope="module")
def fp32(smollm2_path):
    return load_model(smollm2_path, "fp32", "cpu")


@pytest.fixture(scope="module")
def nf4(smollm2_path):
    return load_model(smollm2_path, "nf4", "cpu")


@pytest.fixture(scope="module")
def ht_fp32(fp32):
    """TransformerLens HookedTransformer from the same fp32 weights (TL's conversion, no processing)."""
    return load_dequantized_hooked_transformer(fp32)


@pytest.fixture(scope="module")
def tokens(fp32) -> torch.Tensor:
    """Two 24-token windows of real Python source (no special tokens). Tensor[2, 24]."""
    text = inspect.getsource(json.dumps) + inspect.getsource(shutil.copyfile)
    ids = fp32.to_tokens(text, prepend_bos=False)[0]
    return torch.stack([ids[:24], ids[100:124]])


@pytest.fixture(scope="module")
def fp32_cache(fp32, tokens):
    with torch.no_grad():
        return fp32.run_with_cache(tokens, return_type="loss")


# ----------------------------------------------------------------------------- fp32 equivalence
def test_fp32_every_hook_matches_hooked_transformer(fp32, ht_fp32, tokens, fp32_cache):
    loss, cache = fp32_cache
    with torch.no_grad():
        ht_loss, ht_cache = ht_fp32.run_with_cache(tokens, return_type="loss")
    for layer in range(N_LAYERS):
        name = f"blocks.{layer}.hook_resid_post"
        assert rel_err(cache[name], ht_cache[name]) < 1e-4, name
    for name in ["hook_embed", "blocks.0.hook_resid_pre", "blocks.7.hook_attn_out", "blocks.7.hook_mlp_out",
                 "ln_final.hook_normalized"]:
        assert rel_err(cache[name], ht_cache[name]) < 1e-4, name
    assert abs(loss.item() - ht_loss.item()) < 1e-4 * ht_loss.item()
    assert set(fp32.hook_names()) == {n for n in ht_cache.keys()} & set(fp32.hook_names())
    assert len(fp32.hook_names()) == 2 + 4 * N_LAYERS


def test_forward_return_types_follow_transformer_lens(fp32, tokens, fp32_cache):
    with torch.no_grad():
        logits, loss = fp32(tokens, return_type="both")
        per_token = fp32(tokens, return_type="loss", loss_per_token=True)
        assert fp32(tokens, return_type=None) is None
    # next-token cross entropy written independently
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    assert logits.shape == (2, 24, fp32.cfg.d_vocab)
    assert torch.allclose(loss, expected, rtol=1e-5)
    assert per_token.shape == (2, 23) and torch.allclose(per_token.mean(), expected, rtol=1e-5)
    assert torch.allclose(loss, fp32_cache[0], rtol=1e-6)
    # strings: default prepends BOS (TransformerLens's default_prepend_bos) ...
    with_bos = fp32.to_tokens("import os")
    assert with_bos[0, 0].item() == fp32.tokenizer.bos_token_id
    assert fp32.to_tokens("import os", prepend_bos=False)[0, 0].item() != fp32.tokenizer.bos_token_id
    assert fp32.to_string(with_bos[0, 1:]) == "import os"
    assert fp32.cfg.n_layers == N_LAYERS and fp32.cfg.d_model == 576 and fp32.cfg.d_vocab == 49152
    json.dumps(fp32.precision_metadata)  # plain JSON
    assert fp32.precision_metadata["weights_sha256"] == _sha256(Path(fp32.source_folder) / "model.safetensors")


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- hooks and stop_at_layer
def test_zero_ablation_changes_loss_like_transformer_lens(fp32, ht_fp32, tokens, fp32_cache):
    def zero(x, hook):
        return torch.zeros_like(x)

    hooks = [("blocks.5.hook_resid_post", zero)]
    with torch.no_grad():
        ours = fp32.run_with_hooks(tokens, return_type="loss", fwd_hooks=hooks)
        theirs = ht_fp32.run_with_hooks(tokens, return_type="loss", fwd_hooks=hooks)
    clean = fp32_cache[0]
    assert ours.item() > clean.item() + 1.0  # the ablation really happened
    assert abs(ours.item() - theirs.item()) < 1e-4 * theirs.item()
    # a steering-style modification of ln_final.hook_normalized (recomputed from the norm input) also
    # moves the logits identically
    steer = [("ln_final.hook_normalized", lambda x, hook: x * 0.5)]
    with torch.no_grad():
        a = fp32.run_with_hooks(tokens, fwd_hooks=steer)
        b = ht_fp32.run_with_hooks(tokens, fwd_hooks=steer)
    assert rel_err(a, b) < 1e-4


def test_stop_at_layer_really_stops(fp32, tokens, fp32_cache):
    layers = fp32.hf_model.model.layers
    calls = [0] * N_LAYERS
    handles = [layer.register_forward_hook(lambda m, i, o, k=k: calls.__setitem__(k, calls[k] + 1))
               for k, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            out, cache = fp32.run_with_cache(tokens, names_filter=["blocks.3.hook_resid_post"], stop_at_layer=4)
    finally:
        for h in handles:
            h.remove()
    assert calls == [1] * 4 + [0] * (N_LAYERS - 4)
    assert list(cache.keys()) == ["blocks.3.hook_resid_post"]
    full = fp32_cache[1]["blocks.3.hook_resid_post"]
    assert torch.equal(cache["blocks.3.hook_resid_post"], full)
    assert torch.equal(out, fp32_cache[1]["blocks.4.hook_resid_pre"])  # TL returns the residual entering block 4
    with torch.no_grad():
        assert torch.equal(fp32(tokens, stop_at_layer=-1), fp32_cache[1][f"blocks.{N_LAYERS - 1}.hook_resid_pre"])
        assert torch.equal(fp32(tokens, stop_at_layer=0), fp32_cache[1]["hook_embed"])


def test_unknown_hook_name_lists_valid_ones(fp32, tokens):
    with pytest.raises(KeyError, match=r"blocks\.\{L\}\.hook_resid_post"):
        fp32.run_with_hooks(tokens, fwd_hooks=[("blocks.3.hook_resid_mid", lambda x, hook: x)])
    with pytest.raises(KeyError, match="Valid hook names"):
        fp32.run_with_cache(tokens, names_filter=["blocks.99.hook_resid_post"])


# ----------------------------------------------------------------------------- bitsandbytes
def test_nf4_uses_bitsandbytes_kernels(nf4, tokens, fp32_cache):
    import bitsandbytes as bnb

    n4 = sum(isinstance(m, bnb.nn.Linear4bit) for m in nf4.hf_model.modules())
    assert n4 == 7 * N_LAYERS  # q, k, v, o, gate, up, down in every layer
    assert nf4.precision_metadata["quant_type"] == "nf4" and nf4.precision_metadata["bitsandbytes_version"]
    with torch.no_grad():
        loss, cache = nf4.run_with_cache(tokens, return_type="loss", names_filter=lambda n: "resid_post" in n)
    assert torch.isfinite(loss)
    errs = [rel_err(cache[f"blocks.{L}.hook_resid_post"], fp32_cache[1][f"blocks.{L}.hook_resid_post"])
            for L in range(N_LAYERS)]
    assert 0.005 < max(errs) < 0.5  # quantized for real, yet the same model


@pytest.mark.parametrize("precision, module_type", [("int8", "Linear8bitLt"), ("fp4", "Linear4bit")])
def test_int8_and_fp4_use_bitsandbytes_kernels(smollm2_path, tokens, fp32_cache, precision, module_type):
    import bitsandbytes as bnb

    # the first 4 layers of the real model keep this test inside the time budget
    model = load_model(smollm2_path, precision, "cpu", num_hidden_layers=4)
    kind = getattr(bnb.nn, module_type)
    assert sum(isinstance(m, kind) for m in model.hf_model.modules()) == 7 * 4
    with torch.no_grad():
        out, cache = model.run_with_cache(tokens, names_filter=lambda n: "resid_post" in n)
    assert torch.isfinite(out).all()
    err = rel_err(cache["blocks.3.hook_resid_post"], fp32_cache[1]["blocks.3.hook_resid_post"])
    assert 1e-4 < err < 0.5


def test_dequantized_hooked_transformer_matches_nf4_kernels(nf4, tokens, fp32_cache):
    """Tolerance: the 4-bit weights are identical (dequantized exactly), so only activation arithmetic
    differs. On CPUs with AVX512-BF16 bitsandbytes' fused inference kernel rounds activations and block
    scales to bfloat16 (unit roundoff 2^-9 = 0.2% per matmul); measured <= 0.8% per layer on SmolLM2.
    We allow 2% per layer and require the gap to be under 1/5 of nf4's own error against fp32."""
    from transformer_lens import HookedTransformer

    ht = load_dequantized_hooked_transformer(nf4)
    assert isinstance(ht, HookedTransformer)
    with torch.no_grad():
        k_loss, k_cache = nf4.run_with_cache(tokens, return_type="loss", names_filter=lambda n: "resid_post" in n)
        d_loss, d_cache = ht.run_with_cache(tokens, return_type="loss", names_filter=lambda n: "resid_post" in n)
    for layer in range(N_LAYERS):
        name = f"blocks.{layer}.hook_resid_post"
        gap = rel_err(k_cache[name], d_cache[name])
        assert gap < 2e-2, (name, gap)
        assert gap < rel_err(k_cache[name], fp32_cache[1][name]) / 5, name
    assert abs(k_loss.item() - d_loss.item()) < 2e-2 * k_loss.item()


# ----------------------------------------------------------------------------- SAELens end to end
def test_saelens_runner_trains_topk_sae_on_nf4(nf4, tmp_path):
    import datasets
    from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAEConfig

    context = 32
    sources = [inspect.getsource(m) for m in (json, shutil, inspect)]
    ids = nf4.to_tokens("\n".join(sources), prepend_bos=False, truncate=False)[0]
    windows = ids[: (len(ids) // context) * context].reshape(-1, context)[:64]
    dataset = datasets.Dataset.from_dict({"input_ids": windows.tolist()})

    cfg = LanguageModelSAERunnerConfig(
        sae=TopKTrainingSAEConfig(d_in=576, d_sae=256, k=8),
        model_name="smollm2-135m-nf4",
        hook_name="blocks.1.hook_resid_post",
        is_dataset_tokenized=True,
        context_size=context,
        prepend_bos=False,
        exclude_special_tokens=True,
        training_tokens=1024,
        train_batch_size_tokens=128,
        store_batch_size_prompts=4,
        n_batches_in_buffer=4,  # 4 * 32 = 128 >= train_batch_size_tokens
        n_eval_batches=1,
        eval_batch_size_prompts=2,
        device="cpu",
        dtype="float32",
        lr=1e-3,
        logger=LoggingConfig(log_to_wandb=False),
        checkpoint_path=str(tmp_path / "ckpt"),
        output_path=str(tmp_path / "out"),
        model_from_pretrained_kwargs={"precision": "nf4"},  # plain JSON: SAELens copies it into cfg.json
        verbose=False,
    )
    sae = LanguageModelSAETrainingRunner(cfg, override_dataset=dataset, override_model=nf4).run()
    assert sae.W_dec.shape == (256, 576) and torch.isfinite(sae.W_dec).all()
    saved = json.loads(next((tmp_path / "out").rglob("cfg.json")).read_text())
    assert saved["d_in"] == 576


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs_give_clear_errors(smollm2_path, tmp_path, monkeypatch):
    from qsae_lens.assets import default_model_gguf

    with pytest.raises(ValueError, match="Valid precisions: fp32, fp16, bf16, int8, nf4, nf4-dq, fp4"):
        load_model(smollm2_path, "int3")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "no_such_model", "fp32")
    with pytest.raises(RuntimeError, match="supports CPU and CUDA"):
        load_model(tmp_path / "never_read", "nf4", device="mps")  # refused before touching the path
    with pytest.raises(RuntimeError, match="layouts need CUDA"):
        load_model(tmp_path / "never_read", "torchao-int4wo", device="cpu")  # refused before touching the path
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            load_model(smollm2_path, "nf4", device="cuda")

    # a GGUF file cut short: clear error, and nothing written into the (fresh) cache's models folder
    real_gguf = default_model_gguf()  # resolved in the real cache before switching caches
    cache = tmp_path / "cache"
    monkeypatch.setenv("QSAE_LENS_CACHE", str(cache))
    truncated = tmp_path / "model.gguf"
    with open(real_gguf, "rb") as src:
        truncated.write_bytes(src.read(5_000_000))
    with pytest.raises(ValueError, match="truncated"):
        load_model(truncated, "nf4")
    assert not (cache / "models").exists() or not any((cache / "models").iterdir())

    # an architecture without an adapter: the error names the supported ones
    from transformers import AutoConfig

    folder = tmp_path / "tiny_opt"
    AutoConfig.for_model("opt", hidden_size=32, num_hidden_layers=1, ffn_dim=64, num_attention_heads=2,
                         vocab_size=128).save_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="gemma3_text, gpt2, llama, mistral, qwen2"):
        load_model(folder, "fp32")


# ----------------------------------------------------------------------------- other architectures
def _tiny(model_type: str, tokenizer_src: Path, folder: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    common = dict(vocab_size=49152, num_hidden_layers=3)
    extra = {
        "gpt2": dict(n_embd=64, n_head=4, n_positions=128, n_ctx=128,  # hub GPT-2 configs carry n_ctx; TL reads it
                     bos_token_id=1, eos_token_id=2),
        "qwen2": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128),
        "mistral": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=128, sliding_window=None),
        "gemma3_text": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=16, max_position_embeddings=128, sliding_window=8),
    }[model_type]
    config = AutoConfig.for_model(model_type, **common, **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer_src).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("model_type, tl_supports", [("gpt2", True), ("qwen2", True), ("mistral", True),
                                                     ("gemma3_text", False)])
def test_tiny_architectures_match_references(model_type, tl_supports, smollm2_path, tmp_path, tokens):
    folder = _tiny(model_type, smollm2_path, tmp_path / f"tiny_{model_type}")
    model = load_model(folder, "fp32", "cpu")
    n = model.cfg.n_layers
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
        hf = model.hf_model(tokens, output_hidden_states=True)
    # HF's own record: hidden_states[0] = resid_pre 0, hidden_states[L+1] = resid_post L (the last one
    # is recorded after the final norm), logits identical
    assert rel_err(cache["blocks.0.hook_resid_pre"], hf.hidden_states[0]) < 1e-6
    for layer in range(n - 1):
        assert rel_err(cache[f"blocks.{layer}.hook_resid_post"], hf.hidden_states[layer + 1]) < 1e-6
    assert rel_err(logits, hf.logits) < 1e-6
    # the residual decomposes as TransformerLens defines it
    for layer in range(n):
        resid = cache[f"blocks.{layer}.hook_resid_pre"] + cache[f"blocks.{layer}.hook_attn_out"] \
            + cache[f"blocks.{layer}.hook_mlp_out"]
        assert rel_err(resid, cache[f"blocks.{layer}.hook_resid_post"]) < 1e-5
    if tl_supports:
        ht = load_dequantized_hooked_transformer(model)
        with torch.no_grad():
            ht_logits, ht_cache = ht.run_with_cache(tokens)
        for name in model.hook_names():
            assert rel_err(cache[name], ht_cache[name]) < 1e-4, name
        assert rel_err(logits, ht_logits) < 1e-4
    # nf4 on the same tiny architecture: bitsandbytes modules in place, finite outputs
    if model_type in ("gpt2", "gemma3_text"):
        import bitsandbytes as bnb

        q = load_model(folder, "nf4", "cpu")
        assert any(isinstance(m, bnb.nn.Linear4bit) for m in q.hf_model.modules())
        with torch.no_grad():
            assert torch.isfinite(q(tokens)).all()


def test_int8_cast_log_filter_is_added_once():
    """Issue 8 item 4: every int8 load used to add one more filter to bitsandbytes' logger."""
    import logging

    from qsae_lens.models.loading import _DropInt8CastWarning, _install_int8_cast_filter

    for _ in range(3):
        _install_int8_cast_filter()
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    assert sum(isinstance(f, _DropInt8CastWarning) for f in logger.filters) == 1
