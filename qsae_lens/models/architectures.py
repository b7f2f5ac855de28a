"""Where each Hugging Face architecture family keeps the pieces TransformerLens names.

One :class:`ArchitectureAdapter` per family, and one table (:data:`ADAPTERS`, keyed by the HF
``config.model_type``) that names them. Adding a family is one entry: the dotted paths of its
embedding, decoder-layer list, final norm, and, inside a decoder layer, the module whose output
is what the block *adds* to the residual stream after attention and after the MLP.

Those last two differ by family, which is the only reason adapters exist:

* Llama / Qwen2 / Mistral / GPT-2 (pre-norm): the residual adds ``self_attn``'s (``attn``'s) output
  and ``mlp``'s output directly.
* Gemma 3 (sandwich norm): the residual adds ``post_attention_layernorm(attn)`` and
  ``post_feedforward_layernorm(mlp)``, so those norms' outputs are ``hook_attn_out`` /
  ``hook_mlp_out`` (as in TransformerLens's Gemma blocks, where ``hook_attn_out`` follows ``ln1_post``).
  Beware: Llama's module called ``post_attention_layernorm`` is its *pre*-MLP norm.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch


@dataclasses.dataclass(frozen=True)
class ArchitectureAdapter:
    """Dotted module paths inside a ``...ForCausalLM`` for one architecture family."""

    family: str
    base: str
    """The decoder stack without the LM head (called when no logits are needed)."""
    embed: str
    """Token embedding; its output is ``hook_embed``."""
    layers: str
    """The ``ModuleList`` of decoder layers; layer L's input is ``blocks.L.hook_resid_pre``."""
    final_norm: str
    """Final norm; its input, normalized before the gain, is ``ln_final.hook_normalized`` (as in TL)."""
    attn_out: str
    """Inside a layer: module whose output is added to the residual after attention."""
    mlp_out: str
    """Inside a layer: module whose output is added to the residual after the MLP."""
    normalization_type: str
    """TransformerLens ``cfg.normalization_type`` ("RMS" or "LN")."""
    gain: str = "w"
    """How the final norm applies its gain: "w" (x̂·w), "1+w" (Gemma: x̂·(1+w)) or "w+b" (LayerNorm)."""

    def normalize(self, norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The final norm's input scaled to unit RMS (centred first for LayerNorm), before the gain:
        what TransformerLens calls ``ln_final.hook_normalized``. ``Tensor[batch, pos, d_model]``."""
        eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-6)
        xf = x.float()
        if self.normalization_type == "LN":
            xf = xf - xf.mean(-1, keepdim=True)
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    def apply_gain(self, norm: torch.nn.Module, normalized: torch.Tensor) -> torch.Tensor:
        """The final norm's output from its normalized input (inverse view of :meth:`normalize`)."""
        w = norm.weight
        if self.gain == "1+w":
            return (normalized.float() * (1.0 + w.float())).to(normalized.dtype)
        if self.gain == "w+b":
            return normalized * w + norm.bias
        return w * normalized

    def d_mlp(self, config: Any) -> int:
        inner = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
        return int(inner or 4 * config.hidden_size)

    def act_fn(self, config: Any) -> str:
        return str(
            getattr(config, "hidden_activation", None)
            or getattr(config, "hidden_act", None)
            or getattr(config, "activation_function", "gelu_new")
        )


LLAMA = ArchitectureAdapter(
    family="llama",
    base="model",
    embed="model.embed_tokens",
    layers="model.layers",
    final_norm="model.norm",
    attn_out="self_attn",
    mlp_out="mlp",
    normalization_type="RMS",
)
# Gemma 3 is Llama's layout with sandwich norms: only the residual-adding modules and the gain differ.
GEMMA3 = dataclasses.replace(
    LLAMA,
    family="gemma3",
    attn_out="post_attention_layernorm",
    mlp_out="post_feedforward_layernorm",
    gain="1+w",
)
GPT2 = ArchitectureAdapter(
    family="gpt2",
    base="transformer",
    embed="transformer.wte",
    layers="transformer.h",
    final_norm="transformer.ln_f",
    attn_out="attn",
    mlp_out="mlp",
    normalization_type="LN",
    gain="w+b",
)

ADAPTERS: dict[str, ArchitectureAdapter] = {
    "llama": LLAMA,  # Llama 2/3, SmolLM2
    "qwen2": LLAMA,
    "mistral": LLAMA,
    "gemma3_text": GEMMA3,  # Gemma 3 text-only (270M, 1B); multimodal gemma3 is not covered
    "gpt2": GPT2,
}


def supported_model_types() -> list[str]:
    """HF ``model_type`` values :func:`qsae_lens.models.load_model` can wrap."""
    return sorted(ADAPTERS)


def adapter_for(model_type: str) -> ArchitectureAdapter:
    """The adapter for ``model_type``; a ``ValueError`` naming the supported ones otherwise."""
    try:
        return ADAPTERS[model_type]
    except KeyError:
        raise ValueError(
            f"Unsupported architecture model_type={model_type!r}. qsae_lens wraps: "
            f"{', '.join(supported_model_types())}. Add an ArchitectureAdapter entry to "
            "qsae_lens.models.architectures.ADAPTERS for another family."
        ) from None


def get_submodule(root: torch.nn.Module, path: str) -> torch.nn.Module:
    """``root.get_submodule(path)`` with an error that says which adapter path was wrong."""
    try:
        return root.get_submodule(path)
    except AttributeError as err:
        raise ValueError(
            f"Module path {path!r} not found in {type(root).__name__}; the architecture adapter "
            "does not match this model."
        ) from err
