"""What each feature is: top-activating contexts, quantile examples, histograms and the logit lens, in one pass.

One streaming pass over the tokens keeps, per latent (all tensor ops, memory independent of the
number of tokens):

- the top ``k`` activations and their token rows (a running top-k, :class:`RunningTopK`);
- a uniform random sample of ``n_samples`` of its firing tokens (a reservoir: every firing entry
  gets a uniform random key and the ``n_samples`` largest keys are kept, i.e. a running top-k on
  keys); "quantile examples" are the reservoir's examples at evenly spaced quantiles of its
  activations, i.e. examples across the latent's activation distribution as SAE dashboards show;
- a histogram of its positive activations over fixed log-spaced bins (:data:`HIST_EDGES`), so the
  bins need no first pass; and its firing count.

Memory: ``d_sae * (12 k + 16 n_samples + 8 n_bins)`` bytes plus one code block (``batch * ctx * d_sae``
float32); at 16,384 latents, k = 20, 40 samples, 80 bins: ~25 MiB.

The logit lens maps a decoder direction through the final norm's gain and the unembedding:
``(W_dec[i] * g) @ W_U`` with ``g`` the final RMSNorm/LayerNorm gain (``1 + w`` for Gemma). This
is what TransformerLens computes with ``fold_ln=True`` (it folds ``ln_final.w`` into ``W_U``); the
raw Hugging Face unembedding alone would ignore the gain. The norm's 1/RMS scale is a positive
per-token factor: it changes no ranking, so it is left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from qsae_lens.survival.frozen import encode_fn
from qsae_lens.survival.streaming import FixedBinHistogram, RunningTopK

__all__ = [
    "FeatureExamples",
    "ExampleAccumulator",
    "top_examples",
    "top_examples_from_activations",
    "quantile_examples",
    "context_windows",
    "LogitLens",
    "logit_lens",
    "unembedding",
]


class FeatureExamples(NamedTuple):
    """Per-latent examples from one streaming pass; rows index the flattened ``tokens`` (``window * ctx + pos``)."""

    top_values: Tensor
    """Tensor[d_sae, k] float32: top activations, descending (-inf padding where fewer fired)."""
    top_rows: Tensor
    """Tensor[d_sae, k] int64: flat token row of each (-1 padding)."""
    sample_values: Tensor
    """Tensor[d_sae, n_samples] float32: activations of a uniform sample of firing tokens."""
    sample_rows: Tensor
    """Tensor[d_sae, n_samples] int64: their flat token rows (-1 padding)."""
    hist_counts: Tensor
    """Tensor[d_sae, n_bins] int64: positive activations per fixed bin."""
    hist_edges: Tensor
    """Tensor[n_bins + 1] float32: the bin edges (:data:`HIST_EDGES`)."""
    fire_count: Tensor
    """Tensor[d_sae] int64: tokens on which each latent fired."""
    n_tokens: int
    """Token positions scored (special tokens excluded)."""
    context_size: int
    """Width of a token window (rows ``r`` belong to window ``r // context_size``); 0 when rows are bare activations."""

    @property
    def frequency(self) -> Tensor:
        """Tensor[d_sae] float64: firing frequency."""
        return self.fire_count.double() / max(self.n_tokens, 1)

    def __repr__(self) -> str:
        d, k = self.top_values.shape
        return f"FeatureExamples(d_sae={d}, k={k}, n_tokens={self.n_tokens}, alive={int((self.fire_count > 0).sum())})"


class ExampleAccumulator:
    """The streaming state behind :func:`top_examples` (use it directly to feed your own code blocks)."""

    def __init__(self, d_sae: int, *, k: int = 20, n_samples: int = 40, seed: int = 0) -> None:
        self.top = RunningTopK(d_sae, k)
        self.sample = RunningTopK(d_sae, n_samples)
        self.hist = FixedBinHistogram(d_sae)
        self.fire_count = torch.zeros(d_sae, dtype=torch.long)
        self.n_tokens = 0
        self._gen = torch.Generator().manual_seed(seed)

    def update(self, codes: Tensor, row0: int, valid: Tensor | None = None) -> None:
        """Add ``codes: Tensor[b, d_sae]`` for flat rows ``row0 ..``; ``valid: Tensor[b]`` bool drops rows (special tokens)."""
        codes = codes.float()
        if valid is not None:
            codes = codes * valid[:, None].to(codes.dtype)
            self.n_tokens += int(valid.sum())
        else:
            self.n_tokens += codes.shape[0]
        fire = codes > 0
        self.top.update(codes, row0, keep=fire)
        keys = torch.rand(codes.shape, generator=self._gen)
        self.sample.update(keys, row0, keep=fire, payload=codes)
        self.hist.update(codes)
        self.fire_count += fire.sum(0)

    def result(self, context_size: int = 0) -> FeatureExamples:
        """The examples gathered so far."""
        payload = self.sample.payload if self.sample.payload is not None else torch.zeros_like(self.sample.values)
        sample_values = payload.masked_fill(self.sample.index < 0, float("-inf"))
        return FeatureExamples(self.top.values, self.top.index, sample_values, self.sample.index,
                               self.hist.counts, self.hist.edges, self.fire_count, self.n_tokens, context_size)


@torch.no_grad()
def top_examples_from_activations(sae: Any, acts: Tensor, *, k: int = 20, n_samples: int = 40,
                                  block: int | None = None, seed: int = 0, progress: bool = False) -> FeatureExamples:
    """:func:`top_examples` over cached activations ``acts: Tensor[n, d_in]`` (rows are the example ids)."""
    encode = encode_fn(sae)
    first = encode(acts[:1].float())
    d_sae = first.shape[1]
    block = int(block or max(64, 2**24 // d_sae))
    acc = ExampleAccumulator(d_sae, k=k, n_samples=n_samples, seed=seed)
    for s in tqdm(range(0, acts.shape[0], block), desc="top examples", disable=not progress):
        acc.update(encode(acts[s:s + block].float()), s)
    return acc.result()


@torch.no_grad()
def top_examples(sae: Any, model: Any, tokens: Tensor, *, hook_name: str, k: int = 20, n_samples: int = 40,
                 batch_size: int = 8, exclude_special_tokens: bool = True, seed: int = 0,
                 progress: bool = False) -> FeatureExamples:
    """Per-latent top-k contexts, a firing sample for quantile examples, histogram and frequency, in one pass.

    ``tokens: Tensor[n_windows, ctx]`` int64 run through ``model`` (a HookedQuantizedLM or
    HookedTransformer) ``batch_size`` windows at a time up to ``hook_name``; the SAE encodes that
    hook's activations. Special tokens (BOS/EOS/PAD) never count as examples (their residual norm
    is ~100x the others').
    """
    from qsae_lens.activations import special_token_ids, stop_at_layer_for

    encode = encode_fn(sae)
    stop = stop_at_layer_for([hook_name])
    special = torch.tensor(special_token_ids(model.tokenizer) if exclude_special_tokens else [], dtype=torch.long)
    n_win, ctx = tokens.shape
    acc: ExampleAccumulator | None = None
    for s in tqdm(range(0, n_win, batch_size), desc="top examples", disable=not progress):
        batch = tokens[s:s + batch_size]
        _, cache = model.run_with_cache(batch, names_filter=[hook_name], stop_at_layer=stop)
        acts = cache[hook_name].reshape(-1, cache[hook_name].shape[-1])
        codes = encode(acts.to(next(iter(sae.parameters())).dtype) if hasattr(sae, "parameters") else acts)
        if acc is None:
            acc = ExampleAccumulator(codes.shape[1], k=k, n_samples=n_samples, seed=seed)
        valid = ~torch.isin(batch.reshape(-1).cpu(), special)
        acc.update(codes.cpu(), s * ctx, valid)
    if acc is None:
        raise ValueError("tokens is empty: pass Tensor[n_windows, ctx] with n_windows >= 1")
    return acc.result(ctx)


def quantile_examples(ex: FeatureExamples, latent: int, n_quantiles: int = 5) -> list[tuple[float, int]]:
    """``(activation, row)`` pairs of ``latent``'s reservoir at ``n_quantiles`` evenly spaced quantiles (low to high)."""
    rows = ex.sample_rows[latent]
    vals = ex.sample_values[latent]
    ok = rows >= 0
    if not bool(ok.any()):
        return []
    v, r = vals[ok], rows[ok]
    order = v.argsort()
    pos = torch.linspace(0, len(order) - 1, min(n_quantiles, len(order))).round().long()
    return [(float(v[order[i]]), int(r[order[i]])) for i in pos.unique().tolist()]


def context_windows(tokens: Tensor, rows: Sequence[int], *, left: int = 12, right: int = 4) -> list[tuple[int, int, int]]:
    """For flat rows of ``tokens: Tensor[n_windows, ctx]``: ``(window, start, stop)`` of the context shown around each."""
    ctx = tokens.shape[1]
    out = []
    for r in rows:
        w, p = divmod(int(r), ctx)
        out.append((w, max(0, p - left), min(ctx, p + right + 1)))
    return out


class LogitLens(NamedTuple):
    """Tokens a latent's decoder direction promotes and suppresses through the (gain-folded) unembedding."""

    top_ids: Tensor
    """Tensor[m, n] int64: most promoted token ids per latent."""
    top_values: Tensor
    """Tensor[m, n] float32: their logit contributions per unit activation."""
    bottom_ids: Tensor
    """Tensor[m, n] int64: most suppressed token ids."""
    bottom_values: Tensor
    """Tensor[m, n] float32: their (negative) contributions."""


def unembedding(model: Any) -> tuple[Tensor, Tensor | None]:
    """``(W_U: Tensor[d_model, d_vocab], gain: Tensor[d_model] | None)`` of a HookedQuantizedLM.

    ``W_U`` is the model's own (``model.W_U``, TransformerLens shape) when it has one, else the Hugging
    Face output embedding transposed; ``gain`` is the final norm's gain when ``W_U`` does not already
    include it (a HookedTransformer with ``fold_ln`` has folded it: gain None).
    """
    from transformer_lens import HookedTransformer

    if isinstance(model, HookedTransformer):
        return model.W_U.detach(), None
    hf = model.hf_model
    raw = hf.get_output_embeddings().weight.detach().T
    w_u = getattr(model, "W_U", None)
    w_u = raw if w_u is None else w_u.detach()
    if w_u.shape != raw.shape or not torch.equal(w_u, raw):
        return w_u, None  # the model's W_U already differs from the raw unembedding: taken as folded
    from qsae_lens.models.architectures import get_submodule

    adapter = model.adapter
    norm = get_submodule(hf, adapter.final_norm)
    w = norm.weight.detach().float()
    gain = 1.0 + w if adapter.gain == "1+w" else w
    return w_u, gain


@torch.no_grad()
def logit_lens(directions: Tensor, W_U: Tensor, gain: Tensor | None = None, *, n: int = 10,
               block: int = 256) -> LogitLens:
    """Top/bottom ``n`` tokens of ``(directions * gain) @ W_U`` per row.

    ``directions: Tensor[m, d_model]`` (decoder rows), ``W_U: Tensor[d_model, d_vocab]``,
    ``gain: Tensor[d_model]`` or None. ``block`` rows at a time (``block * d_vocab`` floats).
    """
    W = W_U.float()
    d = directions.float()
    if gain is not None:
        d = d * gain.float().to(d.device)
    tops, bots = [], []
    for s in range(0, d.shape[0], block):
        logits = d[s:s + block] @ W
        tops.append(logits.topk(n, dim=1))
        bots.append(logits.topk(n, dim=1, largest=False))
    return LogitLens(torch.cat([t.indices for t in tops]), torch.cat([t.values for t in tops]),
                     torch.cat([b.indices for b in bots]), torch.cat([b.values for b in bots]))

