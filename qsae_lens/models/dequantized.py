"""A genuine TransformerLens ``HookedTransformer`` holding bitsandbytes-quantized weights, dequantized.

For users who want all of TransformerLens (attention patterns, ``hook_q``/``hook_z``, logit lens,
weight processing) on the *quantized* weights. Built through TransformerLens's manual route,
because ``HookedTransformer.from_pretrained`` accepts only names on its official list and refuses
packed 4-bit weights: ``get_pretrained_model_config`` (from the HF folder's config) ->
``get_pretrained_state_dict(hf_model=<float copy with dequantized weights>)`` ->
``load_and_process_state_dict`` with no weight processing.

How it differs from running the bitsandbytes kernels (:class:`HookedQuantizedLM`):

* nf4 / nf4-dq / fp4: bitsandbytes' 4-bit layers dequantize W block-wise to the compute dtype and
  compute ``x @ W.T``; activations are not quantized. ``dequantize_4bit`` gives the *same* weight
  values exactly, so the two differ only by float summation order (and TL's attention code vs HF's).
* int8 (LLM.int8): the kernel also quantizes the *activations* row-wise to int8 (columns with
  outliers above the 6.0 threshold stay in fp16) and casts inputs to fp16. Dequantizing only the
  weights (``CB * SCB / 127``) drops that activation quantization, so the dequantized model is
  closer to fp32 than the real int8 kernels are. Use the kernel wrapper to measure int8's effect.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
from torch import nn

from qsae_lens.precision import Precision, parse_precision


def dequantize_linear_weight(module: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """The float weight ``Tensor[out, in]`` a bitsandbytes linear layer represents, or None for other modules."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    if isinstance(module, bnb.nn.Linear4bit):
        w = module.weight
        state = w.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            return _dequantize_cpu_packed_4bit(w.data, state).to(dtype)
        return bnbf.dequantize_4bit(w.data, state).to(dtype)
    if isinstance(module, bnb.nn.Linear8bitLt):
        w = module.weight
        scb = getattr(w, "SCB", None)
        if scb is None:  # not yet quantized (still float)
            return w.data.to(dtype)
        return bnbf.int8_vectorwise_dequant(w.data, scb).to(dtype)
    return None


def _dequantize_cpu_packed_4bit(packed: torch.Tensor, state: Any) -> torch.Tensor:
    """Dequantize a Linear4bit weight after bitsandbytes' CPU fast path repacked it.

    On CPUs with AVX512-BF16, the first no-grad eval forward of a ``Linear4bit`` permanently repacks
    its codes into an ``[N, K/2]`` tile layout and stores the block scales (absmax) transposed as
    ``Tensor[K/blocksize, N]`` in **bfloat16**; the fused kernel then multiplies bf16 activations.
    ``dequantize_4bit`` does not understand that layout, and bitsandbytes' own inverse restores the
    codes but not the absmax order for non-nested states, so we undo both by hand. The result is
    exactly the weights the fused kernel uses (codes x bf16-rounded absmax).
    """
    import bitsandbytes.functional as bnbf

    # bitsandbytes' inverse unpacks the codes; it mutates the state it is given, so hand it a copy.
    codes, _ = bnbf._convert_weight_packed_for_cpu_inverse(packed, copy.copy(state))
    absmax = state.absmax.T.reshape(-1).float()  # [K/bs, N] -> original block order [N*K/bs]
    plain = bnbf.QuantState(
        absmax=absmax,
        shape=state.shape,
        code=state.code,
        blocksize=state.blocksize,
        quant_type=state.quant_type,
        dtype=torch.float32,
    )
    return bnbf.dequantize_4bit(codes, plain)


def dequantized_float_model(hf_model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A plain float copy of a (bitsandbytes-)quantized HF model: same architecture, ``nn.Linear`` layers
    holding the dequantized weights, every other parameter copied."""
    from transformers import AutoModelForCausalLM

    state: dict[str, torch.Tensor] = {}
    for name, module in hf_model.named_modules():
        weight = dequantize_linear_weight(module, dtype)
        prefix = f"{name}." if name else ""
        if weight is not None:
            state[prefix + "weight"] = weight
            if getattr(module, "bias", None) is not None:
                state[prefix + "bias"] = module.bias.detach().to(dtype)
            continue
        for pname, param in module.named_parameters(recurse=False):
            if prefix + pname not in state:
                state[prefix + pname] = param.detach().to(dtype)
    config = hf_model.config
    config = type(config).from_dict(config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    from transformers.initialization import no_init_weights

    with no_init_weights():  # every parameter is overwritten below: skip the random init
        float_model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = float_model.load_state_dict(state, strict=False)
    if unexpected:
        raise RuntimeError(f"Dequantized state dict has keys the float model lacks: {unexpected[:5]}")
    tied = set(getattr(float_model, "_tied_weights_keys", None) or [])
    untied_missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
    if untied_missing:
        raise RuntimeError(f"Parameters not filled from the quantized model: {untied_missing[:5]}")
    float_model.tie_weights()
    return float_model.eval()


def load_dequantized_hooked_transformer(
    name_or_path: Any,
    precision: str | Precision = "nf4",
    device: str | torch.device | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    compute_dtype: torch.dtype | None = None,
    **hf_kwargs: Any,
) -> Any:
    """A ``transformer_lens.HookedTransformer`` whose weights are the bitsandbytes weights at ``precision``, dequantized.

    ``name_or_path``: anything :func:`qsae_lens.models.load_model` accepts, or an already loaded
    :class:`HookedQuantizedLM` (its bitsandbytes weights are reused, nothing is reloaded).
    No weight processing (no LayerNorm folding or centering), so hooks read the same coordinates as
    the HF model. The model's ``precision_metadata`` attribute records where the weights came from.
    The architecture must be one TransformerLens converts from an HF config (Llama, Qwen2, Mistral, GPT-2, ...).
    """
    import transformer_lens.loading_from_pretrained as tl_loading
    from transformer_lens import HookedTransformer

    from qsae_lens.models.hooked import HookedQuantizedLM
    from qsae_lens.models.loading import load_model

    if isinstance(name_or_path, HookedQuantizedLM):
        wrapper = name_or_path
    else:
        wrapper = load_model(name_or_path, precision, device, compute_dtype=compute_dtype, **hf_kwargs)
    prec = wrapper.precision if isinstance(name_or_path, HookedQuantizedLM) else parse_precision(precision)
    folder = wrapper.source_folder
    if folder is None or not os.path.isdir(folder):
        raise ValueError("The model has no local Hugging Face folder to read its TransformerLens config from.")
    dev = str(device) if device is not None else str(wrapper.cfg.device)
    try:
        cfg = tl_loading.get_pretrained_model_config(folder, fold_ln=False, device=dev, dtype=dtype)
    except Exception as err:
        raise ValueError(
            f"TransformerLens cannot build a HookedTransformer config for {wrapper.cfg.original_architecture} "
            f"from {folder} ({type(err).__name__}: {err}). Use load_model(...) (HookedQuantizedLM) instead."
        ) from err
    cfg.default_prepend_bos = wrapper.cfg.default_prepend_bos
    cfg.tokenizer_prepends_bos = wrapper.cfg.tokenizer_prepends_bos
    float_model = dequantized_float_model(wrapper.hf_model, dtype)
    state_dict = tl_loading.get_pretrained_state_dict(folder, cfg, hf_model=float_model, dtype=dtype)
    model = HookedTransformer(cfg, wrapper.tokenizer, move_to_device=False)
    model.load_and_process_state_dict(
        state_dict,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    model.move_model_modules_to_device()
    meta = dict(wrapper.precision_metadata)
    meta["route"] = f"dequantized {prec.name} weights in {dtype} (HookedTransformer)"
    model.precision_metadata = meta
    return model.eval()
