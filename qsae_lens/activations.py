"""Probe layers, running statistics, and activation caches that SAELens trains from directly.

On-disk format (one folder per cache), chosen so SAELens's own runner reads it unchanged:

* The folder **is** a Hugging Face ``datasets`` dataset (``state.json``, ``dataset_info.json``,
  ``data-NNNNN.arrow``) with exactly the layout SAELens 6.54's ``CacheActivationsRunner`` writes:
  one ``Array2D(shape=(context_size, d_in))`` column per hook name plus a ``token_ids`` column.
  ``LanguageModelSAERunnerConfig(use_cached_activations=True, cached_activations_path=<folder>,
  hook_name=<any cached hook>)`` then trains from it (``datasets.load_from_disk`` picks the
  hook's column), and SAELens's ``exclude_special_tokens`` filters by ``token_ids``. Unlike
  SAELens's runner we write *several hooks from one forward pass* into the same rows.
* Aggregation ``"all"`` keeps whole windows (rows ``[context_size, d]``) because that is the
  shape SAELens reads; special-token positions (BOS/EOS/PAD) are excluded by their ``token_ids``
  at read time — by SAELens (``exclude_special_tokens``) and by :func:`load_activations` — and
  never enter the running statistics. ``"last"``/``"mean"`` store one ``[1, d]`` row per window
  (train from them with ``context_size=1``); windows with no ordinary token are dropped.
* ``manifest.json``: model and precision metadata, hook names, aggregation, token counts and the
  running mean/variance per hook (Welford/Chan, float64). Its presence marks a finished cache.
* Resumable and atomic: work happens in ``<out>.partial/``; each shard (``batches_per_shard``
  forward passes) is written under a temporary name and renamed; a re-run skips finished shards
  (same model, tokens and settings, checked by ``run.json``); the finished folder is renamed
  into place in one step, so ``<out>`` is either absent or complete.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from qsae_lens._io import atomic_write_bytes, atomic_write_text, remove_stale_temporaries
from qsae_lens.layers import parse_layers_arg, probe_layers, resolve_layers

if TYPE_CHECKING:
    import datasets

FORMAT_VERSION = "qsae_lens.activations/1"
AGGREGATIONS = ("all", "last", "mean")
MANIFEST = "manifest.json"
_RUN = "run.json"
_BLOCK_HOOK = re.compile(r"^blocks\.(\d+)\.")
# Same structural special tokens as sae_lens.util.get_special_token_ids (tested equal), restated
# here because importing sae_lens costs ~14 s and caching does not otherwise need it.
_SPECIAL_TOKEN_ATTRS = ("bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id")


# --------------------------------------------------------------------------------------------
# probe layers


# the one definition lives in qsae_lens.layers; re-exported here for existing imports


# --------------------------------------------------------------------------------------------
# running statistics


class RunningStats:
    """Running per-dimension mean and variance over batches of vectors (float64 accumulators).

    Each batch is reduced with tensor ops and merged with Chan et al.'s parallel form of
    Welford's update (``delta = mean_b - mean_a``; ``M2 = M2_a + M2_b + delta^2 n_a n_b / n``), so
    there is no loop over rows and no catastrophic cancellation from summing squares. torch has no
    streaming moments, hence this small class. The mean initialises an SAE's ``b_dec``.
    """

    def __init__(self, d: int | None = None) -> None:
        self.count = 0
        self.mean: torch.Tensor | None = None if d is None else torch.zeros(d, dtype=torch.float64)
        self.m2: torch.Tensor | None = None if d is None else torch.zeros(d, dtype=torch.float64)

    @property
    def d(self) -> int | None:
        return None if self.mean is None else int(self.mean.shape[0])

    def update(self, x: torch.Tensor) -> RunningStats:
        """Fold in a batch ``x: Tensor[n, d]`` (any float dtype; accumulated in float64)."""
        if x.ndim != 2:
            raise ValueError(f"RunningStats.update expects Tensor[n, d], got shape {tuple(x.shape)}.")
        if x.shape[0] == 0:
            return self
        x = x.detach().to("cpu", torch.float64)
        mean_b = x.mean(0)
        m2_b = (x - mean_b).square().sum(0)
        return self._merge(int(x.shape[0]), mean_b, m2_b)

    def merge(self, other: RunningStats) -> RunningStats:
        """Fold in the statistics of another accumulator (e.g. another shard); returns self."""
        if other.count == 0:
            return self
        assert other.mean is not None and other.m2 is not None
        return self._merge(other.count, other.mean, other.m2)

    def _merge(self, n_b: int, mean_b: torch.Tensor, m2_b: torch.Tensor) -> RunningStats:
        if self.mean is None or self.m2 is None or self.count == 0:
            if self.mean is not None and self.mean.shape != mean_b.shape:
                raise ValueError(f"dimension mismatch: stats of d={self.d}, batch of d={mean_b.shape[0]}.")
            self.count, self.mean, self.m2 = n_b, mean_b.clone(), m2_b.clone()
            return self
        if self.mean.shape != mean_b.shape:
            raise ValueError(f"dimension mismatch: stats of d={self.d}, batch of d={mean_b.shape[0]}.")
        n = self.count + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta.square() * (self.count * n_b / n)
        self.count = n
        return self

    def var(self, correction: int = 1) -> torch.Tensor:
        """Per-dimension variance ``Tensor[d]``, ``correction=1`` like ``torch.var`` (0: population)."""
        if self.m2 is None or self.count - correction <= 0:
            raise ValueError(f"Variance needs more than {correction} observation(s); have {self.count}.")
        return self.m2 / (self.count - correction)

    @property
    def std(self) -> torch.Tensor:
        return self.var().sqrt()

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form: ``count``, ``mean`` and unbiased ``var`` as lists (exact float64 round trip)."""
        if self.mean is None or self.m2 is None:
            return {"count": 0, "mean": None, "var": None}
        var = self.m2 / max(self.count - 1, 1)
        return {"count": self.count, "mean": self.mean.tolist(), "var": var.tolist()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunningStats:
        stats = cls()
        if data["count"]:
            stats.count = int(data["count"])
            stats.mean = torch.tensor(data["mean"], dtype=torch.float64)
            stats.m2 = torch.tensor(data["var"], dtype=torch.float64) * max(stats.count - 1, 1)
        return stats

    def __repr__(self) -> str:
        if self.mean is None or self.m2 is None or self.count == 0:
            return "RunningStats(count=0)"
        var = self.m2 / max(self.count - 1, 1)
        return (
            f"RunningStats(count={self.count}, d={self.d}, |mean|={self.mean.norm():.4g}, "
            f"mean var={var.mean():.4g})"
        )


# --------------------------------------------------------------------------------------------
# helpers


def special_token_ids(tokenizer: Any) -> list[int]:
    """Structural special-token ids (BOS, EOS, PAD, SEP, decoder start), as SAELens excludes them."""
    ids = {getattr(tokenizer, a, None) for a in _SPECIAL_TOKEN_ATTRS}
    return sorted(int(i) for i in ids if i is not None)


def stop_at_layer_for(hook_names: Sequence[str]) -> int | None:
    """Smallest ``stop_at_layer`` that still computes every hook (None: the whole model is needed)."""
    layers = [_BLOCK_HOOK.match(h) for h in hook_names]
    if not layers or any(m is None for m in layers):
        return None
    return max(int(m.group(1)) for m in layers if m is not None) + 1


def _model_hook_names(model: Any) -> list[str]:
    hook_dict = getattr(model, "hook_dict", None)
    if hook_dict:
        return list(hook_dict)
    if callable(getattr(model, "hook_names", None)):
        return list(model.hook_names())
    raise TypeError(f"{type(model).__name__} exposes no hook points (expected a HookedRootModule).")


def _model_device(model: Any) -> torch.device:
    device = getattr(getattr(model, "cfg", None), "device", None)
    if device is not None:
        return torch.device(device)
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _tokens_source(dataset: Any) -> tuple[Any, str | None]:
    """(indexable source, column) for a Dataset with input_ids/tokens, or a Tensor[n, ctx]."""
    if isinstance(dataset, torch.Tensor):
        if dataset.ndim != 2:
            raise ValueError(f"A token tensor must be Tensor[n_windows, context_size], got {tuple(dataset.shape)}.")
        return dataset.cpu().numpy(), None
    columns = getattr(dataset, "column_names", None)
    if columns is None:
        raise TypeError(f"dataset must be a datasets.Dataset or a token Tensor[n, ctx], got {type(dataset).__name__}.")
    for col in ("input_ids", "tokens"):
        if col in columns:
            return dataset.with_format("numpy", columns=[col]), col
    raise ValueError(
        f"The dataset has columns {columns}; expected a tokenized 'input_ids' (or 'tokens') column, "
        "e.g. from qsae_lens.corpus.tokenize_corpus."
    )


def _token_rows(source: Any, column: str | None, start: int, stop: int) -> np.ndarray:
    rows = source[start:stop] if column is None else source[start:stop][column]
    rows = np.asarray(rows)
    if rows.ndim != 2:
        raise ValueError("All windows must have the same length (fixed context_size).")
    return rows


def _tokens_sha256(source: Any, column: str | None, n: int, chunk: int = 4096) -> str:
    digest = hashlib.sha256()
    for start in range(0, n, chunk):
        digest.update(np.ascontiguousarray(_token_rows(source, column, start, min(n, start + chunk)), np.int64))
    return digest.hexdigest()


def _json_default(obj: Any) -> Any:
    return str(obj)  # precision metadata is plain JSON by contract; be lenient with e.g. torch.dtype


def _features(hook_dims: dict[str, int], rows_per_window: int, dtype: str, with_tokens: bool) -> Any:
    import datasets

    cols: dict[str, Any] = {h: datasets.Array2D(shape=(rows_per_window, d), dtype=dtype) for h, d in hook_dims.items()}
    if with_tokens:
        cols["token_ids"] = datasets.Sequence(datasets.Value("int32"), length=rows_per_window)
    return datasets.Features(cols)


# --------------------------------------------------------------------------------------------
# manifest


@dataclass(frozen=True)
class CacheInfo:
    """What ``manifest.json`` of a finished cache says (see the module docstring for the format)."""

    path: Path
    hook_names: list[str]
    d_in: dict[str, int]
    """Width of each hook's vectors (heads flattened)."""
    aggregation: str
    rows_per_window: int
    """Second dimension of each stored row: ``context_size`` for "all", 1 for "last"/"mean"."""
    n_windows: int
    """Windows (sequences) run through the model."""
    n_vectors: int
    """Vectors :func:`load_activations` returns per hook (special positions excluded)."""
    n_positions: int
    """Token positions run through the model (``n_windows * context_size``)."""
    exclude_special_tokens: bool
    special_token_ids: list[int]
    dtype: str
    model_name: str | None
    precision_metadata: dict[str, Any] | None
    stats: dict[str, RunningStats] = field(repr=False)
    """Running mean/variance per hook over exactly the vectors :func:`load_activations` returns."""

    def sae_lens_config_kwargs(self, hook_name: str) -> dict[str, Any]:
        """Keyword arguments for ``LanguageModelSAERunnerConfig`` to train on this cache's ``hook_name``.

        The runner still wants a dataset (``dataset_path`` or ``override_dataset``) for its evals.
        """
        _check_hook(hook_name, self.hook_names, self.path)
        return {
            "hook_name": hook_name,
            "use_cached_activations": True,
            "cached_activations_path": str(self.path),
            "context_size": self.rows_per_window,
            "is_dataset_tokenized": True,
            "exclude_special_tokens": list(self.special_token_ids) if self.exclude_special_tokens else False,
        }


def _check_hook(hook_name: str, valid: Sequence[str], where: Any) -> None:
    if hook_name not in valid:
        raise KeyError(f"Hook {hook_name!r} is not in {where}. Valid hook names: {list(valid)}")


def read_cache_info(out_dir: str | os.PathLike[str]) -> CacheInfo:
    """Read a finished cache's manifest; clear errors for a missing or unfinished cache."""
    out = Path(out_dir)
    partial = out.with_name(out.name + ".partial")
    if not (out / MANIFEST).exists():
        if partial.exists():
            done = len(list(partial.glob("data-*.arrow")))
            raise FileNotFoundError(
                f"The activation cache {out} is incomplete ({done} shard(s) finished in {partial}). "
                "Re-run cache_activations with the same arguments to resume it."
            )
        what = "has no manifest.json (not a qsae_lens activation cache)" if out.exists() else "does not exist"
        raise FileNotFoundError(f"The activation cache {out} {what}. Create it with cache_activations / `qsae cache`.")
    m = json.loads((out / MANIFEST).read_text())
    if m.get("format") != FORMAT_VERSION:
        raise ValueError(f"{out / MANIFEST} has format {m.get('format')!r}; this qsae_lens reads {FORMAT_VERSION!r}.")
    return CacheInfo(
        path=out,
        hook_names=m["hook_names"],
        d_in=m["d_in"],
        aggregation=m["aggregation"],
        rows_per_window=m["rows_per_window"],
        n_windows=m["n_windows"],
        n_vectors=m["n_vectors"],
        n_positions=m["n_positions"],
        exclude_special_tokens=m["exclude_special_tokens"],
        special_token_ids=m["special_token_ids"],
        dtype=m["dtype"],
        model_name=m.get("model_name"),
        precision_metadata=m.get("precision_metadata"),
        stats={h: RunningStats.from_json(s) for h, s in m["stats"].items()},
    )


# --------------------------------------------------------------------------------------------
# caching


def _aggregate(
    acts: torch.Tensor, keep: torch.Tensor, tokens: torch.Tensor, aggregation: str
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Rows to store for one hook: (rows [m, r, d], token_ids [m, r] or None, vectors for stats [k, d]).

    ``acts: Tensor[b, ctx, d]``; ``keep: Tensor[b, ctx]`` (bool, False at special positions).
    """
    b, ctx, _ = acts.shape
    if aggregation == "all":
        return acts, tokens, acts[keep]
    valid = keep.any(1)
    if aggregation == "last":
        # index of the last kept position per window: first True of the flipped mask
        last = (ctx - 1) - keep.flip(1).to(torch.uint8).argmax(1)
        rows = acts[torch.arange(b), last][valid]
        return rows[:, None, :], tokens[torch.arange(b), last][valid][:, None], rows
    w = keep.to(acts.dtype)[..., None]
    rows = ((acts * w).sum(1) / w.sum(1).clamp_min(1))[valid]
    return rows[:, None, :], None, rows


def _run_signature(**kwargs: Any) -> dict[str, Any]:
    return json.loads(json.dumps({"format": FORMAT_VERSION, **kwargs}, default=_json_default, sort_keys=True))


def cache_activations(
    model: Any,
    dataset: datasets.Dataset | torch.Tensor,
    hook_names: str | Sequence[str],
    out_dir: str | os.PathLike[str],
    *,
    aggregation: Literal["all", "last", "mean"] = "all",
    batch_size: int = 8,
    exclude_special_tokens: bool = True,
    max_tokens: int | None = None,
    stop_at_layer: int | None | Literal["auto"] = "auto",
    dtype: Literal["float32", "float16"] = "float32",
    batches_per_shard: int | None = None,
    shard_megabytes: int = 256,
    progress: bool = True,
) -> Path:
    """Run ``model`` over token windows once and cache several hooks' activations for SAELens.

    ``model`` is any ``HookedRootModule`` with ``run_with_cache(tokens, names_filter=...,
    stop_at_layer=...)`` and a ``tokenizer`` (a ``HookedQuantizedLM`` or a TransformerLens
    ``HookedTransformer``). ``dataset`` has an ``input_ids`` column of fixed-length windows
    (:func:`qsae_lens.corpus.tokenize_corpus`) or is a ``Tensor[n, ctx]``. One forward pass per
    batch serves every hook, stopped after the deepest requested block (``stop_at_layer="auto"``).
    ``max_tokens`` caps the input tokens read (whole windows). A shard (the unit of resumption)
    holds ``batches_per_shard`` batches, by default as many as fit in about ``shard_megabytes``
    (estimated from ``model.cfg.d_model``), which bounds memory. Returns the cache folder; see the
    module docstring for its format, resumption and atomicity. A finished cache with the same
    settings is returned as is.
    """
    _check_cache_arguments(aggregation, dtype, batch_size, batches_per_shard, max_tokens)
    hooks = _checked_hooks(model, hook_names)
    stop = stop_at_layer_for(hooks) if stop_at_layer == "auto" else stop_at_layer
    specials = _excluded_token_ids(model, exclude_special_tokens)
    source, column = _tokens_source(dataset)
    n_windows, ctx = _windows_to_cache(source, column, max_tokens)
    model_cfg = getattr(model, "cfg", None)
    if batches_per_shard is None:  # as many batches as fit in about shard_megabytes
        rows = ctx if aggregation == "all" else 1
        batch_bytes = batch_size * rows * len(hooks) * int(getattr(model_cfg, "d_model", 1024)) * (
            4 if dtype == "float32" else 2)
        batches_per_shard = max(1, (shard_megabytes << 20) // batch_bytes)
    signature = _run_signature(
        hook_names=hooks,
        aggregation=aggregation,
        exclude_special_tokens=exclude_special_tokens,
        special_token_ids=specials,
        context_size=ctx,
        n_windows=n_windows,
        batch_size=batch_size,
        batches_per_shard=batches_per_shard,
        dtype=dtype,
        stop_at_layer=stop,
        tokens_sha256=_tokens_sha256(source, column, n_windows),
        model_name=getattr(model_cfg, "model_name", None),
        precision_metadata=getattr(model, "precision_metadata", None),
    )

    out = Path(out_dir)
    partial = _open_partial(out, signature)
    if partial is None:  # finished earlier with the same settings
        return out
    n_batches = math.ceil(n_windows / batch_size)
    n_shards = math.ceil(n_batches / batches_per_shard)
    todo = [s for s in range(n_shards) if not (partial / f"data-{s:05d}.arrow").exists()]
    special_t = torch.tensor(specials, dtype=torch.long)
    device = _model_device(model)

    from tqdm.auto import tqdm

    done_batches = n_batches - sum(
        len(range(s * batches_per_shard, min(n_batches, (s + 1) * batches_per_shard))) for s in todo
    )
    bar = tqdm(total=n_batches, initial=done_batches, desc="caching activations", unit="batch", disable=not progress)
    try:
        for s in todo:
            _write_shard(
                model, source, column, partial, s, hooks,
                windows=range(s * batches_per_shard * batch_size, min(n_windows, (s + 1) * batches_per_shard * batch_size)),
                batch_size=batch_size, stop=stop, device=device, special_t=special_t,
                aggregation=aggregation, dtype=dtype, bar=bar,
            )  # fmt: skip
    finally:
        bar.close()
    _finalize(partial, out, signature, n_shards)
    return out



def _checked_hooks(model: Any, hook_names: str | Sequence[str]) -> list[str]:
    """The requested hooks, deduplicated in order, each checked against the model's hook points."""
    hooks = [hook_names] if isinstance(hook_names, str) else list(dict.fromkeys(hook_names))
    if not hooks:
        raise ValueError("hook_names is empty: name at least one hook, e.g. 'blocks.0.hook_resid_post'.")
    valid = _model_hook_names(model)
    for h in hooks:
        _check_hook(h, valid, type(model).__name__)
    if "token_ids" in hooks:
        raise ValueError("'token_ids' is reserved for the token column.")
    return hooks


def _excluded_token_ids(model: Any, exclude_special_tokens: bool) -> list[int]:
    """Token ids whose positions are not cached (the tokenizer's special tokens), or [] when keeping all."""
    if not exclude_special_tokens:
        return []
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("exclude_special_tokens=True needs model.tokenizer to know the special tokens.")
    return special_token_ids(tokenizer)

def _check_cache_arguments(aggregation: str, dtype: str, batch_size: int, batches_per_shard: int | None,
                           max_tokens: int | None) -> None:
    """The argument checks of :func:`cache_activations` that need no model or data."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {list(AGGREGATIONS)}, got {aggregation!r}.")
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be 'float32' or 'float16' (arrow has no bfloat16), got {dtype!r}.")
    if batch_size < 1 or (batches_per_shard is not None and batches_per_shard < 1):
        raise ValueError("batch_size and batches_per_shard must be positive.")
    if max_tokens is not None and (isinstance(max_tokens, bool) or max_tokens < 1):
        raise ValueError(f"max_tokens must be a positive int or None, got {max_tokens}.")


def _windows_to_cache(source: Any, column: str | None, max_tokens: int | None) -> tuple[int, int]:
    """``(windows to cache, window length)``; refuses an empty dataset or a cap below one window."""
    n_total = len(source)
    if n_total == 0:
        raise ValueError("The dataset holds no windows: nothing to cache.")
    ctx = _token_rows(source, column, 0, 1).shape[1]
    if max_tokens is not None and max_tokens < ctx:
        raise ValueError(
            f"max_tokens={max_tokens} is less than one window of {ctx} tokens: nothing would be cached "
            f"(raise max_tokens to at least {ctx}, or use shorter windows)."
        )
    return (n_total if max_tokens is None else min(n_total, max_tokens // ctx)), ctx


def _open_partial(out: Path, signature: dict[str, Any]) -> Path | None:
    """The ``.partial`` folder to (re)fill for ``signature``, or None when ``out`` is already finished with it.

    Refuses a finished cache or an unfinished one made with other settings, and a non-cache folder.
    """
    partial = out.with_name(out.name + ".partial")
    if (out / MANIFEST).exists():
        done_sig = json.loads((out / MANIFEST).read_text()).get("run")
        if done_sig == signature:
            return None
        raise FileExistsError(
            f"{out} already holds a finished activation cache made with different settings. "
            "Delete it or choose another out_dir."
        )
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not an activation cache; choose an empty or new out_dir.")
    partial.mkdir(parents=True, exist_ok=True)
    if (partial / _RUN).exists():
        if json.loads((partial / _RUN).read_text()) != signature:
            raise FileExistsError(
                f"{partial} holds an unfinished cache made with different settings (model, tokens, hooks, "
                "aggregation or batching). Resume it with the same arguments, or delete it to start over."
            )
    else:
        atomic_write_text(partial / _RUN, json.dumps(signature, indent=2))
    for stale in partial.glob(".tmp-*"):  # leftovers of a write that was interrupted
        stale.unlink()
    remove_stale_temporaries(partial)
    return partial


@torch.inference_mode()
def _write_shard(
    model: Any,
    source: Any,
    column: str | None,
    partial: Path,
    shard: int,
    hooks: list[str],
    *,
    windows: range,
    batch_size: int,
    stop: int | None,
    device: torch.device,
    special_t: torch.Tensor,
    aggregation: str,
    dtype: str,
    bar: Any,
) -> None:
    import datasets
    from datasets.arrow_writer import ArrowWriter
    from safetensors.torch import save as safetensors_save

    rows: dict[str, list[torch.Tensor]] = {h: [] for h in hooks}
    token_rows: list[torch.Tensor] = []
    stats = {h: RunningStats() for h in hooks}
    n_positions = 0
    for start in range(windows.start, windows.stop, batch_size):
        tokens = torch.from_numpy(_token_rows(source, column, start, min(windows.stop, start + batch_size)))
        tokens = tokens.to(torch.long)
        _, cache = model.run_with_cache(tokens.to(device), names_filter=hooks, stop_at_layer=stop)
        keep = ~torch.isin(tokens, special_t)
        n_positions += tokens.numel()
        for h in hooks:
            acts = cache[h].detach().to("cpu", torch.float32)
            acts = acts.reshape(*acts.shape[:2], -1)  # flatten a head dimension, as SAELens does
            stored, tok, vectors = _aggregate(acts, keep, tokens, aggregation)
            rows[h].append(stored)
            stats[h].update(vectors)
            if h == hooks[0] and tok is not None:
                token_rows.append(tok.to(torch.int32))
        del cache
        bar.update(1)

    stacked = {h: torch.cat(v) for h, v in rows.items()}
    hook_dims = {h: int(t.shape[-1]) for h, t in stacked.items()}
    rows_per_window = int(stacked[hooks[0]].shape[1])
    features = _features(hook_dims, rows_per_window, dtype, with_tokens=bool(token_rows))
    columns: dict[str, Any] = {h: t.to(getattr(torch, dtype)).numpy() for h, t in stacked.items()}
    if token_rows:
        columns["token_ids"] = torch.cat(token_rows).numpy()
    table = datasets.Dataset.from_dict(columns, features=features).data.table

    # statistics first, data second: a shard counts as finished once its .arrow exists
    stat_tensors: dict[str, torch.Tensor] = {}
    for i, h in enumerate(hooks):
        st = stats[h]
        d = hook_dims[h]
        stat_tensors[f"{i}.mean"] = st.mean if st.mean is not None else torch.zeros(d, dtype=torch.float64)
        stat_tensors[f"{i}.m2"] = st.m2 if st.m2 is not None else torch.zeros(d, dtype=torch.float64)
        stat_tensors[f"{i}.count"] = torch.tensor([st.count], dtype=torch.int64)
    meta = {
        "n_windows": str(len(windows)),
        "n_positions": str(n_positions),
        "n_rows": str(table.num_rows),
        "rows_per_window": str(rows_per_window),
        "d_in": json.dumps(hook_dims),
    }
    stats_path = partial / f"stats-{shard:05d}.safetensors"
    atomic_write_bytes(stats_path, safetensors_save(stat_tensors, metadata=meta))
    # The arrow shard is streamed to disk by datasets' ArrowWriter (too large to buffer for
    # atomic_write_bytes): written under a temporary name and renamed, the same rule by hand.
    arrow_path = partial / f"data-{shard:05d}.arrow"
    tmp = partial / f".tmp-{arrow_path.name}"
    writer = ArrowWriter(features=features, path=str(tmp))
    try:
        writer.write_table(table)
        writer.finalize()
    finally:
        writer.close()
    os.replace(tmp, arrow_path)


def _finalize(partial: Path, out: Path, signature: dict[str, Any], n_shards: int) -> None:
    """Merge shard statistics, write the datasets index and manifest, rename the folder into place."""
    import datasets
    from safetensors import safe_open

    hooks: list[str] = signature["hook_names"]
    totals = {h: RunningStats() for h in hooks}
    n_windows = n_positions = n_rows = 0
    hook_dims: dict[str, int] = {}
    rows_per_window = 0
    for s in range(n_shards):
        with safe_open(str(partial / f"stats-{s:05d}.safetensors"), framework="pt") as f:
            meta = f.metadata()
            for i, h in enumerate(hooks):
                shard_stats = RunningStats()
                shard_stats.count = int(f.get_tensor(f"{i}.count")[0])
                shard_stats.mean, shard_stats.m2 = f.get_tensor(f"{i}.mean"), f.get_tensor(f"{i}.m2")
                totals[h].merge(shard_stats)
        n_windows += int(meta["n_windows"])
        n_positions += int(meta["n_positions"])
        n_rows += int(meta["n_rows"])
        hook_dims = json.loads(meta["d_in"])
        rows_per_window = int(meta["rows_per_window"])
    with_tokens = signature["aggregation"] != "mean"
    features = _features(hook_dims, rows_per_window, signature["dtype"], with_tokens)

    # The index files `datasets.load_from_disk` (hence SAELens) reads, as Dataset.save_to_disk
    # writes them; written by hand because our shards were written one by one, resumably.
    info = asdict(datasets.DatasetInfo(features=features))
    atomic_write_text(partial / "dataset_info.json", json.dumps({k: info[k] for k in sorted(info)}, indent=2))
    state = {
        "_data_files": [{"filename": f"data-{s:05d}.arrow"} for s in range(n_shards)],
        "_fingerprint": hashlib.sha256(json.dumps(signature, sort_keys=True).encode()).hexdigest()[:16],
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": None,
    }
    atomic_write_text(partial / "state.json", json.dumps(state, indent=2, sort_keys=True))

    aggregation = signature["aggregation"]
    n_vectors = totals[hooks[0]].count if aggregation == "all" else n_rows
    manifest = {
        "format": FORMAT_VERSION,
        "hook_names": hooks,
        "d_in": hook_dims,
        "aggregation": aggregation,
        "rows_per_window": rows_per_window,
        "context_size": signature["context_size"],
        "n_windows": n_windows,
        "n_positions": n_positions,
        "n_rows": n_rows,
        "n_vectors": n_vectors,
        "exclude_special_tokens": signature["exclude_special_tokens"],
        "special_token_ids": signature["special_token_ids"],
        "dtype": signature["dtype"],
        "model_name": signature["model_name"],
        "precision_metadata": signature["precision_metadata"],
        "stats": {h: totals[h].to_json() for h in hooks},
        "run": signature,
    }
    atomic_write_text(partial / MANIFEST, json.dumps(manifest, default=_json_default))
    (partial / _RUN).unlink(missing_ok=True)
    if out.exists():
        out.rmdir()  # verified empty by cache_activations; os.replace cannot replace a non-empty dir
    os.replace(partial, out)


# --------------------------------------------------------------------------------------------
# loading


def load_activations(
    out_dir: str | os.PathLike[str],
    hook_name: str,
    *,
    max_rows: int | None = None,
    exclude_special_tokens: bool | None = None,
    chunk_windows: int = 256,
) -> torch.Tensor:
    """A cached hook's activations as ``Tensor[n, d]`` (for ``compare``), in cache order.

    Special-token positions are dropped when the cache was made with
    ``exclude_special_tokens=True`` (override with the argument). ``max_rows`` stops reading early.
    """
    import datasets

    info = read_cache_info(out_dir)
    _check_hook(hook_name, info.hook_names, info.path)
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows must be a positive int or None, got {max_rows}.")
    exclude = info.exclude_special_tokens if exclude_special_tokens is None else exclude_special_tokens
    ds = datasets.load_from_disk(str(info.path))
    filter_tokens = exclude and info.aggregation == "all" and "token_ids" in ds.column_names
    ds = ds.with_format("torch", columns=[hook_name, "token_ids"] if filter_tokens else [hook_name])
    specials = torch.tensor(info.special_token_ids, dtype=torch.long)
    parts: list[torch.Tensor] = []
    n = 0
    for start in range(0, len(ds), chunk_windows):
        batch = ds[start : start + chunk_windows]
        acts = batch[hook_name]
        if filter_tokens:
            acts = acts[~torch.isin(batch["token_ids"].long(), specials)]
        else:
            acts = acts.reshape(-1, acts.shape[-1])
        parts.append(acts)
        n += acts.shape[0]
        if max_rows is not None and n >= max_rows:
            break
    result = torch.cat(parts) if parts else torch.zeros(0, info.d_in[hook_name])
    return result if max_rows is None else result[:max_rows]


# --------------------------------------------------------------------------------------------
# CLI: qsae cache


def add_cache_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``qsae cache``."""
    parser.add_argument("--model", default=None, help="HF id, local folder or GGUF file (default: embedded SmolLM2-135M)")
    parser.add_argument("--precision", default="fp32", help="fp32, fp16, bf16, int8, nf4, nf4-dq, fp4")
    parser.add_argument(
        "--layers", default="probe", help="'probe' (methodology layers, the default), 'middle', or e.g. '0,4,8'"
    )
    parser.add_argument("--hook", default="resid_post", help="hook per layer: resid_post, resid_pre, attn_out, mlp_out")
    parser.add_argument("--corpus", default="stdlib", help="stdlib, shakespeare, or a path to a .txt/.py file or folder")
    parser.add_argument("--context-size", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=100_000, help="input tokens to run (whole windows)")
    parser.add_argument("--aggregation", choices=AGGREGATIONS, default="all")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--keep-special-tokens", action="store_true", help="keep BOS/EOS/PAD positions")
    parser.add_argument("--out", default=None, help="cache folder (default: activations/<model>-<precision>-<corpus>-<aggregation>)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")


_CACHE_HOOKS = ("resid_pre", "resid_post", "attn_out", "mlp_out")


def _corpus_arg(text: str) -> str | list[str]:
    from qsae_lens.corpus import CORPORA

    if text in CORPORA:
        return text
    path = Path(text)
    if path.is_file():
        return [path.read_text(errors="replace")]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in {".txt", ".py", ".md"})
        if not files:
            raise ValueError(f"--corpus {text!r}: the folder holds no .txt, .py or .md files.")
        return [p.read_text(errors="replace") for p in files]
    raise FileNotFoundError(f"--corpus {text!r} is neither one of {list(CORPORA)} nor an existing file or folder.")


def _local_depth(model: str | None) -> int | None:
    """The number of blocks from a local model folder's config.json (None when not known without loading)."""
    if model is None:
        return None
    config = Path(model).expanduser() / "config.json"
    try:
        n = json.loads(config.read_text()).get("num_hidden_layers")
    except (OSError, ValueError, AttributeError):
        return None
    return n if isinstance(n, int) and n > 0 else None


def _resolve_layers(spec: Any, n_layers: int) -> list[int]:
    """:func:`qsae_lens.layers.resolve_layers`, with ``"probe"`` resolved here: that function calls
    itself forever on the string ``"probe"`` (qsae_lens.layers at the time of writing)."""
    return probe_layers(n_layers) if spec == "probe" else resolve_layers(spec, n_layers)


def _check_cache_args(args: argparse.Namespace) -> tuple[Any, str, str | list[str]]:
    """Validate every ``qsae cache`` option before any model is loaded; ValueError says what is wrong.

    Returns (layers spec from :func:`qsae_lens.layers.parse_layers_arg`, hook suffix, corpus)."""
    from qsae_lens.precision import parse_precision

    parse_precision(args.precision)
    for flag, value in (("--context-size", args.context_size), ("--batch-size", args.batch_size)):
        if value < 1:
            raise ValueError(f"{flag} must be a positive int, got {value}.")
    if args.max_tokens < args.context_size:
        raise ValueError(
            f"--max-tokens {args.max_tokens} is less than one window (--context-size {args.context_size}): "
            "nothing would be cached."
        )
    hook = args.hook.removeprefix("hook_")
    if hook not in _CACHE_HOOKS:
        raise ValueError(f"--hook must be one of {list(_CACHE_HOOKS)}, got {args.hook!r}.")
    spec = parse_layers_arg(args.layers)
    if args.model is None:  # the embedded model, when already converted, is read without loading it
        from qsae_lens.assets import DEFAULT_MODEL_FOLDER, find_cached

        depth = _local_depth(str(find_cached(DEFAULT_MODEL_FOLDER) or ""))
    else:
        depth = _local_depth(args.model)
    if depth is not None:
        _resolve_layers(spec, depth)  # range errors before the model is loaded
    if args.out is not None and Path(args.out).exists() and not Path(args.out).is_dir():
        raise NotADirectoryError(f"--out {args.out} is a file; the cache is a folder.")
    return spec, f"hook_{hook}", _corpus_arg(args.corpus)


def run_cache_command(args: argparse.Namespace) -> int:
    """``qsae cache``: load a model at a precision, tokenize a corpus, cache the chosen layers.

    Every option is checked before the model is loaded: bad input prints one line on stderr and
    returns exit status 2. The layer rule (``probe``, ``middle``, indices) is ``qsae_lens.layers``',
    the same as ``qsae sweep``'s."""
    from qsae_lens.assets import default_model_path
    from qsae_lens.corpus import tokenize_corpus
    from qsae_lens.models import load_model

    try:
        spec, hook, corpus_texts = _check_cache_args(args)
        model_path = args.model or str(default_model_path())
        model = load_model(model_path, precision=args.precision)
        layers = _resolve_layers(spec, int(model.cfg.n_layers))
    except (ValueError, FileNotFoundError, NotADirectoryError) as err:
        print(f"qsae cache: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    hooks = [f"blocks.{layer}.{hook}" for layer in layers]
    dataset = tokenize_corpus(
        model.tokenizer, corpus_texts, context_size=args.context_size,
        max_windows=args.max_tokens // args.context_size, seed=args.seed,
    )  # fmt: skip
    name = Path(model_path).name if not args.model else re.sub(r"[^A-Za-z0-9._-]+", "_", args.model)
    corpus = args.corpus if args.corpus in ("stdlib", "shakespeare") else Path(args.corpus).stem
    out = args.out or f"activations/{name}-{args.precision}-{corpus}-{args.aggregation}"
    path = cache_activations(
        model, dataset, hooks, out,
        aggregation=args.aggregation, batch_size=args.batch_size,
        exclude_special_tokens=not args.keep_special_tokens, progress=not args.no_progress,
    )  # fmt: skip
    info = read_cache_info(path)
    print(
        f"cached {len(hooks)} hook(s) x {info.n_vectors} vectors ({info.n_windows} windows, "
        f"{info.n_positions} tokens, aggregation={info.aggregation}) -> {path}",
        file=sys.stdout,
    )
    return 0


__all__ = [
    "AGGREGATIONS",
    "CacheInfo",
    "RunningStats",
    "add_cache_arguments",
    "cache_activations",
    "load_activations",
    "probe_layers",
    "read_cache_info",
    "run_cache_command",
    "special_token_ids",
    "stop_at_layer_for",
]
