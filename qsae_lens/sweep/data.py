"""Sweep steps 1-2: tokenize the corpus, load each precision's model and cache its activations.

Activation caches live under ``activations/<precision>/<split>/layers<L1>_<L2>...``: one folder per
group of layers cached in one forward pass. A later run that adds layers caches only the new ones
into a new group folder (one more forward pass, stopped after the deepest new layer) and leaves the
existing groups as they are; :meth:`qsae_lens.sweep.plan.SweepPlan.cache_dir` finds the group that
holds a layer.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from qsae_lens.sweep.plan import SweepPlan, cache_group_name


@dataclasses.dataclass
class SweepData:
    """The tokenized corpus: train and held-out windows, disjoint by document."""

    tokenizer: Any
    splits: Any
    """``{"train": Dataset, "test": Dataset}`` with an ``input_ids`` column of BOS-led windows."""
    eval_tokens: torch.Tensor
    """Tensor[n_eval_windows, context_size] int64: the held-out windows, the same for every precision."""
    corpus_label: str

    def __repr__(self) -> str:
        return (f"SweepData(corpus={self.corpus_label!r}, train_windows={len(self.splits['train'])}, "
                f"eval_tokens={tuple(self.eval_tokens.shape)})")


def load_tokenizer(model_path: str) -> Any:
    """The model's tokenizer (from the folder, hub id or the .gguf file)."""
    from transformers import AutoTokenizer

    path = Path(model_path)
    if path.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return AutoTokenizer.from_pretrained(model_path)


def corpus_label(corpus: Any) -> str:
    """How a corpus is named in reports and reuse keys."""
    return corpus if isinstance(corpus, str) else f"(list of {len([t for t in corpus if t.strip()])} documents)"


def prepare_data(plan: SweepPlan) -> SweepData:
    """Tokenize the corpus into train and held-out windows (disjoint by document, seeded split)."""
    from qsae_lens.corpus import corpus_texts, tokenize_corpus_splits

    cfg = plan.config
    texts = corpus_texts(cfg.corpus) if isinstance(cfg.corpus, str) else [t for t in cfg.corpus if t.strip()]
    label = corpus_label(cfg.corpus)
    tokenizer = load_tokenizer(plan.model_path)
    splits = tokenize_corpus_splits(tokenizer, texts, context_size=cfg.context_size,
                                    max_windows=-(-cfg.train_tokens // cfg.context_size),
                                    max_eval_windows=cfg.eval_windows, seed=cfg.seed)
    if len(splits["train"]) == 0 or len(splits["test"]) == 0:
        raise ValueError(f"Corpus {label!r} produced no train or held-out windows at context {cfg.context_size}.")
    eval_tokens = torch.tensor(splits["test"]["input_ids"], dtype=torch.long)
    return SweepData(tokenizer, splits, eval_tokens, label)


def data_identity(plan: SweepPlan, precision: str, corpus: str) -> dict[str, Any]:
    """What a precision's activation caches (and so everything trained on them) depend on."""
    cfg = plan.config
    return {"model_path": plan.model_path, "precision": precision, "corpus": corpus, "hook": plan.hook,
            "train_tokens": cfg.train_tokens, "eval_windows": cfg.eval_windows, "context_size": cfg.context_size,
            "split_seed": cfg.seed}


@dataclasses.dataclass
class CachedModels:
    """Every precision's loaded model (kept for the transfer matrix) and its precision metadata."""

    models: dict[str, Any]
    """Precision name -> :class:`qsae_lens.models.HookedQuantizedLM`."""
    metadata: dict[str, dict[str, Any]]
    seconds: float
    """Time spent loading and caching in this run."""


def cache_precisions(plan: SweepPlan, data: SweepData, *, progress: bool = True) -> CachedModels:
    """Load the model at each precision and cache the layers not cached yet (one forward pass per split)."""
    from qsae_lens.activations import cache_activations
    from qsae_lens.models import load_model

    t0 = time.time()
    models, metadata = {}, {}
    for p in plan.precisions:
        _log(f"loading the model at {p.name}")
        models[p.name] = model = load_model(plan.model_path, p, device=plan.device)
        metadata[p.name] = dict(model.precision_metadata)
        for split, ds in (("train", data.splits["train"]), ("eval", data.splits["test"])):
            missing = [layer for layer in plan.layers if plan.find_cache_dir(p.name, split, layer) is None]
            if not missing:
                continue
            folder = plan.out_dir / "activations" / p.name / split / cache_group_name(missing)
            cache_activations(model, ds, [plan.hook_name(layer) for layer in missing], folder, aggregation="all",
                              exclude_special_tokens=True, progress=progress)
    return CachedModels(models, metadata, time.time() - t0)


def _log(msg: str) -> None:
    print(f"[qsae sweep] {msg}", flush=True)
