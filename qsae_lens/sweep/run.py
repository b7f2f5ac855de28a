"""The main job: a precision sweep. Does this model's SAE features survive quantization?

The pipeline reads top to bottom in :func:`run_precision_sweep`:

1. **validate** everything (layers, precisions on this device, corpus, budget) before any long work;
2. **tokenize** the corpus into train and held-out windows, disjoint by document;
3. per precision: **load** the model with real bitsandbytes kernels and **cache** its activations
   at the chosen layers once (one forward pass serves all layers, stopped after the deepest);
4. **train** one SAE per (precision, layer, seed) from the cached activations with SAELens's
   ``SAETrainer`` (several epochs over a small corpus are cheaper than more LM forwards on a CPU);
5. **evaluate** every SAE spliced into every precision's model on the same held-out tokens: the
   cross-precision **transfer matrix** ("can I use my fp32 SAE on my 4-bit model?"), beside each
   model's own quantization cost, plus SAELens's ``run_evals`` on the diagonal;
6. **compare** each precision's SAE with the baseline's, with the same init seed and with a
   different one, beside a **ceiling** (two seeds at the baseline precision) and a **floor**
   (a random SAE of the same shape): the precision effect is read against the seed-to-seed
   variation, never against 1.0;
7. **report**: JSON, markdown and one self-contained HTML page (:mod:`qsae_lens.report.sweep_report`).

Every step writes its results atomically under ``out_dir`` and is skipped when its result is
already there, so an interrupted sweep resumes where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from qsae_lens.activations import cache_activations, load_activations, probe_layers
from qsae_lens.precision import Precision, check_precision_runs_on, parse_precision

DEFAULT_PRECISIONS = ("fp32", "int8", "nf4", "fp4")
SWEEP_SCHEMA_VERSION = "1.0"


@dataclasses.dataclass
class SweepConfig:
    """Everything a sweep depends on; saved as ``sweep_config.json`` so a run can be reproduced.

    The defaults are sized for the embedded SmolLM2-135M on a 2-core CPU (about 20 minutes).
    """

    model: str | None = None
    """HF hub id, local folder or GGUF file; None = the embedded SmolLM2-135M-Instruct."""
    corpus: str | Sequence[str] = "stdlib"
    """"stdlib" (Python source), "shakespeare", or a list of documents (strings)."""
    precisions: tuple[str, ...] = DEFAULT_PRECISIONS
    baseline: str | None = None
    """Precision the others are compared with; default: the first of ``precisions``."""
    layers: tuple[int, ...] | str | None = None
    """Block indices, "probe" (the methodology's probe set), or None (the middle probe layer)."""
    hook: str = "hook_resid_post"
    seeds: tuple[int, ...] = (0,)
    """Init/data seeds trained at every precision."""
    ceiling_seed: int = 1
    """Extra seed trained at the baseline precision only: the seed-to-seed ceiling."""
    architecture: str = "openai_topk"
    d_sae: int = 2048
    k: int = 32
    train_tokens: int = 24_576
    """Distinct tokens whose activations are cached per precision (the LM-forward cost)."""
    training_samples: int = 307_200
    """Activation vectors the SAE trains on (epochs = training_samples / cached vectors)."""
    batch_size: int = 256
    lr: float = 2e-3
    dead_tokens_threshold: int = 50_000
    """Tokens without firing before a latent counts as dead for aux-k (paper: 10M; scaled to the budget)."""
    max_norm_ratio: float | None = 10.0
    """Drop training activations whose norm exceeds this multiple of the median (None keeps all).

    Special tokens are excluded already, but a few ordinary tokens also become attention sinks: on
    SmolLM2 layer 16, 13 of 24,380 cached vectors have norms up to ~18,500 against a median of ~184.
    A batch holding one has its normalised MSE dominated by it, so it teaches the SAE nothing else.
    """
    eval_windows: int = 16
    context_size: int = 128
    device: str | None = None
    saelens_evals: bool = True
    """Also run SAELens's run_evals for each SAE on its own model (the diagonal)."""
    n_bootstrap: int = 1000
    n_permutations: int = 2000
    seed: int = 0
    """Seed of the corpus split and of statistics."""

    def resolved_baseline(self) -> str:
        return self.baseline or self.precisions[0]


@dataclasses.dataclass
class SweepResult:
    """Where a sweep's outputs are, and its report as plain values."""

    out_dir: Path
    report: dict[str, Any]
    """The content of ``report.json`` (see :mod:`qsae_lens.report.sweep_report`)."""

    @property
    def markdown_path(self) -> Path:
        return self.out_dir / "report.md"

    @property
    def html_path(self) -> Path:
        return self.out_dir / "report.html"


# --------------------------------------------------------------------------------------------
# validation


def _resolve_model_path(model: str | None) -> str:
    if model is None:
        from qsae_lens.assets import default_model_path

        return str(default_model_path())
    return model


def _read_n_layers(model_path: str) -> int:
    from transformers import AutoConfig

    path = Path(model_path)
    if path.suffix == ".gguf":
        cfg = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    else:
        cfg = AutoConfig.from_pretrained(model_path)
    text_cfg = getattr(cfg, "text_config", None) or cfg
    n = getattr(text_cfg, "num_hidden_layers", None) or getattr(text_cfg, "n_layer", None)
    if n is None:
        raise ValueError(f"Cannot tell how many layers {model_path} has from its config.")
    return int(n)


def resolve_layers(layers: Sequence[int] | str | None, n_layers: int) -> list[int]:
    """None -> the middle probe layer; "probe" -> all probe layers; ints are validated."""
    probes = probe_layers(n_layers)
    if layers is None:
        return [probes[len(probes) // 2]]
    if isinstance(layers, str):
        if layers != "probe":
            raise ValueError(f"layers must be a list of ints, 'probe' or None; got {layers!r}")
        return probes
    out = sorted(set(int(x) for x in layers))
    bad = [x for x in out if not 0 <= x < n_layers]
    if bad or not out:
        raise ValueError(f"Layer(s) {bad or '[]'} out of range: this model has layers 0..{n_layers - 1}.")
    return out


def _validate(cfg: SweepConfig, device: str) -> list[Precision]:
    precisions = [parse_precision(p) for p in cfg.precisions]
    names = [p.name for p in precisions]
    if len(set(names)) != len(names):
        raise ValueError(f"precisions contain duplicates: {names}")
    if cfg.resolved_baseline() not in names:
        raise ValueError(f"baseline {cfg.resolved_baseline()!r} is not among the precisions {names}")
    for p in precisions:
        check_precision_runs_on(p, device)
    if isinstance(cfg.corpus, str):
        from qsae_lens.corpus import CORPORA

        if cfg.corpus not in CORPORA:
            raise ValueError(f"Unknown corpus {cfg.corpus!r}: choose one of {list(CORPORA)} or pass a list of strings.")
    elif not any(isinstance(t, str) and t.strip() for t in cfg.corpus):
        raise ValueError("The corpus is empty: it holds no non-blank text. Pass at least one non-empty document.")
    if cfg.ceiling_seed in cfg.seeds:
        raise ValueError(f"ceiling_seed={cfg.ceiling_seed} must differ from the trained seeds {cfg.seeds}")
    if cfg.train_tokens < 4 * cfg.batch_size:
        raise ValueError(
            f"train_tokens={cfg.train_tokens} is too small to train an SAE: cache at least "
            f"4 batches ({4 * cfg.batch_size} tokens) of activations."
        )
    if cfg.training_samples < 10 * cfg.batch_size:
        raise ValueError(
            f"training_samples={cfg.training_samples} gives fewer than 10 steps of batch {cfg.batch_size}: "
            "raise the budget or lower batch_size."
        )
    if cfg.max_norm_ratio is not None and cfg.max_norm_ratio <= 1:
        raise ValueError(f"max_norm_ratio={cfg.max_norm_ratio} would drop most activations: use a value > 1, or None.")
    if cfg.k >= cfg.d_sae:
        raise ValueError(f"k={cfg.k} must be smaller than d_sae={cfg.d_sae}")
    if cfg.eval_windows < 1:
        raise ValueError("eval_windows must be >= 1")
    # last: importing the registry imports sae_lens (~14 s), and the checks above should answer fast
    from qsae_lens.training import ARCHITECTURES

    if cfg.architecture not in ARCHITECTURES:
        raise ValueError(f"Unknown architecture {cfg.architecture!r}; registered: {sorted(ARCHITECTURES)}")
    return precisions


# --------------------------------------------------------------------------------------------
# helpers


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def _log(msg: str) -> None:
    print(f"[qsae sweep] {msg}", flush=True)


def _cell_dir(out: Path, precision: str, layer: int, seed: int) -> Path:
    return out / "saes" / precision / f"layer{layer}" / f"seed{seed}"


def _hook_name(layer: int, hook: str) -> str:
    return f"blocks.{layer}.{hook}"


def _training_config(cfg: SweepConfig, d_in: int, init_seed: int, hook_name: str) -> Any:
    import qsae_lens.training  # noqa: F401 - registers the architectures
    from qsae_lens.training import ARCHITECTURES

    if cfg.architecture not in ARCHITECTURES:
        raise ValueError(f"Unknown architecture {cfg.architecture!r}; registered: {sorted(ARCHITECTURES)}")
    cls = ARCHITECTURES[cfg.architecture]
    kwargs: dict[str, Any] = {"d_in": d_in, "d_sae": cfg.d_sae, "init_seed": init_seed}
    fields = {f.name for f in dataclasses.fields(cls)}
    if "k" in fields:
        kwargs["k"] = cfg.k
    if "dead_tokens_threshold" in fields:
        kwargs["dead_tokens_threshold"] = cfg.dead_tokens_threshold
    sae_cfg = cls(**kwargs)
    sae_cfg.metadata.hook_name = hook_name
    return sae_cfg


def _training_activations(cache_dir: Path, hook: str, max_norm_ratio: float | None
                          ) -> tuple[torch.Tensor, int, float | None]:
    """The cached vectors SAEs train on: special tokens already excluded, attention-sink outliers
    (norm > ``max_norm_ratio`` x the median) dropped.

    Returns ``(Tensor[n, d], n before dropping, the norm limit or None)``.
    """
    acts = load_activations(cache_dir, hook)
    n_cached = acts.shape[0]
    limit = None
    if max_norm_ratio is not None:
        norms = acts.norm(dim=-1)
        limit = max_norm_ratio * float(norms.median())
        acts = acts[norms <= limit]
    return acts, n_cached, limit


def _eval_tokens(dataset: Any) -> torch.Tensor:
    return torch.tensor(dataset["input_ids"], dtype=torch.long)


# Settings every cell's result depends on: a resumed sweep must have the same ones. Precisions,
# layers and seeds may change between runs (cells are keyed by them), so a sweep can be extended.
_RESUME_KEYS = ("model", "corpus", "hook", "architecture", "d_sae", "k", "train_tokens", "training_samples",
                "batch_size", "lr", "dead_tokens_threshold", "max_norm_ratio", "eval_windows", "context_size", "seed", "ceiling_seed")


def _check_resume_compatible(path: Path, cfg: SweepConfig, corpus_label: str, model_path: str) -> None:
    """Refuse to resume into a folder whose finished cells were made with other settings."""
    if not path.exists():
        return
    old = json.loads(path.read_text())
    new = {**dataclasses.asdict(cfg), "corpus": corpus_label}
    changed = [k for k in _RESUME_KEYS if k in old and old[k] != json.loads(json.dumps(new[k]))]
    if old.get("model_path") not in (None, model_path):
        changed.append("model_path")
    if changed:
        details = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k, model_path)!r}" for k in changed)
        raise ValueError(
            f"{path.parent} holds a sweep made with other settings ({details}). Its results cannot be "
            "reused: choose another output folder, or delete this one to start again."
        )


# --------------------------------------------------------------------------------------------
# the pipeline


def run_precision_sweep(
    config: SweepConfig | None = None,
    out_dir: str | os.PathLike[str] = "qsae_runs/sweep",
    *,
    progress: bool = True,
    **overrides: Any,
) -> SweepResult:
    """Train SAEs at several precisions and report how their features and reconstructions transfer.

    ``config`` (or keyword ``overrides`` of :class:`SweepConfig` fields) says what to run. Results
    go to ``out_dir``: ``activations/``, ``saes/<precision>/layer<L>/seed<S>/`` (SAELens
    checkpoints), ``compare/`` (one ComparisonReport per pair), ``transfer.json`` and the report
    (``report.json``, ``report.md``, ``report.html``). Re-running with the same ``out_dir`` skips
    every finished step.
    """
    cfg = dataclasses.replace(config or SweepConfig(), **overrides)
    if isinstance(cfg.layers, list):
        cfg.layers = tuple(cfg.layers)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    precisions = _validate(cfg, device)
    baseline = cfg.resolved_baseline()
    t_start = time.time()
    timings: dict[str, float] = {}

    model_path = _resolve_model_path(cfg.model)
    n_layers = _read_n_layers(model_path)
    layers = resolve_layers(cfg.layers, n_layers)
    hook_names = [_hook_name(layer, cfg.hook) for layer in layers]

    from transformers import AutoTokenizer

    from qsae_lens.corpus import corpus_texts, tokenize_corpus_splits

    texts = corpus_texts(cfg.corpus) if isinstance(cfg.corpus, str) else [t for t in cfg.corpus if t.strip()]
    corpus_label = cfg.corpus if isinstance(cfg.corpus, str) else f"(list of {len(texts)} documents)"
    if not texts:
        raise ValueError(f"Corpus {corpus_label!r} is empty: nothing to train on.")
    tok_path = Path(model_path)
    tokenizer = (
        AutoTokenizer.from_pretrained(tok_path.parent, gguf_file=tok_path.name)
        if tok_path.suffix == ".gguf"
        else AutoTokenizer.from_pretrained(model_path)
    )
    max_windows = -(-cfg.train_tokens // cfg.context_size)
    splits = tokenize_corpus_splits(
        tokenizer,
        texts,
        context_size=cfg.context_size,
        max_windows=max_windows,
        max_eval_windows=cfg.eval_windows,
        seed=cfg.seed,
    )
    if len(splits["train"]) == 0 or len(splits["test"]) == 0:
        raise ValueError(f"Corpus {corpus_label!r} produced no train or held-out windows at context {cfg.context_size}.")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_resume_compatible(out / "sweep_config.json", cfg, corpus_label, model_path)
    _write_json(out / "sweep_config.json", {**dataclasses.asdict(cfg), "corpus": corpus_label, "model_path": model_path,
                                            "layers_resolved": layers})
    _log(f"model {model_path} ({n_layers} layers), layers {layers}, precisions {[p.name for p in precisions]}")

    # 3. models and activation caches -------------------------------------------------------
    from qsae_lens.models import load_model

    models: dict[str, Any] = {}
    model_meta: dict[str, dict[str, Any]] = {}
    cache_dirs: dict[tuple[str, str], Path] = {}
    t0 = time.time()
    for p in precisions:
        _log(f"loading the model at {p.name}")
        model = load_model(model_path, p, device=device)
        models[p.name] = model
        model_meta[p.name] = dict(model.precision_metadata)
        for split in ("train", "eval"):
            folder = out / "activations" / p.name / split
            cache_activations(
                model,
                splits["train" if split == "train" else "test"],
                hook_names,
                folder,
                aggregation="all",
                exclude_special_tokens=True,
                progress=progress,
            )
            cache_dirs[(p.name, split)] = folder
    timings["load_and_cache_s"] = time.time() - t0

    # 4. train ---------------------------------------------------------------------------
    from qsae_lens.training.fit import LOSS_HISTORY_FILENAME, train_sae_on_activations

    cells: list[tuple[str, int, int]] = []
    for p in precisions:
        seeds = list(cfg.seeds) + ([cfg.ceiling_seed] if p.name == baseline else [])
        cells += [(p.name, layer, s) for layer in layers for s in seeds]
    t0 = time.time()
    train_stats: dict[str, Any] = {}
    retrained: set[Path] = set()  # cells trained in this run: results computed from their old weights are stale
    # (mean, outlier norm limit) of the vectors SAEs train on, per (precision, hook): filled when a
    # cell loads them, so the transfer matrix does not read the caches again
    train_summary: dict[tuple[str, str], tuple[torch.Tensor, float | None]] = {}

    def summary(p_name: str, hook: str) -> tuple[torch.Tensor, float | None]:
        if (p_name, hook) not in train_summary:
            acts, _, limit = _training_activations(cache_dirs[(p_name, "train")], hook, cfg.max_norm_ratio)
            train_summary[(p_name, hook)] = (acts.mean(0), limit)
        return train_summary[(p_name, hook)]

    for p_name, layer, seed in cells:
        folder = _cell_dir(out, p_name, layer, seed)
        hook = _hook_name(layer, cfg.hook)
        label = f"{p_name}/L{layer}/s{seed}"
        if (folder / "cfg.json").exists():
            _log(f"{label}: already trained, skipping")
            stats_path = folder / "train_stats.json"  # absent if interrupted between the save and this file
            train_stats[label] = json.loads(stats_path.read_text()) if stats_path.exists() else {}
            continue
        acts, n_cached, limit = _training_activations(cache_dirs[(p_name, "train")], hook, cfg.max_norm_ratio)
        train_summary[(p_name, hook)] = (acts.mean(0), limit)
        metadata = {**model_meta[p_name], "hook_name": hook, "model_name": model_path, "init_seed": seed,
                    "dataset_path": f"qsae_lens corpus:{corpus_label}", "context_size": cfg.context_size,
                    "exclude_special_tokens": True,
                    # windows already start with BOS (qsae_lens.corpus), as SAELens expects of tokenized data
                    "prepend_bos": False}
        _log(f"{label}: training {cfg.architecture} d_sae={cfg.d_sae} k={cfg.k} on {acts.shape[0]} cached vectors "
             f"for {cfg.training_samples} samples")
        t_cell = time.time()
        result = train_sae_on_activations(
            _training_config(cfg, acts.shape[1], seed, hook),
            acts,
            total_tokens=cfg.training_samples,
            batch_size=cfg.batch_size,
            lr=cfg.lr,
            data_seed=seed,
            device=device,
            out_dir=folder,
            metadata=metadata,
        )
        seconds = time.time() - t_cell
        stats = {"seconds": seconds, "samples_per_s": cfg.training_samples / seconds,
                 "cached_vectors": n_cached, "outliers_dropped": n_cached - int(acts.shape[0]),
                 "epochs": cfg.training_samples / acts.shape[0],
                 "dead_fraction_train": result.dead_fraction}
        _write_json(folder / "train_stats.json", stats)
        train_stats[label] = stats
        retrained.add(folder)
        del acts, result
        gc.collect()
    timings["train_s"] = time.time() - t0

    from sae_lens import SAE

    import qsae_lens.training  # noqa: F401 - registers architectures for loading

    saes = {f"{p}/L{layer}/s{s}": SAE.load_from_disk(str(_cell_dir(out, p, layer, s)), device=device)
            for p, layer, s in cells}
    loss_histories = {label: json.loads((_cell_dir(out, p, layer, s) / LOSS_HISTORY_FILENAME).read_text())
                      for label, (p, layer, s) in zip(saes, cells)}

    # 5. transfer matrix on fixed held-out tokens ---------------------------------------------
    # attention-sink positions: the same rule as in training, from the baseline's cache; used by the
    # transfer matrix and the activation metrics of the comparisons
    max_norms = None
    if cfg.max_norm_ratio is not None:
        max_norms = {h: summary(baseline, h)[1] for h in hook_names}
    t0 = time.time()
    transfer_path = out / "transfer.json"
    transfer_key = sorted(saes)
    transfer: dict[str, Any] | None = None
    if transfer_path.exists() and not retrained:
        transfer = json.loads(transfer_path.read_text())
        if transfer.get("saes") != transfer_key:
            transfer = None
    if transfer is None:
        from qsae_lens.activations import special_token_ids
        from qsae_lens.evals import evaluate_transfer

        # mean ablation replaces the residual by the mean of exactly the vectors the SAEs trained on
        mean_acts = {(p.name, h): summary(p.name, h)[0] for p in precisions for h in hook_names}
        model_evals, cell_evals = evaluate_transfer(
            models, saes, _eval_tokens(splits["test"]), baseline=baseline, mean_activations=mean_acts,
            special_token_ids=special_token_ids(tokenizer), max_norms=max_norms, progress=progress,
        )
        transfer = {
            "saes": transfer_key,
            "max_norms": max_norms,
            "models": {k: dataclasses.asdict(v) for k, v in model_evals.items()},
            "cells": [dataclasses.asdict(v) for v in cell_evals.values()],
        }
        _write_json(transfer_path, transfer)
    timings["transfer_s"] = time.time() - t0

    saelens_evals: dict[str, Any] = {}
    if cfg.saelens_evals:
        t0 = time.time()
        saelens_evals = _saelens_diagonal_evals(out, models, saes, splits["test"], cfg, progress, reuse=not retrained)
        timings["saelens_run_evals_s"] = time.time() - t0

    # 6. comparisons ----------------------------------------------------------------------
    t0 = time.time()
    comparisons = _run_comparisons(out, cfg, precisions, layers, cache_dirs, device, progress, stale=retrained,
                                   max_norms=max_norms)
    timings["compare_s"] = time.time() - t0
    timings["total_s"] = time.time() - t_start

    # 7. report ----------------------------------------------------------------------------
    from qsae_lens.report.sweep_report import build_sweep_report, write_sweep_report

    report = build_sweep_report(
        config={**dataclasses.asdict(cfg), "corpus": corpus_label, "model_path": model_path, "n_layers": n_layers,
                "layers_resolved": layers, "device": device, "baseline": baseline},
        model_metadata=model_meta,
        transfer=transfer,
        saelens_evals=saelens_evals,
        comparisons=comparisons,
        train_stats=train_stats,
        loss_histories=loss_histories,
        timings=timings,
    )
    write_sweep_report(report, out)
    _log(f"report written to {out / 'report.html'} ({timings['total_s']:.0f} s in all)")
    return SweepResult(out_dir=out, report=report)


def _saelens_diagonal_evals(out: Path, models: dict[str, Any], saes: dict[str, Any], eval_ds: Any,
                            cfg: SweepConfig, progress: bool, reuse: bool = True) -> dict[str, Any]:
    """SAELens's own run_evals for each SAE on its own precision's model (numbers comparable with SAELens work).

    CE/KL there are relative to zero ablation and drawn from other batches than the variance
    metrics; the transfer matrix (evals.py) is the like-for-like comparison.
    """
    path = out / "saelens_run_evals.json"
    if path.exists() and reuse:
        cached = json.loads(path.read_text())
        if sorted(cached) == sorted(saes):
            return cached
    from sae_lens import ActivationsStore
    from sae_lens.evals import EvalConfig, run_evals
    from sae_lens.training.activation_scaler import ActivationScaler

    n_batches = max(1, min(4, len(eval_ds) // 4))
    eval_cfg = EvalConfig(
        batch_size_prompts=4, n_eval_reconstruction_batches=n_batches, n_eval_sparsity_variance_batches=n_batches,
        compute_ce_loss=True, compute_kl=True, compute_variance_metrics=True, compute_sparsity_metrics=True,
        compute_l2_norms=False, compute_featurewise_density_statistics=False,
        compute_featurewise_weight_based_metrics=False,
    )
    results: dict[str, Any] = {}
    for label, sae in saes.items():
        precision = label.split("/")[0]
        model = models[precision]
        if sae.cfg.metadata.prepend_bos is None:
            sae.cfg.metadata.prepend_bos = False  # windows already start with BOS
        store = ActivationsStore.from_sae(
            model=model, sae=sae, dataset=eval_ds, context_size=cfg.context_size, streaming=False,
            store_batch_size_prompts=4, n_batches_in_buffer=4, train_batch_size_tokens=4 * cfg.context_size,
            device=str(sae.W_dec.device),
        )
        metrics, _ = run_evals(sae, store, model, ActivationScaler(), eval_cfg, exclude_special_tokens=True)
        results[label] = _flatten(metrics)
    _write_json(path, results)
    return results


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, float]:
    flat: dict[str, float] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "/"))
        elif isinstance(value, (int, float)):
            flat[name] = float(value)
    return flat


def _random_sae_like(folder: Path, target: Path, seed: int) -> Path:
    """A SAELens checkpoint with the shapes and cfg of ``folder`` and random unit-norm directions (the floor)."""
    if (target / "cfg.json").exists():
        return target
    from safetensors.torch import load_file, save_file

    weights = load_file(str(folder / "sae_weights.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    random_weights = {}
    for name, w in weights.items():
        r = torch.randn(w.shape, generator=gen, dtype=torch.float32)
        if name == "W_dec":
            r = r / r.norm(dim=-1, keepdim=True)
        elif name == "W_enc":
            r = r / r.norm(dim=0, keepdim=True)
        elif name.startswith("b_"):
            r = torch.zeros_like(r)
        random_weights[name] = r.to(w.dtype).contiguous()
    tmp = target.with_name(target.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg.setdefault("metadata", {})["note"] = "random SAE of the same shape: the floor of every alignment metric"
    (tmp / "cfg.json").write_text(json.dumps(cfg))
    save_file(random_weights, str(tmp / "sae_weights.safetensors"))
    os.replace(tmp, target)
    return target


def _comparison_jobs(out: Path, cfg: SweepConfig, precisions: list[Precision], layer: int) -> list[dict[str, Any]]:
    """The pairs the report needs at one layer: ceiling, floor, and same-/different-seed per precision.

    SAEs that share an init seed keep much of their latent order and look alike for that reason
    alone, so each precision is compared with the baseline at the same seed *and* at the ceiling
    seed; the latter is read against the ceiling (baseline seed vs baseline ceiling seed).
    """
    baseline = cfg.resolved_baseline()
    s0 = cfg.seeds[0]
    base0 = _cell_dir(out, baseline, layer, s0)
    base1 = _cell_dir(out, baseline, layer, cfg.ceiling_seed)
    floor = _random_sae_like(base0, out / "saes" / "random" / f"layer{layer}", seed=12345 + layer)
    jobs = [
        {"kind": "ceiling", "a": baseline, "b": baseline, "a_dir": base1, "b_dir": base0, "a_acts": baseline},
        {"kind": "floor", "a": "random", "b": baseline, "a_dir": floor, "b_dir": base0, "a_acts": baseline},
    ]
    for p in precisions:
        if p.name != baseline:
            cell = _cell_dir(out, p.name, layer, s0)
            jobs.append({"kind": "same_seed", "a": p.name, "b": baseline, "a_dir": cell, "b_dir": base0, "a_acts": p.name})
            jobs.append({"kind": "different_seed", "a": p.name, "b": baseline, "a_dir": cell, "b_dir": base1,
                         "a_acts": p.name})
    return jobs


def _eval_activation_pair(cache_dirs: dict[tuple[str, str], Path], precision: str, baseline: str, hook: str,
                          max_norm: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out activations of the same tokens at ``precision`` and at the baseline, rows aligned.

    Rows whose baseline activation is longer than ``max_norm`` (attention sinks; the training rule,
    ``max_norm_ratio`` x the baseline's median training norm) are dropped from both, so that CKA
    and cross-reconstruction are not decided by one token with ~100x the others' norm.
    """
    x_a = load_activations(cache_dirs[(precision, "eval")], hook)
    x_b = load_activations(cache_dirs[(baseline, "eval")], hook)
    if max_norm is not None:
        keep = x_b.norm(dim=-1) <= max_norm
        x_a, x_b = x_a[keep], x_b[keep]
    return x_a, x_b


def _run_comparisons(out: Path, cfg: SweepConfig, precisions: list[Precision], layers: list[int],
                     cache_dirs: dict[tuple[str, str], Path], device: str, progress: bool,
                     stale: set[Path] = frozenset(), max_norms: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """compare_saes for every pair the report needs; each report saved under ``compare/<name>/``.

    Activation metrics use the held-out activations of the same tokens at the two SAEs' precisions.
    """
    from qsae_lens.compare import ComparisonReport, compare_saes

    baseline = cfg.resolved_baseline()
    rows: list[dict[str, Any]] = []
    for layer in layers:
        for job in _comparison_jobs(out, cfg, precisions, layer):
            name = f"L{layer}_{job['kind']}_{job['a']}_vs_{job['b']}"
            hook_name = _hook_name(layer, cfg.hook)
            folder = out / "compare" / name
            if (folder / "report.json").exists() and not ({job["a_dir"], job["b_dir"]} & stale):
                report = ComparisonReport.from_json(folder / "report.json")
            else:
                _log(f"comparing {name}")
                report = compare_saes(
                    str(job["a_dir"]), str(job["b_dir"]),
                    activations=_eval_activation_pair(cache_dirs, job["a_acts"], baseline, hook_name,
                                                      (max_norms or {}).get(hook_name)),
                    hook=hook_name, n_bootstrap=cfg.n_bootstrap,
                    n_permutations=cfg.n_permutations, seed=cfg.seed, device=device, progress=progress,
                )
                report.save(folder)
            rows.append({"name": name, "layer": layer, "kind": job["kind"], "a": job["a"], "b": job["b"],
                         "report": report.to_dict()})
    return rows


# --------------------------------------------------------------------------------------------
# CLI: qsae sweep


def _parse_layers_arg(text: str | None) -> tuple[int, ...] | str | None:
    if text is None or text == "middle":
        return None
    if text == "probe":
        return "probe"
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise SystemExit(f"qsae sweep: --layers takes 'middle', 'probe' or comma-separated ints, got {text!r}") from None


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    d = SweepConfig()
    parser.add_argument("--model", default=None, help="HF id, local folder or .gguf (default: embedded SmolLM2-135M)")
    parser.add_argument("--corpus", default=d.corpus, choices=["stdlib", "shakespeare"])
    parser.add_argument("--precisions", default=",".join(d.precisions), help="comma-separated, first is the baseline")
    parser.add_argument("--baseline", default=None)
    parser.add_argument("--layers", default=None, help="'middle' (default), 'probe', or e.g. 8,16")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds trained at every precision")
    parser.add_argument("--ceiling-seed", type=int, default=d.ceiling_seed)
    parser.add_argument("--architecture", default=d.architecture)
    parser.add_argument("--d-sae", type=int, default=d.d_sae)
    parser.add_argument("--k", type=int, default=d.k)
    parser.add_argument("--train-tokens", type=int, default=d.train_tokens)
    parser.add_argument("--training-samples", type=int, default=d.training_samples)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--max-norm-ratio", type=float, default=d.max_norm_ratio,
                        help="drop training activations with norm above this multiple of the median (0: keep all)")
    parser.add_argument("--eval-windows", type=int, default=d.eval_windows)
    parser.add_argument("--context-size", type=int, default=d.context_size)
    parser.add_argument("--device", default=None)
    parser.add_argument("--no-saelens-evals", action="store_true", help="skip SAELens's run_evals on the diagonal")
    parser.add_argument("--out", default="qsae_runs/sweep", help="output folder (re-running resumes)")


def run_sweep_command(args: argparse.Namespace) -> int:
    cfg = SweepConfig(
        model=args.model,
        corpus=args.corpus,
        precisions=tuple(p.strip() for p in args.precisions.split(",") if p.strip()),
        baseline=args.baseline,
        layers=_parse_layers_arg(args.layers),
        seeds=tuple(int(s) for s in args.seeds.split(",")),
        ceiling_seed=args.ceiling_seed,
        architecture=args.architecture,
        d_sae=args.d_sae,
        k=args.k,
        train_tokens=args.train_tokens,
        training_samples=args.training_samples,
        batch_size=args.batch_size,
        lr=args.lr,
        max_norm_ratio=args.max_norm_ratio or None,
        eval_windows=args.eval_windows,
        context_size=args.context_size,
        device=args.device,
        saelens_evals=not args.no_saelens_evals,
    )
    result = run_precision_sweep(cfg, args.out)
    print(result.markdown_path.read_text())
    return 0
