"""Models at any precision behind TransformerLens hook names.

* :func:`load_model` -> :class:`HookedQuantizedLM`: the Hugging Face model running its own forward
  (real bitsandbytes kernels for int8/nf4/nf4-dq/fp4) with ``hook_embed``, ``blocks.{L}.hook_resid_pre``,
  ``blocks.{L}.hook_attn_out``, ``blocks.{L}.hook_mlp_out``, ``blocks.{L}.hook_resid_post`` and
  ``ln_final.hook_normalized``; what SAELens's runner, ActivationsStore and run_evals drive.
* :func:`load_dequantized_hooked_transformer`: a genuine TransformerLens ``HookedTransformer`` on the
  dequantized quantized weights.
* :data:`ADAPTERS`: one small adapter per HF architecture family (Llama/Qwen2/Mistral, Gemma 3, GPT-2).

See docs/models.md for why the adapter is built on PyTorch forward hooks (measured against
TransformerLens's TransformerBridge and SAELens's HookedProxyLM).
"""

from qsae_lens.models.architectures import ADAPTERS, ArchitectureAdapter, supported_model_types
from qsae_lens.models.dequantized import (
    dequantize_linear_weight,
    dequantized_float_model,
    load_dequantized_hooked_transformer,
)
from qsae_lens.models.hooked import HookedQuantizedLM
from qsae_lens.models.loading import check_gguf, load_model, weights_sha256

__all__ = [
    "ADAPTERS",
    "ArchitectureAdapter",
    "HookedQuantizedLM",
    "check_gguf",
    "dequantize_linear_weight",
    "dequantized_float_model",
    "load_dequantized_hooked_transformer",
    "load_model",
    "supported_model_types",
    "weights_sha256",
]
