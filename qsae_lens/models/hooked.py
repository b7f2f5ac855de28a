"""HookedQuantizedLM: TransformerLens hook names on an unmodified Hugging Face model (any precision).

Why this design (measured on SmolLM2-135M nf4, CPU, 2 cores; docs/models.md has the numbers and
``benchmarks/models_overhead.py`` regenerates them):

* TransformerLens 3.9 ``TransformerBridge.boot_transformers(..., hf_model=<bnb model>)`` +
  ``enable_compatibility_mode(no_processing=True)`` works on bitsandbytes models (stop_at_layer
  stops, hooks modify), but it forces eager attention and wraps every submodule (~1,700 hook
  points on SmolLM2), measured ~2x slower per forward than the raw HF model here.
* SAELens's ``HookedProxyLM`` hooks HF module names (``model.layers.3``), not TransformerLens
  names; its ``forward`` has no ``return_type="loss"``, its ``to_tokens`` only supports
  ``prepend_bos=False``, and stop_at_layer only works together with ``names_filter``.
* So: a thin :class:`~transformer_lens.hook_points.HookedRootModule` whose ``HookPoint``s are fed by
  PyTorch forward (pre-)hooks on the HF modules the adapter table names. The HF model runs its own
  forward (sdpa attention, real bitsandbytes kernels); hooks can replace activations because a
  forward hook's return value replaces the module output. Everything TransformerLens already does
  (hook bookkeeping, ``run_with_cache``, ``run_with_hooks``, ``ActivationCache``, the LM loss,
  BOS handling) is inherited or called, not rewritten. Written by hand: the ~30 lines that route HF
  module outputs through HookPoints and ``stop_at_layer`` (an exception raised before layer
  ``stop_at_layer`` runs), because neither route above gives both TL names and HF-speed forwards.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from transformer_lens.config import HookedTransformerConfig
from transformer_lens.hook_points import HookedRootModule, HookPoint
from transformer_lens.utilities import USE_DEFAULT_VALUE
from transformer_lens.utilities.lm_utils import lm_cross_entropy_loss
from transformer_lens.utilities.tokenize_utils import (
    get_attention_mask,
    get_input_with_manually_prepended_bos,
    get_tokens_with_bos_removed,
)

from qsae_lens.models.architectures import ArchitectureAdapter, get_submodule
from qsae_lens.precision import Precision

ReturnType = Literal["logits", "loss", "both"] | None


class _StopForward(Exception):
    """Raised by the stop hook to abandon the HF forward once ``stop_at_layer`` is reached."""

    def __init__(self, residual: Tensor) -> None:
        super().__init__()
        self.residual = residual


class _BlockHooks(nn.Module):
    """Holds one decoder layer's hook points so they are named ``blocks.{L}.hook_*``."""

    def __init__(self) -> None:
        super().__init__()
        self.hook_resid_pre = HookPoint()
        self.hook_attn_out = HookPoint()
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()


class _LnFinalHooks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hook_normalized = HookPoint()


def _replace_first(output: Any, hook_point: HookPoint) -> Any:
    """Route a module output through ``hook_point``; attention modules return ``(out, weights)``."""
    if isinstance(output, Tensor):
        return hook_point(output)
    if isinstance(output, tuple) and output and isinstance(output[0], Tensor):
        return (hook_point(output[0]), *output[1:])
    raise TypeError(f"Cannot hook a module output of type {type(output).__name__}")


def _output_hook(hook_point: HookPoint) -> Callable[..., Any]:
    def hook(module: nn.Module, args: Any, output: Any) -> Any:  # noqa: ARG001
        return _replace_first(output, hook_point)

    return hook


def _input_hook(hook_point: HookPoint) -> Callable[..., Any]:
    """Pre-hook feeding a layer's ``hidden_states`` input (positional or keyword) through ``hook_point``."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:  # noqa: ARG001
        if args:
            return (hook_point(args[0]), *args[1:]), kwargs
        kwargs["hidden_states"] = hook_point(kwargs["hidden_states"])
        return args, kwargs

    return hook


def _stop_hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:  # noqa: ARG001
    raise _StopForward(args[0] if args else kwargs["hidden_states"])


class HookedQuantizedLM(HookedRootModule):
    """A Hugging Face causal LM (float or bitsandbytes-quantized) with TransformerLens hook names.

    Hook points: ``hook_embed``, ``blocks.{L}.hook_resid_pre``, ``blocks.{L}.hook_attn_out``,
    ``blocks.{L}.hook_mlp_out``, ``blocks.{L}.hook_resid_post``, ``ln_final.hook_normalized``
    (all ``Tensor[batch, pos, d_model]``). Drop-in for SAELens's ``ActivationsStore``,
    ``LanguageModelSAETrainingRunner(override_model=...)`` and ``run_evals``.
    Build one with :func:`qsae_lens.models.load_model`.
    """

    def __init__(
        self,
        hf_model: nn.Module,
        tokenizer: Any,
        adapter: ArchitectureAdapter,
        *,
        precision: Precision,
        precision_metadata: dict[str, Any],
        model_name: str,
        source_folder: str | Path | None = None,
    ) -> None:
        super().__init__()
        self.model = hf_model  # named `model` because SAELens looks up `model.model.get_input_embeddings()`
        self.tokenizer = tokenizer
        self.adapter = adapter
        self.precision = precision
        self.precision_metadata = precision_metadata
        self.source_folder = None if source_folder is None else str(source_folder)
        if tokenizer.pad_token is None:  # as TransformerLens does for GPT-2-style tokenizers
            tokenizer.pad_token = tokenizer.eos_token

        self._layers: nn.ModuleList = get_submodule(hf_model, adapter.layers)  # type: ignore[assignment]
        self._final_norm = get_submodule(hf_model, adapter.final_norm)
        self._base = get_submodule(hf_model, adapter.base)
        self.cfg = self._make_cfg(hf_model.config, model_name)

        self.hook_embed = HookPoint()
        self.blocks = nn.ModuleList(_BlockHooks() for _ in range(len(self._layers)))
        self.ln_final = _LnFinalHooks()
        self._hf_handles = self._attach_hf_hooks()
        self.setup()

    # ------------------------------------------------------------------ construction
    def _make_cfg(self, config: Any, model_name: str) -> HookedTransformerConfig:
        """A genuine TransformerLens config, so code reading ``model.cfg.*`` finds TL's fields."""
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        device = next(self.model.parameters()).device
        bos_id = self.tokenizer.bos_token_id
        probe = self.tokenizer("a")["input_ids"]
        prepends_bos = bool(bos_id is not None and probe and probe[0] == bos_id)
        n_ctx = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 2048)
        return HookedTransformerConfig(
            n_layers=len(self._layers),
            d_model=config.hidden_size,
            n_ctx=int(n_ctx),
            d_head=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
            n_heads=config.num_attention_heads,
            d_mlp=self.adapter.d_mlp(config),
            d_vocab=config.vocab_size,
            act_fn=self.adapter.act_fn(config),
            normalization_type=self.adapter.normalization_type,
            model_name=model_name,
            original_architecture=(getattr(config, "architectures", None) or [type(self.model).__name__])[0],
            device=device,
            dtype=self.precision.compute_dtype(device, _dtype_or_none(self.precision_metadata)),
            default_prepend_bos=bos_id is not None,
            tokenizer_prepends_bos=prepends_bos,
            init_weights=False,
        )

    def _attach_hf_hooks(self) -> list[Any]:
        ad, handles = self.adapter, []
        embed = get_submodule(self.model, ad.embed)
        handles.append(embed.register_forward_hook(_output_hook(self.hook_embed)))
        for layer, hooks in zip(self._layers, self.blocks):
            handles.append(layer.register_forward_pre_hook(_input_hook(hooks.hook_resid_pre), with_kwargs=True))
            handles.append(get_submodule(layer, ad.attn_out).register_forward_hook(_output_hook(hooks.hook_attn_out)))
            handles.append(get_submodule(layer, ad.mlp_out).register_forward_hook(_output_hook(hooks.hook_mlp_out)))
            handles.append(layer.register_forward_hook(_output_hook(hooks.hook_resid_post)))
        handles.append(self._final_norm.register_forward_hook(self._final_norm_hook))
        return handles

    def _final_norm_hook(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        """TransformerLens's ``ln_final.hook_normalized`` is the norm's input normalized *before* the gain,
        which no HF module outputs: recompute it from the input only when a hook is attached (cheap:
        one norm), then re-apply the gain so a modifying hook changes the logits."""
        hook_point = self.ln_final.hook_normalized
        if not hook_point._forward_hooks:
            return output
        normalized = self.adapter.normalize(module, args[0])
        return self.adapter.apply_gain(module, hook_point(normalized)).to(output.dtype)

    def setup(self) -> None:
        """Index only our HookPoints (TL's version would also stamp ``.name`` onto every HF module)."""
        self.hook_dict = {name: m for name, m in self.named_modules() if isinstance(m, HookPoint)}
        for name, hp in self.hook_dict.items():
            hp.name = name
        self.mod_dict = dict(self.hook_dict)

    # ------------------------------------------------------------------ hook names
    def hook_names(self) -> list[str]:
        """All hook point names, in forward order of first use per layer."""
        return list(self.hook_dict)

    def _check_hook_name(self, name: str) -> None:
        if name not in self.hook_dict:
            valid = ", ".join(
                ["hook_embed", "blocks.{L}.hook_resid_pre", "blocks.{L}.hook_attn_out",
                 "blocks.{L}.hook_mlp_out", "blocks.{L}.hook_resid_post", "ln_final.hook_normalized"]
            )
            raise KeyError(
                f"Unknown hook name {name!r}. Valid hook names: {valid} with L in 0..{self.cfg.n_layers - 1} "
                "(see model.hook_names())."
            )

    def add_hook(self, name: Any, hook: Any, dir: Literal["fwd", "bwd"] = "fwd", **kwargs: Any) -> None:  # type: ignore[override]
        if isinstance(name, str):
            self._check_hook_name(name)
        super().add_hook(name, hook, dir=dir, **kwargs)

    def _enable_hook_with_name(self, name: str, hook: Callable, dir: Literal["fwd", "bwd"]) -> None:
        self._check_hook_name(name)  # run_with_hooks / hooks() land here
        super()._enable_hook_with_name(name, hook, dir)

    def run_with_cache(self, *model_args: Any, names_filter: Any = None, **kwargs: Any) -> Any:  # type: ignore[override]
        """TransformerLens ``run_with_cache``; a names_filter naming a missing hook is an error, not an empty cache."""
        names = [names_filter] if isinstance(names_filter, str) else names_filter
        if isinstance(names, Sequence):
            for name in names:
                self._check_hook_name(name)
        return super().run_with_cache(*model_args, names_filter=names_filter, **kwargs)

    # ------------------------------------------------------------------ properties
    @property
    def W_E(self) -> Tensor:
        """Token embedding matrix, ``Tensor[d_vocab, d_model]`` (never quantized by bitsandbytes)."""
        return get_submodule(self.model, self.adapter.embed).weight  # type: ignore[return-value]

    @property
    def W_U(self) -> Tensor:
        """Unembedding, ``Tensor[d_model, d_vocab]``: the HF LM head's weight transposed, as in
        HookedTransformer (``logits = ln_final(resid) @ W_U + b_U``). A quantized head (bitsandbytes
        ``Params4bit`` / ``Int8Params``) is dequantized to the compute dtype; tied heads share ``W_E``'s storage."""
        head = self.model.get_output_embeddings()
        weight = head.weight
        if type(weight).__name__ in ("Params4bit", "Int8Params") or weight.dtype in (torch.uint8, torch.int8):
            import bitsandbytes.functional as bnbf  # only for a quantized head

            state = getattr(weight, "quant_state", None)
            if state is not None:
                weight = bnbf.dequantize_4bit(weight.data, state)
            else:  # LLM.int8: int8 rows with per-row absmax scale
                weight = weight.data.float() * (head.state.SCB.float()[:, None] / 127.0)  # type: ignore[union-attr]
            weight = weight.to(self.cfg.dtype)
        return weight.T

    @property
    def b_U(self) -> Tensor:
        """Unembedding bias, ``Tensor[d_vocab]`` (zeros when the LM head has no bias, as for Llama)."""
        head = self.model.get_output_embeddings()
        if getattr(head, "bias", None) is not None:
            return head.bias
        return torch.zeros(self.cfg.d_vocab, dtype=self.cfg.dtype, device=self.W_E.device)

    @property
    def hf_model(self) -> nn.Module:
        """The wrapped Hugging Face model (its bitsandbytes modules, if quantized, are intact)."""
        return self.model

    # ------------------------------------------------------------------ tokenization
    def to_tokens(
        self,
        input: str | list[str],
        prepend_bos: bool | None = USE_DEFAULT_VALUE,
        padding_side: Literal["left", "right"] | None = USE_DEFAULT_VALUE,
        move_to_device: bool = True,
        truncate: bool = True,
    ) -> Tensor:
        """Text -> ``Tensor[batch, pos]`` of token ids, with TransformerLens's BOS semantics."""
        if prepend_bos is None:  # USE_DEFAULT_VALUE is None
            prepend_bos = self.cfg.default_prepend_bos
        if padding_side is None:
            padding_side = self.tokenizer.padding_side
        if prepend_bos and not self.cfg.tokenizer_prepends_bos:
            input = get_input_with_manually_prepended_bos(self.tokenizer.bos_token, input)
        tokens = self.tokenizer(
            input,
            return_tensors="pt",
            padding=True,
            truncation=truncate,
            max_length=self.cfg.n_ctx if truncate else None,
            padding_side=padding_side,
        )["input_ids"]
        if not prepend_bos and self.cfg.tokenizer_prepends_bos:
            tokens = get_tokens_with_bos_removed(self.tokenizer, tokens)
        return tokens.to(self.cfg.device) if move_to_device else tokens

    def to_string(self, tokens: Tensor | Sequence[int] | Sequence[Sequence[int]]) -> str | list[str]:
        """Token ids -> text (a list for a batch)."""
        if isinstance(tokens, Tensor):
            tokens = tokens.tolist()
        if tokens and isinstance(tokens[0], list | tuple):
            return self.tokenizer.batch_decode(tokens, clean_up_tokenization_spaces=False)
        return self.tokenizer.decode(tokens, clean_up_tokenization_spaces=False)

    def to_str_tokens(self, input: str | Tensor, prepend_bos: bool | None = USE_DEFAULT_VALUE) -> list[str]:
        tokens = self.to_tokens(input, prepend_bos=prepend_bos)[0] if isinstance(input, str) else input
        return [self.tokenizer.decode([t]) for t in tokens.reshape(-1).tolist()]

    # ------------------------------------------------------------------ forward
    def forward(  # type: ignore[override]
        self,
        input: str | list[str] | Tensor,
        return_type: ReturnType = "logits",
        loss_per_token: bool = False,
        prepend_bos: bool | None = USE_DEFAULT_VALUE,
        padding_side: Literal["left", "right"] | None = USE_DEFAULT_VALUE,
        start_at_layer: int | None = None,
        tokens: Tensor | None = None,
        attention_mask: Tensor | None = None,
        stop_at_layer: int | None = None,
        **kwargs: Any,
    ) -> Any:
        """TransformerLens ``HookedTransformer.forward`` semantics over the HF forward.

        ``input``: text or ``Tensor[batch, pos]`` ids. ``return_type``: "logits" ->
        ``Tensor[batch, pos, d_vocab]``; "loss" -> mean next-token CE (``Tensor[batch, pos-1]`` with
        ``loss_per_token``); "both" -> ``(logits, loss)``; None -> nothing (logits not computed).
        ``stop_at_layer=k`` runs blocks ``0..k-1`` only and returns the residual stream entering block
        ``k``, ``Tensor[batch, pos, d_model]`` (negative ``k`` counts from the end, as in TL).
        """
        if start_at_layer is not None or tokens is not None:
            raise NotImplementedError("start_at_layer / tokens= are not supported: the HF forward starts at the embedding.")
        for key in ("shortformer_pos_embed", "past_kv_cache"):
            if kwargs.pop(key, None) is not None:
                raise NotImplementedError(f"{key} is not supported by HookedQuantizedLM.")
        if kwargs:
            raise TypeError(f"Unexpected forward() arguments: {sorted(kwargs)}")
        if return_type not in ("logits", "loss", "both", None):
            raise ValueError(f"return_type must be 'logits', 'loss', 'both' or None, got {return_type!r}")
        if isinstance(input, str | list):
            tokens_ = self.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side)
            if attention_mask is None and self.tokenizer.pad_token_id is not None:
                pb = self.cfg.default_prepend_bos if prepend_bos is None else prepend_bos
                attention_mask = get_attention_mask(self.tokenizer, tokens_, pb)
        else:
            tokens_ = input
        device = self.W_E.device
        tokens_ = tokens_.to(device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(device)

        if stop_at_layer is not None:
            return self._forward_until(tokens_, attention_mask, stop_at_layer)

        if return_type is None:
            self._base(input_ids=tokens_, attention_mask=attention_mask, use_cache=False)
            return None
        logits = self.model(input_ids=tokens_, attention_mask=attention_mask, use_cache=False).logits
        if return_type == "logits":
            return logits
        loss = lm_cross_entropy_loss(logits.float(), tokens_, attention_mask, per_token=loss_per_token)
        return loss if return_type == "loss" else (logits, loss)

    def _forward_until(self, tokens: Tensor, attention_mask: Tensor | None, stop_at_layer: int) -> Tensor:
        n = self.cfg.n_layers
        k = n + stop_at_layer if stop_at_layer < 0 else stop_at_layer
        if not 0 <= k <= n:
            raise ValueError(f"stop_at_layer={stop_at_layer} is out of range for a {n}-layer model.")
        # Registered after the resid_pre hook, so it runs after it and sees the (possibly modified) input;
        # block k (or the final norm) never executes.
        target = self._layers[k] if k < n else self._final_norm
        handle = target.register_forward_pre_hook(_stop_hook, with_kwargs=True)
        try:
            self._base(input_ids=tokens, attention_mask=attention_mask, use_cache=False)
        except _StopForward as stop:
            return stop.residual
        finally:
            handle.remove()
        raise RuntimeError("stop_at_layer hook never fired: the adapter's layer path does not match the model.")

    # ------------------------------------------------------------------ generation
    generation_offset: int = 0
    """During :meth:`generate`: the absolute position (in the left-padded sequence) of the first
    position of the activations hooks currently see (0 for the prompt pass, then the prefix length).
    Interventions with ``positions="prompt"|"generated"|slice`` read it; 0 outside generation."""
    generation_prompt_len: int | None = None
    """During :meth:`generate`: the padded prompt length (positions ``>=`` it are generated); None outside."""

    @torch.no_grad()
    def generate(
        self,
        input: str | list[str] | Tensor = "",
        max_new_tokens: int = 10,
        stop_at_eos: bool = True,
        eos_token_id: int | None = None,
        do_sample: bool = True,
        top_k: int | None = None,
        top_p: float | None = None,
        temperature: float = 1.0,
        use_past_kv_cache: bool = True,
        prepend_bos: bool | None = USE_DEFAULT_VALUE,
        return_type: Literal["input", "str", "tokens"] = "input",
        seed: int | None = None,
        verbose: bool = False,
    ) -> str | list[str] | Tensor:
        """Sample ``max_new_tokens`` tokens, TransformerLens ``HookedTransformer.generate``'s signature.

        Why here and not HF ``generate``: every active hook (``run_with_hooks``, ``hooks()``, the
        interventions in :mod:`qsae_lens.interventions`) must apply to the prompt pass (whose keys
        and values are then cached) and to every new token, with :attr:`generation_offset` telling
        position-selective hooks where they are. The loop is the HF model's own forward with its KV
        cache (``past_key_values``), so per-step cost equals HF ``generate``'s (benchmarks/generate_bench.py).

        ``input``: text, a batch of texts (left-padded) or ``Tensor[batch, pos]`` ids (taken as is,
        no padding). Greedy when ``do_sample=False`` or ``temperature == 0``; else softmax sampling at
        ``temperature`` after optional ``top_k`` / ``top_p`` (nucleus) filtering, from a
        ``torch.Generator`` seeded by ``seed``. A sequence that emits EOS (``stop_at_eos``) is
        continued with EOS; the loop ends when all have. Returns the prompt plus the new tokens:
        ``Tensor[batch, pos + new]`` for "tokens" (or token input with "input"), else the decoded
        text(s) without padding. Greedy output with no hooks equals HF ``generate(do_sample=False)``
        token for token (tests/test_generate.py checks fp32 and nf4).
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0; got {max_new_tokens}.")
        if return_type not in ("input", "str", "tokens"):
            raise ValueError(f"return_type must be 'input', 'str' or 'tokens'; got {return_type!r}.")
        device = self.W_E.device
        tokens, mask = self._prompt_tokens(input, prepend_bos)
        eos = self.tokenizer.eos_token_id if eos_token_id is None else eos_token_id
        greedy = not do_sample or temperature == 0.0
        gen = torch.Generator(device=device)
        if seed is not None:
            gen.manual_seed(seed)
        elif not greedy:
            gen.seed()
        batch, prompt_len = tokens.shape
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        past = None
        step_input, step_offset = tokens, 0
        self.generation_prompt_len = prompt_len
        try:
            for _ in _progress(range(max_new_tokens), verbose):
                # Positions from the mask, as HF generate computes them, so left padding does not shift RoPE.
                positions = (mask.cumsum(-1) - 1).clamp_min(0)
                self.generation_offset = step_offset
                out = self.model(
                    input_ids=step_input,
                    attention_mask=mask,
                    position_ids=positions[:, step_offset:],
                    cache=past,
                    use_cache=use_past_kv_cache,
                    logits_to_keep=1,
                )
                logits = out.logits[:, -1, :].float()
                new = _next_token(logits, greedy, temperature, top_k, top_p, gen)
                if stop_at_eos and eos is not None:
                    new = torch.where(finished, torch.full_like(new, eos), new)
                    finished |= new == eos
                tokens = torch.cat([tokens, new[:, None]], dim=1)
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                if use_past_kv_cache:
                    past = out.past_key_values
                    step_input, step_offset = new[:, None], tokens.shape[1] - 1
                else:
                    step_input = tokens
                if stop_at_eos and bool(finished.all()):
                    break
        finally:
            self.generation_offset, self.generation_prompt_len = 0, None
        if return_type == "tokens" or (return_type == "input" and isinstance(input, Tensor)):
            return tokens
        texts = [self.tokenizer.decode(row[m.bool()].tolist(), clean_up_tokenization_spaces=False)
                 for row, m in zip(tokens, mask)]
        return texts[0] if isinstance(input, str) else texts

    def _prompt_tokens(self, input: str | list[str] | Tensor, prepend_bos: bool | None) -> tuple[Tensor, Tensor]:
        """``generate``'s prompt as (tokens, attention mask), both Tensor[batch, pos] on the model's device:
        token input taken as is (mask all ones), text tokenized and left-padded with TransformerLens's mask rule."""
        device = self.W_E.device
        if isinstance(input, Tensor):
            tokens = input.to(device)
            tokens = tokens[None] if tokens.ndim == 1 else tokens
            return tokens, torch.ones_like(tokens)
        tokens = self.to_tokens(input, prepend_bos=prepend_bos, padding_side="left")
        pb = self.cfg.default_prepend_bos if prepend_bos is None else prepend_bos
        return tokens, get_attention_mask(self.tokenizer, tokens, pb, padding_side="left").to(device)

    def __repr__(self) -> str:
        return (
            f"HookedQuantizedLM({self.cfg.model_name!r}, precision={self.precision.name}, "
            f"n_layers={self.cfg.n_layers}, d_model={self.cfg.d_model}, device={self.cfg.device})"
        )


def _progress(steps: range, verbose: bool) -> Any:
    if not verbose:
        return steps
    from tqdm.auto import tqdm

    return tqdm(steps, desc="generate")


def _next_token(logits: Tensor, greedy: bool, temperature: float, top_k: int | None, top_p: float | None,
                gen: torch.Generator) -> Tensor:
    """Next ids ``Tensor[batch]`` from last-position ``logits`` ``Tensor[batch, d_vocab]`` (float32)."""
    if greedy:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=gen).squeeze(-1)


def _dtype_or_none(metadata: dict[str, Any]) -> torch.dtype | None:
    name = metadata.get("compute_dtype")
    return getattr(torch, name) if isinstance(name, str) else None
