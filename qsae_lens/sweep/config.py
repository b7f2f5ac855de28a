"""``SweepConfig``: every setting a sweep's results depend on, validated in one place.

The ``qsae sweep`` flags are generated from the fields below and their docstrings
(:func:`add_config_arguments`), so a setting is declared once. :func:`validate_config` is run by the
CLI and by :func:`qsae_lens.sweep.run_precision_sweep` before any work: every bad input is a
ValueError (or FileNotFoundError for a missing model) whose one-line message says what to change.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import os
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEFAULT_PRECISIONS = ("fp32", "int8", "nf4", "fp4")
DEFAULT_ANALYSES: tuple[str, ...] = ("seeds", "survival", "interventions", "probing", "bitwidth")
"""Analyses run when none are named: the seed-level headline and the cheap analyses (about 4 minutes
together on the default sweep, 2-core CPU). The crosscoder is opt-in (``--analyses ...,crosscoder``)."""


@dataclasses.dataclass
class SweepConfig:
    """Everything a sweep's results depend on; saved as ``sweep_config.json`` so a run can be reproduced.

    The defaults are sized for the embedded SmolLM2-135M on a 2-core CPU.
    """

    model: str | None = None
    """HF hub id, local folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)."""
    corpus: str | Sequence[str] = "stdlib"
    """Corpus: "stdlib" (Python source), "shakespeare", or (Python API) a list of documents."""
    precisions: tuple[str, ...] = DEFAULT_PRECISIONS
    """Comma-separated precisions, e.g. fp32,int8,nf4,fp4 (the first is the baseline unless --baseline)."""
    baseline: str | None = None
    """Precision every other is compared with (default: the first of --precisions)."""
    layers: tuple[int, ...] | str | None = None
    """Layers: 'middle' (the middle probe layer), 'probe' (the methodology's probe set) or e.g. 8,16."""
    hook: str = "hook_resid_post"
    """Hook suffix read at each layer."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Comma-separated init/data seeds trained at every precision (baseline seed pairs are the ceiling)."""
    architecture: str = "openai_topk"
    """SAE architecture (a name registered in qsae_lens.training.ARCHITECTURES)."""
    d_sae: int = 1024
    """Number of SAE latents (1024: its seed pairs share features above the anisotropic null; docs/sweep.md)."""
    k: int = 32
    """Active latents per token (TopK architectures); must be < d_sae."""
    train_tokens: int = 24_576
    """Distinct tokens whose activations are cached per precision (the LM-forward cost)."""
    training_samples: int = 307_200
    """Activation vectors each SAE trains on (epochs = training_samples / cached vectors)."""
    batch_size: int = 256
    """SAE training batch size (activation vectors)."""
    lr: float = 2e-3
    """SAE learning rate."""
    dead_tokens_threshold: int = 50_000
    """Tokens without firing before a latent counts as dead for aux-k (paper: 10M; scaled to the budget)."""
    max_norm_ratio: float | None = 10.0
    """Attention-sink rule: drop activations longer than this multiple of the median norm (0/None keeps all)."""
    eval_windows: int = 16
    """Held-out windows (of context_size tokens) for the transfer matrix and comparisons."""
    context_size: int = 128
    """Tokens per window."""
    device: str | None = None
    """Device (default: cuda if available, else cpu)."""
    saelens_evals: bool = True
    """Also run SAELens's run_evals for each SAE on its own model (the diagonal)."""
    n_bootstrap: int = 1000
    """Bootstrap resamples for confidence intervals (comparisons and the transfer matrix)."""
    n_permutations: int = 2000
    """Permutations for the comparisons' permutation tests."""
    seed: int = 0
    """Seed of the corpus split and of the statistics."""
    analyses: tuple[str, ...] | None = None
    """Comma-separated analysis steps to run (see qsae_lens.sweep.steps.ANALYSES); default: seeds,survival,interventions,probing,bitwidth."""
    wandb: bool = False
    """Log each training job to wandb as its own run (offline without credentials; $WANDB_MODE honoured)."""
    wandb_project: str = "qsae_lens"
    """wandb project of those runs."""

    def resolved_baseline(self) -> str:
        """The baseline precision name."""
        return self.baseline or self.precisions[0]

    def resolved_analyses(self) -> tuple[str, ...]:
        """The analyses to run (the default set when None)."""
        return DEFAULT_ANALYSES if self.analyses is None else tuple(self.analyses)


# --------------------------------------------------------------------------------------------
# validation

_POSITIVE_INTS = ("d_sae", "train_tokens", "training_samples", "batch_size", "eval_windows", "context_size",
                  "dead_tokens_threshold")


def _as_tuple(value: Any, name: str, kind: type) -> tuple[Any, ...]:
    if isinstance(value, str):
        value = [v for v in value.replace(" ", ",").split(",") if v]
    try:
        out = tuple(kind(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be comma-separated {kind.__name__}s; got {value!r}.") from None
    if not out:
        raise ValueError(f"{name} is empty: give at least one value.")
    return out


def normalize_config(cfg: SweepConfig) -> SweepConfig:
    """A copy with lists as tuples and strings split, so the same settings compare and hash equal."""
    from qsae_lens.layers import parse_layers_arg

    changes: dict[str, Any] = {
        "precisions": tuple(p.strip().lower() for p in _as_tuple(cfg.precisions, "precisions", str)),
        "seeds": _as_tuple(cfg.seeds, "seeds", int),
    }
    layers = cfg.layers
    changes["layers"] = parse_layers_arg(layers) if isinstance(layers, str) else (
        None if layers is None else _as_tuple(layers, "layers", int))
    if cfg.analyses is not None:
        changes["analyses"] = tuple(a.strip() for a in (cfg.analyses.split(",") if isinstance(cfg.analyses, str)
                                                        else cfg.analyses) if a.strip())
    if cfg.max_norm_ratio == 0:
        changes["max_norm_ratio"] = None
    if not isinstance(cfg.corpus, str):
        changes["corpus"] = tuple(cfg.corpus)
    return dataclasses.replace(cfg, **changes)


def _check_numbers(cfg: SweepConfig) -> None:
    for name in _POSITIVE_INTS:
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name.replace('_', '-')} must be a positive integer; got {value!r}.")
    if isinstance(cfg.k, bool) or not isinstance(cfg.k, int) or not 1 <= cfg.k < cfg.d_sae:
        raise ValueError(f"k must be an integer with 1 <= k < d_sae={cfg.d_sae}; got {cfg.k!r}.")
    if not (isinstance(cfg.lr, (int, float)) and 0 < cfg.lr < float("inf")):
        raise ValueError(f"lr must be a positive finite number; got {cfg.lr!r}.")
    if cfg.max_norm_ratio is not None and not cfg.max_norm_ratio > 1:
        raise ValueError(f"max_norm_ratio={cfg.max_norm_ratio} would drop most activations: use a value > 1, or 0/None.")
    if cfg.context_size < 2:
        raise ValueError(f"context-size must be at least 2 tokens; got {cfg.context_size}.")
    if cfg.train_tokens < 4 * cfg.batch_size:
        raise ValueError(f"train_tokens={cfg.train_tokens} is too small to train an SAE: cache at least 4 batches "
                         f"({4 * cfg.batch_size} tokens) of activations, or lower batch_size.")
    if cfg.training_samples < 10 * cfg.batch_size:
        raise ValueError(f"training_samples={cfg.training_samples} gives fewer than 10 steps of batch "
                         f"{cfg.batch_size}: raise the budget or lower batch_size.")
    for name in ("n_bootstrap", "n_permutations"):
        if not isinstance(getattr(cfg, name), int) or getattr(cfg, name) < 0:
            raise ValueError(f"{name} must be a non-negative integer; got {getattr(cfg, name)!r}.")
    if len(set(cfg.seeds)) != len(cfg.seeds) or any(s < 0 for s in cfg.seeds):
        raise ValueError(f"seeds must be distinct non-negative integers; got {cfg.seeds}.")
    if len(cfg.seeds) < 2:
        raise ValueError(f"seeds={cfg.seeds}: at least two seeds are needed (their pairs are the seed-to-seed ceiling).")


def _check_precisions(cfg: SweepConfig, device: str | None) -> None:
    from qsae_lens.precision import check_precision_runs_on, parse_precision

    names = [parse_precision(p).name for p in cfg.precisions]
    if len(set(names)) != len(names):
        raise ValueError(f"precisions contain duplicates: {list(cfg.precisions)}.")
    if cfg.resolved_baseline() not in names:
        raise ValueError(f"baseline {cfg.resolved_baseline()!r} is not among the precisions {names}.")
    if device is not None:
        for p in cfg.precisions:
            check_precision_runs_on(parse_precision(p), device)


def _check_corpus(cfg: SweepConfig) -> None:
    if isinstance(cfg.corpus, str):
        from qsae_lens.corpus import CORPORA

        if cfg.corpus not in CORPORA:
            raise ValueError(f"Unknown corpus {cfg.corpus!r}: choose one of {list(CORPORA)} or pass a list of strings.")
    elif not any(isinstance(t, str) and t.strip() for t in cfg.corpus):
        raise ValueError("The corpus is empty: it holds no non-blank text. Pass at least one non-empty document.")


def _check_analyses(cfg: SweepConfig) -> None:
    import importlib.util

    from qsae_lens.sweep.steps import ANALYSES

    for name in cfg.resolved_analyses():
        if name not in ANALYSES:
            raise ValueError(f"Unknown analysis {name!r}: choose from {sorted(ANALYSES)}.")
        if importlib.util.find_spec(ANALYSES[name]) is None:
            raise ValueError(f"Analysis {name!r} is registered but its module {ANALYSES[name]} is not installed.")


def resolve_model_path(model: str | None) -> str:
    """The model argument -> a local path or hub id, checked with qsae_lens's own messages.

    None -> the embedded SmolLM2. A local path must be a folder holding config.json or a .gguf file;
    a string that is not a local path must look like a hub id ``owner/name``.
    """
    if model is None:
        from qsae_lens.assets import default_model_path

        return str(default_model_path())
    path = Path(model).expanduser()
    if path.exists():
        if path.is_file() and path.suffix == ".gguf":
            return str(path)
        if path.is_dir() and (path / "config.json").is_file():
            return str(path)
        raise ValueError(f"--model {model!r} is not a model: expected a folder with config.json or a .gguf file.")
    looks_local = model.startswith((".", "/", "~")) or model.endswith(".gguf") or os.sep in model.strip("/").split("/", 1)[-1]
    if looks_local or model.count("/") != 1 or not all(model.split("/")):
        raise FileNotFoundError(f"--model {model!r}: no such file or folder, and not a hub id like 'owner/name'.")
    return model


@functools.lru_cache(maxsize=16)
def read_n_layers(model_path: str) -> int:
    """Number of transformer blocks, from the model's config (no weights are loaded)."""
    from transformers import AutoConfig

    path = Path(model_path)
    try:
        if path.suffix == ".gguf":
            cfg = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        else:
            cfg = AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError) as e:
        raise ValueError(f"--model {model_path!r}: cannot read its config ({str(e).splitlines()[0]}).") from None
    text_cfg = getattr(cfg, "text_config", None) or cfg
    n = getattr(text_cfg, "num_hidden_layers", None) or getattr(text_cfg, "n_layer", None)
    if n is None:
        raise ValueError(f"Cannot tell how many layers {model_path} has from its config.")
    return int(n)


class ValidatedConfig(typing.NamedTuple):
    """What validation resolved, beside the normalised config."""

    config: SweepConfig
    model_path: str
    n_layers: int
    layers: tuple[int, ...]
    device: str


def validate_config(cfg: SweepConfig, out_dir: str | os.PathLike[str] | None = None) -> ValidatedConfig:
    """Check every setting before any work; raise ValueError/FileNotFoundError with a one-line message.

    Cheap checks come first (numbers, precisions, corpus, output folder), then the model's config
    (its depth, for the layers), then the architecture registry (importing it imports sae_lens, ~14 s).
    """
    import torch

    from qsae_lens.layers import resolve_layers

    cfg = normalize_config(cfg)
    _check_numbers(cfg)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    _check_precisions(cfg, device)
    _check_corpus(cfg)
    _check_analyses(cfg)
    if out_dir is not None and Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise ValueError(f"--out {str(out_dir)!r} is a file, not a folder: choose a folder for the sweep's outputs.")
    model_path = resolve_model_path(cfg.model)
    n_layers = read_n_layers(model_path)
    layers = tuple(resolve_layers(cfg.layers, n_layers))
    from qsae_lens.training import ARCHITECTURES

    if cfg.architecture not in ARCHITECTURES:
        raise ValueError(f"Unknown architecture {cfg.architecture!r}; registered: {sorted(ARCHITECTURES)}.")
    return ValidatedConfig(cfg, model_path, n_layers, layers, device)


# --------------------------------------------------------------------------------------------
# CLI flags generated from the fields


@functools.lru_cache(maxsize=1)
def field_docs() -> dict[str, str]:
    """``{field name: docstring}`` of :class:`SweepConfig`, read from its source (attribute docstrings)."""
    tree = ast.parse(inspect.getsource(SweepConfig))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())  # type: ignore[union-attr]
    return docs


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`SweepConfig` field, help from its docstring; values stay strings or None.

    Conversion and checks happen in :func:`config_from_args` / :func:`validate_config`, so a bad
    value gets the same one-line message from the CLI and the API.
    """
    defaults = SweepConfig()
    docs = field_docs()
    for f in dataclasses.fields(SweepConfig):
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            parser.add_argument(_flag(f"no_{f.name}") if default else _flag(f.name), dest=f.name,
                                action="store_false" if default else "store_true", default=default,
                                help=docs.get(f.name, "") + (" (on by default; this flag turns it off)" if default else ""))
            continue
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        parser.add_argument(_flag(f.name), dest=f.name, default=None, metavar=f.name.upper(),
                            help=f"{docs.get(f.name, '')} [default: {shown}]")


def config_from_args(args: argparse.Namespace) -> SweepConfig:
    """The parsed flags -> a :class:`SweepConfig` (unset flags keep the defaults); ValueError on a bad number."""
    hints = typing.get_type_hints(SweepConfig)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(SweepConfig):
        raw = getattr(args, f.name, None)
        if raw is None or isinstance(raw, bool):
            if isinstance(raw, bool):
                values[f.name] = raw
            continue
        kind = hints[f.name]
        try:
            if kind in (int,):
                values[f.name] = int(raw)
            elif kind in (float, float | None):
                values[f.name] = float(raw)
            else:
                values[f.name] = raw  # strings; tuples and layers are split by normalize_config
        except ValueError:
            raise ValueError(f"{_flag(f.name)} takes a number; got {raw!r}.") from None
    return SweepConfig(**values)
