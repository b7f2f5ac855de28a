"""Sweep step ``crosscoder`` (optional) and ``qsae crosscode``: model diffing between the baseline
precision and each other precision with a BatchTopK crosscoder per (precision, layer, seed).

Per layer a *null* crosscoder is trained on the baseline's training activations given twice (two
identical sources): its relative decoder norms calibrate the exclusivity cut
(:func:`qsae_lens.crosscoder.calibrate_threshold`). Per non-baseline precision, layer and seed, a
crosscoder on (baseline, precision) training caches (same tokens; rows whose baseline norm exceeds
the sweep's attention-sink limit dropped from both) is diffed on the eval caches: counts and
fractions of exclusive latents (mean and percentile-bootstrap CI over seeds when there are several),
the histogram of relative norms, and the fraction of exclusive latents Latent Scaling flags as L1
artefacts. Cheap by default (d_sae 512, 600 steps, first sweep seed only); not run unless asked.
Every result folder is reused only when its inputs are unchanged
(:func:`qsae_lens.sweep.reuse.run_or_reuse`).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from html import escape
from pathlib import Path
from typing import Any

import torch

from qsae_lens.report.section import ReportSection, figure_html, html_table, markdown_table

NAME = "crosscoder"


@dataclass(frozen=True)
class CrosscoderSettings:
    """Budget of the step. Defaults keep it cheap: per layer one null crosscoder plus one per
    non-baseline precision, each 600 steps of 256 rows at d_sae 512."""

    d_sae: int = 512
    k: int = 32
    steps: int = 600
    batch_size: int = 256
    lr: float = 2e-3
    all_seeds: bool = False
    """Train one crosscoder per sweep seed (CIs over seeds) instead of the first seed only."""
    max_null_rate: float = 0.01


@dataclass
class CrosscoderCell:
    """Diffing of one (precision, layer) pair against the baseline, over seeds."""

    precision: str
    layer: int
    seeds: list[int]
    n_alive: list[int]
    only_baseline: list[int]
    """Per seed: latents exclusive to the baseline (features quantization destroys)."""
    only_precision: list[int]
    """Per seed: latents exclusive to this precision (features quantization creates)."""
    artefacts: list[int]
    """Per seed: exclusive latents Latent Scaling flags (present in the other source after all)."""
    explained_variance: list[list[float]]
    """Per seed: [baseline, precision] explained variance on the eval caches."""
    relative_norms: list[float]
    """Relative decoder norms of the first seed's live latents (histogram)."""
    threshold: float
    null_rate: float
    pages: str | None = None
    """Folder of the feature-browser pages of the first seed's exclusive latents (None: no tokenizer)."""

    def fraction(self, which: str) -> tuple[float, float, float]:
        """(mean, CI low, CI high) over seeds of ``which`` ("only_baseline", "only_precision",
        "exclusive", "artefacts" — the last as a fraction of exclusive latents)."""
        from qsae_lens.compare.stats import bootstrap_ci

        excl = [a + b for a, b in zip(self.only_baseline, self.only_precision, strict=True)]
        if which == "artefacts":
            vals = [a / e if e else 0.0 for a, e in zip(self.artefacts, excl, strict=True)]
        else:
            counts = excl if which == "exclusive" else getattr(self, which)
            vals = [c / max(1, n) for c, n in zip(counts, self.n_alive, strict=True)]
        est = bootstrap_ci(vals)
        return est[0], est[1], est[2]


@dataclass
class CrosscoderStepResult:
    """What the crosscoder step produced, keyed ``"<precision>/L<layer>"``."""

    baseline: str
    settings: CrosscoderSettings
    cells: dict[str, CrosscoderCell] = field(default_factory=dict)

    def __repr__(self) -> str:
        parts = [f"{k}: only_base={c.only_baseline}, only_{c.precision}={c.only_precision}, artefacts={c.artefacts}"
                 for k, c in self.cells.items()]
        return f"CrosscoderStepResult(baseline={self.baseline}, {'; '.join(parts)})"


def _cache(plan: Any, precision: str, split: str, layer: int) -> Path:
    """The cache folder holding ``layer`` (plans group caches by layers; an older plan has one per split)."""
    try:
        return plan.cache_dir(precision, split, layer)
    except TypeError:
        return plan.cache_dir(precision, split)


def _cache_id(plan: Any, precision: str, split: str, layer: int) -> str:
    from qsae_lens._io import file_sha256
    from qsae_lens.activations import MANIFEST

    return file_sha256(_cache(plan, precision, split, layer) / MANIFEST)


def _pair(plan: Any, precision: str, layer: int, split: str, max_norm: float | None
          ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """([baseline, precision] aligned Tensor[n, d], keep) with rows whose baseline norm exceeds
    ``max_norm`` dropped; ``keep: Tensor[n_loaded]`` bool says which loaded rows stayed (None: all)."""
    from qsae_lens.activations import load_activations

    hook = plan.hook_name(layer)
    ref = load_activations(_cache(plan, plan.baseline, split, layer), hook)
    other = load_activations(_cache(plan, precision, split, layer), hook)
    if ref.shape != other.shape:
        raise ValueError(f"the {plan.baseline} and {precision} {split} caches of {hook} are not aligned "
                         f"({tuple(ref.shape)} vs {tuple(other.shape)}): recache them with the same tokens")
    keep = None
    if max_norm is not None:
        keep = ref.norm(dim=-1) <= max_norm
        ref, other = ref[keep], other[keep]
    return [ref, other], keep


def _cache_positions(cache: Path, keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(token_ids Tensor[n_windows, ctx], positions Tensor[n] int64): the cached token windows and the
    flat position of each row :func:`load_activations` returns (special tokens dropped as it drops
    them, then ``keep``). None when the cache has no per-position token ids (other aggregations)."""
    import datasets

    from qsae_lens.activations import read_cache_info

    info = read_cache_info(cache)
    ds = datasets.load_from_disk(str(info.path))
    if info.aggregation != "all" or "token_ids" not in ds.column_names:
        return None
    token_ids = ds.with_format("torch", columns=["token_ids"])[:]["token_ids"].long()
    valid = torch.ones_like(token_ids, dtype=torch.bool)
    if info.exclude_special_tokens:
        valid = ~torch.isin(token_ids, torch.tensor(info.special_token_ids, dtype=torch.long))
    positions = valid.flatten().nonzero().flatten()
    return token_ids, positions if keep is None else positions[keep]


def crosscode(plan: Any, precision: str, layers: list[int], *, max_norms: dict[str, float | None] | None = None,
              settings: CrosscoderSettings | None = None, tokenizer: Any = None,
              progress: bool = False) -> CrosscoderStepResult:
    """Train (or reuse) and diff the crosscoders of ``precision`` vs the baseline at ``layers``.

    With a ``tokenizer``, the first seed's exclusive latents also get feature-browser pages
    (``SWEEP_DIR/crosscoder/<precision>/layer<L>/pages/index.html``: top and quantile examples of
    each latent's contribution to each source on the eval caches' tokens)."""
    from qsae_lens.crosscoder import CrossCoder, calibrate_threshold, diff_latents, explained_variance
    from qsae_lens.crosscoder.pages import exclusive_latent_pages
    from qsae_lens.crosscoder.train import train_crosscoder
    from qsae_lens.sweep.reuse import run_or_reuse

    settings = settings or CrosscoderSettings()
    if precision == plan.baseline:
        raise ValueError(f"--precision {precision} is the baseline; choose another of {plan.precision_names}")
    if precision not in plan.precision_names:
        raise ValueError(f"precision {precision!r} is not in this sweep (it has {plan.precision_names})")
    seeds = list(plan.seeds) if settings.all_seeds else list(plan.seeds[:1])
    train_kw = {"d_sae": settings.d_sae, "k": settings.k, "steps": settings.steps, "batch_size": settings.batch_size,
                "lr": settings.lr, "progress": progress}
    result = CrosscoderStepResult(baseline=plan.baseline, settings=settings)
    root = plan.step_dir(NAME)
    for layer in layers:
        hook = plan.hook_name(layer)
        max_norm = (max_norms or {}).get(hook)
        train, _ = _pair(plan, precision, layer, "train", max_norm)
        evals, eval_keep = _pair(plan, precision, layer, "eval", max_norm)
        base_inputs = {"settings": asdict(settings), "hook": hook, "max_norm": max_norm,
                       "baseline_train": _cache_id(plan, plan.baseline, "train", layer)}
        null_dir = root / "null" / f"layer{layer}"
        run_or_reuse(null_dir, base_inputs, lambda tmp, t=train: train_crosscoder(
            [t[0], t[0].clone()], seed=seeds[0], source_names=[plan.baseline, plan.baseline], **train_kw).save(tmp / "cc"))
        calib = calibrate_threshold(CrossCoder.load(null_dir / "cc"), [evals[0], evals[0]],
                                    max_null_rate=settings.max_null_rate)
        cell = CrosscoderCell(precision, layer, seeds, [], [], [], [], [], [], calib.threshold, calib.null_rate)
        for seed in seeds:
            folder = root / precision / f"layer{layer}" / f"seed{seed}"
            inputs = {**base_inputs, "seed": seed, "precision": precision,
                      "precision_train": _cache_id(plan, precision, "train", layer)}
            run_or_reuse(folder, inputs, lambda tmp, s=seed, t=train, h=hook: train_crosscoder(
                t, seed=s, source_names=[plan.baseline, precision], metadata={"hook_name": h},
                **train_kw).save(tmp / "cc"))
            cc = CrossCoder.load(folder / "cc")
            diff = diff_latents(cc, evals, threshold=calib.threshold)
            cell.n_alive.append(diff.n_alive)
            cell.only_baseline.append(diff.count(0))
            cell.only_precision.append(diff.count(1))
            cell.artefacts.append(int(diff.artefact.sum()))
            cell.explained_variance.append([float(v) for v in explained_variance(cc, evals)])
            if not cell.relative_norms:
                cell.relative_norms = [float(v) for v in diff.relative_norm[diff.exclusive_to != -2]]
                located = _cache_positions(_cache(plan, plan.baseline, "eval", layer), eval_keep)
                if tokenizer is not None and located is not None:
                    pages_dir = root / precision / f"layer{layer}" / "pages"
                    exclusive_latent_pages(cc, evals, diff, located[0], located[1], tokenizer, pages_dir,
                                           n_lopsided=16, note=f"{hook}, seed {seed}, eval caches of the sweep; "
                                           "also the 16 shared latents nearest to exclusive.")
                    cell.pages = str(pages_dir.relative_to(plan.out_dir))
        result.cells[f"{precision}/L{layer}"] = cell
    return result


def run_step(plan: Any, core: Any) -> CrosscoderStepResult:
    """Crosscoders of every non-baseline precision at every layer of the sweep (default settings)."""
    merged: CrosscoderStepResult | None = None
    for p in plan.precision_names:
        if p == plan.baseline:
            continue
        res = crosscode(plan, p, list(plan.layers), max_norms=getattr(core, "max_norms", None),
                        tokenizer=getattr(core, "tokenizer", None))
        if merged is None:
            merged = res
        else:
            merged.cells.update(res.cells)
    return merged or CrosscoderStepResult(baseline=plan.baseline, settings=CrosscoderSettings())


def report_section(result: CrosscoderStepResult) -> ReportSection:
    """Table of exclusive-latent fractions per (precision, layer) and the relative-norm histograms."""
    import plotly.graph_objects as go

    header = ["pair", "layer", "seeds", "live", f"only {result.baseline}", "only quantized", "exclusive fraction (CI)",
              "flagged by Latent Scaling", "EV baseline", "EV quantized", "cut"]
    rows = []
    data: dict[str, Any] = {"baseline": result.baseline, "settings": asdict(result.settings), "cells": {}}
    fig = go.Figure()
    for key, c in result.cells.items():
        m, lo, hi = c.fraction("exclusive")
        art = c.fraction("artefacts")[0]
        ev = torch.tensor(c.explained_variance).mean(0).tolist()
        rows.append([f"{result.baseline} vs {c.precision}", c.layer, len(c.seeds), sum(c.n_alive) / len(c.seeds),
                     sum(c.only_baseline) / len(c.seeds), sum(c.only_precision) / len(c.seeds),
                     f"{m:.3f} [{lo:.3f}, {hi:.3f}]", art, ev[0], ev[1], c.threshold])
        data["cells"][key] = {**asdict(c), "exclusive_fraction": [m, lo, hi], "artefact_fraction": art}
        fig.add_trace(go.Histogram(x=c.relative_norms, name=key, xbins={"start": 0, "end": 1, "size": 0.02},
                                   opacity=0.6))
    fig.update_layout(barmode="overlay", title="Relative decoder norm ||d_q|| / (||d_ref|| + ||d_q||) of live latents",
                      xaxis_title="relative norm (0: baseline-only, 1: quantized-only)", yaxis_title="latents")
    note = (f"BatchTopK crosscoder per pair (d_sae {result.settings.d_sae}, k {result.settings.k}, "
            f"{result.settings.steps} steps; each source divided by its mean training norm). A latent is exclusive when "
            "its relative norm is within the cut of 0 or 1; the cut is calibrated on a crosscoder of the baseline "
            "given twice. Latent Scaling flags exclusive latents the other model's activations still need. "
            "The default model's fp32 is dequantized Q4_1.")
    pages = {key: c.pages for key, c in result.cells.items() if c.pages}
    md = note + "\n\n" + markdown_table(header, rows)
    html = f"<p>{note}</p>" + html_table(header, rows) + (figure_html(fig) if result.cells else "")
    if pages:  # paths relative to the sweep folder, where the sweep report lives
        md += "\n\nFeature pages of the exclusive latents: " + ", ".join(
            f"[{key}]({path}/index.html)" for key, path in pages.items())
        html += "<p>Feature pages of the exclusive latents: " + ", ".join(
            f"<a href='{escape(path)}/index.html'>{escape(key)}</a>" for key, path in pages.items()) + "</p>"
    return ReportSection(key=NAME, title="Crosscoder model diffing", order=46, data=data, markdown=md, html=html)


# --------------------------------------------------------------------------- CLI: qsae crosscode


def _plan_from_folder(sweep_dir: Path) -> Any:
    """A SweepPlan for an existing sweep folder, from its ``sweep_config.json``."""
    from qsae_lens.precision import parse_precision
    from qsae_lens.sweep.plan import SweepPlan

    cfg_path = sweep_dir / "sweep_config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{sweep_dir} has no sweep_config.json: give the output folder of `qsae sweep`")
    cfg = json.loads(cfg_path.read_text())
    precisions = tuple(parse_precision(p) for p in cfg["precisions"])
    baseline = cfg.get("baseline") or precisions[0].name
    return SweepPlan(config=cfg, out_dir=sweep_dir, model_path=cfg.get("model_path", ""), n_layers=0,
                     layers=tuple(cfg["layers_resolved"]), hook=cfg.get("hook", "hook_resid_post"),
                     precisions=precisions, baseline=baseline, seeds=tuple(cfg.get("seeds", (0,))), cells=(),
                     device="cpu")


def _max_norms(plan: Any, layers: list[int]) -> dict[str, float | None]:
    """The sweep's attention-sink rule: baseline training norm > max_norm_ratio x its median."""
    from qsae_lens.activations import load_activations

    ratio = plan.config.get("max_norm_ratio", 10.0)
    out: dict[str, float | None] = {}
    for layer in layers:
        hook = plan.hook_name(layer)
        out[hook] = None if ratio is None else ratio * float(
            load_activations(_cache(plan, plan.baseline, "train", layer), hook).norm(dim=-1).median())
    return out


def add_crosscode_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep_dir", type=Path, help="output folder of `qsae sweep` (its activation caches are read)")
    parser.add_argument("--precision", required=True, help="the quantized precision to diff against the baseline, e.g. nf4")
    parser.add_argument("--layers", default=None, help="comma-separated layers (default: all of the sweep's)")
    d = CrosscoderSettings()
    parser.add_argument("--d-sae", type=int, default=d.d_sae)
    parser.add_argument("--k", type=int, default=d.k)
    parser.add_argument("--steps", type=int, default=d.steps)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--all-seeds", action="store_true", help="one crosscoder per sweep seed (CIs over seeds)")


def run_crosscode_command(args: argparse.Namespace) -> int:
    plan = _plan_from_folder(args.sweep_dir)
    if args.layers:
        try:
            layers = [int(x) for x in args.layers.split(",")]
        except ValueError:
            raise ValueError(f"--layers takes integers like '8,16', got {args.layers!r}") from None
        missing = sorted(set(layers) - set(plan.layers))
        if missing:
            raise ValueError(f"layers {missing} are not in this sweep (it has {list(plan.layers)})")
    else:
        layers = list(plan.layers)
    settings = CrosscoderSettings(d_sae=args.d_sae, k=args.k, steps=args.steps, batch_size=args.batch_size,
                                  lr=args.lr, all_seeds=args.all_seeds)
    tokenizer = None
    if plan.model_path and Path(plan.model_path).exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(plan.model_path)
    else:
        print(f"note: the sweep's model_path {plan.model_path!r} is not a local folder: no feature pages written",
              file=sys.stderr)
    result = crosscode(plan, args.precision, layers, max_norms=_max_norms(plan, layers), settings=settings,
                       tokenizer=tokenizer, progress=sys.stderr.isatty())
    section = report_section(result)
    from qsae_lens._io import atomic_write_json, atomic_write_text

    out = plan.step_dir(NAME)
    atomic_write_json(out / f"report_{args.precision}.json", section.data)
    atomic_write_text(out / f"report_{args.precision}.md", f"## {section.title}\n\n{section.markdown}\n")
    print(section.markdown)
    print(f"\nwritten: {out / f'report_{args.precision}.md'}")
    return 0
