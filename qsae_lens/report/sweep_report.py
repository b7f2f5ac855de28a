"""The sweep's report: ``report.json``, ``report.md`` and one self-contained ``report.html``.

Built from :class:`~qsae_lens.report.section.ReportSection` s, one per step (headline 0, the
models' own cost 10, transfer 20, alignment 30, analyses 40+, SAELens run_evals 50, training 60,
timings 90); :mod:`qsae_lens.report.html` sorts them and inlines plotly.js once. The page opens with
the **headline**: per layer and precision, how well quantized SAEs align with the baseline's
(different seeds) read against the **ceiling** (every pair of baseline seeds) and the **floor**
(a random SAE), and what splicing the baseline's SAE into the quantized model costs, with intervals;
a warning replaces the conclusion when the ceiling does not stand clear of the floor.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import statistics
from pathlib import Path
from typing import Any

from qsae_lens.report.section import ReportSection, figure_html, html_table, markdown_table

REPORT_SCHEMA_VERSION = "2.0"
HEADLINE_METRIC = "decoder_matched_cosine"
TABLE_METRICS = ("decoder_matched_cosine", "decoder_cosine_best_match_ab", "activation_cka",
                 "latent_activation_correlation_matched", "cross_reconstruction_explained_variance_ab")


@dataclasses.dataclass
class SweepParts:
    """What the sweep's steps returned, handed to :func:`write_report`."""

    config: dict[str, Any]
    model_metadata: dict[str, dict[str, Any]]
    trained: Any
    """:class:`qsae_lens.sweep.train.TrainResult`."""
    transfer: Any
    """:class:`qsae_lens.sweep.evaluate.TransferResult`."""
    saelens_evals: dict[str, dict[str, float]]
    comparisons: Any
    """:class:`qsae_lens.sweep.comparisons.ComparisonsResult`."""
    timings: dict[str, float]
    """Wall seconds of each step in this run."""
    extra_sections: list[ReportSection]
    plan: Any


def _metric(report: Any, name: str) -> dict[str, Any] | None:
    m = report.metrics.get(name)
    return None if m is None else m.to_dict()


def _value(m: dict[str, Any] | None) -> float | None:
    v = None if m is None else m.get("value")
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def _ci(value: float | None, ci: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def _m(m: dict[str, Any] | None) -> str:
    return "—" if _value(m) is None else _ci(_value(m), (m["ci_low"], m["ci_high"]) if m.get("ci_low") is not None
                                                else None)


# --------------------------------------------------------------------------------------------
# headline


def layer_summary(parts: SweepParts, layer: int) -> dict[str, Any]:
    """Per layer: ceiling (every baseline seed pair), floor, and each precision's different-seed alignment."""
    rows = parts.comparisons.at(layer)
    vals = {kind: [_value(_metric(r.report, HEADLINE_METRIC)) for r in rows if r.pair.kind == kind]
            for kind in ("ceiling", "floor")}
    ceiling = [v for v in vals["ceiling"] if v is not None]
    floor = next(iter(v for v in vals["floor"] if v is not None), None)
    floor_hi = next((_metric(r.report, HEADLINE_METRIC) or {}).get("ci_high") for r in rows if r.pair.kind == "floor") \
        if floor is not None else None
    ceiling_lows = [(_metric(r.report, HEADLINE_METRIC) or {}).get("ci_low") for r in rows if r.pair.kind == "ceiling"]
    summary: dict[str, Any] = {"layer": layer, "ceiling_pairs": ceiling, "floor": floor, "precisions": {}, "warnings": []}
    summary["ceiling"] = statistics.fmean(ceiling) if ceiling else None
    clear = (ceiling and floor is not None and min(c if c is not None else -1 for c in ceiling_lows) > (floor_hi or floor)
             and summary["ceiling"] - floor > 0.05)
    if not clear:
        summary["warnings"].append(
            f"layer {layer}: the seed-to-seed ceiling (matched cosine {_ci(summary['ceiling'], None)}) does not stand "
            f"clear of the random floor ({_ci(floor, None)}); train longer (raise training_samples / train_tokens) "
            "before reading precision effects.")
    for p in {r.pair.a.precision for r in rows if r.pair.kind == "different_seed"}:
        diff = [v for r in rows if r.pair.kind == "different_seed" and r.pair.a.precision == p
                and (v := _value(_metric(r.report, HEADLINE_METRIC))) is not None]
        mean = statistics.fmean(diff) if diff else None
        share = ((mean - floor) / (summary["ceiling"] - floor)
                 if clear and mean is not None and summary["ceiling"] - floor > 1e-9 else None)
        summary["precisions"][p] = {"different_seed_pairs": diff, "different_seed_mean": mean,
                                    "effect_vs_ceiling": None if mean is None or not ceiling else mean - summary["ceiling"],
                                    "share_of_ceiling_above_floor": share,
                                    "within_seed_range": bool(ceiling and mean is not None and mean >= min(ceiling))}
    return summary


def _headline_sentence(parts: SweepParts, s: dict[str, Any], p: str) -> str:
    plan, tr = parts.plan, parts.transfer
    e = s["precisions"][p]
    s0 = min(plan.seeds)
    base_key = next(k for k in plan.cells if k.precision == plan.baseline and k.layer == s["layer"] and k.seed == s0)
    on_p, on_base = tr.cell(base_key, p), tr.cell(base_key, plan.baseline)
    verdict = ("within the seed-to-seed range: no feature change beyond training noise" if e["within_seed_range"]
               else "below the seed-to-seed range: the features change")
    ceiling = s["ceiling_pairs"]
    text = (f"Layer {s['layer']}, {p}: matched decoder cosine to {plan.baseline} SAEs {_ci(e['different_seed_mean'], None)} "
            f"(mean of {len(e['different_seed_pairs'])} different-seed pairs) against a ceiling of "
            f"{_ci(s['ceiling'], None)} (range {min(ceiling):.3f}–{max(ceiling):.3f} over {len(ceiling)} baseline seed "
            f"pairs) and a random floor of {_ci(s['floor'], None)}: {verdict}.") if ceiling else ""
    if on_p is not None and on_base is not None:
        text += (f" The {base_key.label} SAE spliced into the {p} model explains {_ci(on_p.explained_variance, on_p.explained_variance_ci)}"
                 f" of the variance (on its own model {_ci(on_base.explained_variance, on_base.explained_variance_ci)}),"
                 f" ΔCE {_ci(on_p.ce_increase, on_p.ce_increase_ci)} nats (95% bootstrap over held-out windows).")
    return text


def headline_section(parts: SweepParts) -> ReportSection:
    summaries = [layer_summary(parts, layer) for layer in parts.plan.layers]
    sentences, warnings = [], [w for s in summaries for w in s["warnings"]]
    for s in summaries:
        if not s["warnings"]:
            sentences += [_headline_sentence(parts, s, p) for p in sorted(s["precisions"])]
    import html as _html

    body_html = "".join(f"<p class='warning'><b>No conclusion.</b> {_html.escape(w)}</p>" for w in warnings)
    body_html += "".join(f"<p class='headline'>{_html.escape(t)}</p>" for t in sentences)
    notes = parts.config.get("notes", [])
    body_html += "".join(f"<p><i>Note.</i> {_html.escape(n)}</p>" for n in notes)
    md = "\n\n".join([*(f"> **No conclusion.** {w}" for w in warnings), *(f"**{t}**" for t in sentences),
                      *(f"> **Note.** {n}" for n in notes)])
    return ReportSection("headline", "Does this model's SAE features survive quantization?", 0,
                         {"summary": summaries, "sentences": sentences, "warnings": warnings}, md, body_html)


# --------------------------------------------------------------------------------------------
# the steps' sections


def models_section(parts: SweepParts) -> ReportSection:
    header = ["precision", "quant type", "compute dtype", "CE (nats)", "ΔCE vs baseline", "KL vs baseline"]
    rows = []
    for p, ev in parts.transfer.models.items():
        meta = parts.model_metadata.get(p, {})
        rows.append([p, meta.get("quant_type") or "—", meta.get("compute_dtype") or "—", ev.ce_loss,
                     ev.ce_increase_vs_baseline, ev.kl_vs_baseline])
    data = {p: {**parts.model_metadata.get(p, {}), **dataclasses.asdict(ev)} for p, ev in parts.transfer.models.items()}
    return ReportSection("models", "The model's own quantization cost (held-out tokens)", 10, data,
                         markdown_table(header, rows), html_table(header, rows))


def _transfer_figure(parts: SweepParts, layer: int) -> str:
    import plotly.graph_objects as go

    precisions = parts.plan.precision_names
    z = [[statistics.fmean([c.explained_variance for k in parts.plan.cells_at(p, layer)
                            if (c := parts.transfer.cell(k, q)) is not None] or [float("nan")])
          for q in precisions] for p in precisions]
    fig = go.Figure(go.Heatmap(z=z, x=precisions, y=precisions, colorscale="Viridis", texttemplate="%{z:.3f}"))
    fig.update_layout(title=f"Layer {layer}: explained variance (mean over seeds)", height=380,
                      xaxis_title="model precision", yaxis_title="SAE trained at")
    fig.update_yaxes(autorange="reversed")
    return figure_html(fig)


def transfer_section(parts: SweepParts) -> ReportSection:
    from qsae_lens.report.html import side_by_side

    precisions = parts.plan.precision_names
    header = ["SAE \\ model", *precisions]
    md, body = [], []
    for layer in parts.plan.layers:
        rows = [[k.label, *[("—" if (c := parts.transfer.cell(k, q)) is None else
                             f"{_ci(c.explained_variance, c.explained_variance_ci)} / "
                             f"{_ci(c.ce_increase, c.ce_increase_ci)}") for q in precisions]]
                for k in parts.plan.cells_at(layer=layer)]
        caption = (f"Layer {layer}: explained variance / ΔCE (nats) with the row's SAE spliced into the column's model; "
                   "95% bootstrap intervals over held-out windows; every seed's row (the baseline seeds' rows are the yardstick)")
        md += [f"**{caption}**", markdown_table(header, rows)]
        body.append(side_by_side(html_table(header, rows, caption=caption), _transfer_figure(parts, layer)))
    data = {"max_norms": parts.transfer.max_norms,
            "cells": [dataclasses.asdict(c) for c in parts.transfer.cells.values()]}
    return ReportSection("transfer", "Transfer: SAEs spliced across precisions", 20, data, "\n\n".join(md), "".join(body))


def _alignment_figure(parts: SweepParts, layer: int) -> str:
    import plotly.graph_objects as go

    fig = go.Figure()
    s0 = min(parts.plan.seeds)
    for r in parts.comparisons.at(layer):
        if r.pair.kind == "same_seed" or (r.pair.kind == "different_seed" and r.pair.b.seed != s0):
            continue
        hist = (r.report.distributions.get(HEADLINE_METRIC) or {}).get("histogram")
        if not hist:
            continue
        edges, counts = hist["edges"], hist["counts"]
        total = max(sum(counts), 1)
        fig.add_trace(go.Scatter(x=[(edges[i] + edges[i + 1]) / 2 for i in range(len(counts))],
                                 y=[n / total for n in counts], mode="lines", name=f"{r.pair.kind}: {r.pair.a.label} vs "
                                 f"{r.pair.b.label}", line={"dash": {"ceiling": "dash", "floor": "dot"}.get(r.pair.kind),
                                                            "shape": "hvh"}))
    fig.update_layout(title=f"Layer {layer}: matched decoder cosine per latent", xaxis_title="cosine",
                      yaxis_title="fraction of latents", height=380)
    return figure_html(fig)


def alignment_section(parts: SweepParts) -> ReportSection:
    from qsae_lens.report.html import side_by_side

    header = ["kind", "SAE a", "SAE b", *TABLE_METRICS]
    md, body, data = [], [], []
    for layer in parts.plan.layers:
        rows = [[r.pair.kind, r.pair.a.label, r.pair.b.label, *[_m(_metric(r.report, m)) for m in TABLE_METRICS]]
                for r in parts.comparisons.at(layer)]
        caption = f"Layer {layer}: every comparison (value [95% CI])"
        md += [f"**{caption}**", markdown_table(header, rows)]
        body.append(side_by_side(html_table(header, rows, caption=caption), _alignment_figure(parts, layer)))
        data += [{"name": r.pair.name, "layer": layer, "kind": r.pair.kind, "a": r.pair.a.label, "b": r.pair.b.label,
                  "metrics": {m: _metric(r.report, m) for m in r.report.metrics},
                  "latent_categories": r.report.latent_categories, "warnings": r.report.warnings}
                 for r in parts.comparisons.at(layer)]
    return ReportSection("alignment", "Feature alignment against the baseline", 30, {"comparisons": data},
                         "\n\n".join(md), "".join(body))


def saelens_section(parts: SweepParts) -> ReportSection:
    header = ["SAE", "explained variance", "CE loss score", "L0"]
    rows = [[k, m.get("reconstruction_quality/explained_variance"), m.get("model_performance_preservation/ce_loss_score"),
             m.get("sparsity/l0")] for k, m in sorted(parts.saelens_evals.items())]
    note = "Each SAE on its own model; CE recovered there is against zero ablation."
    return ReportSection("saelens_run_evals", "SAELens run_evals (diagonal)", 50, parts.saelens_evals,
                         note + "\n\n" + markdown_table(header, rows), f"<p>{note}</p>" + html_table(header, rows))


def _loss_figure(parts: SweepParts) -> str:
    import plotly.graph_objects as go

    from qsae_lens.training.fit import LOSS_HISTORY_FILENAME

    fig = go.Figure()
    for key, cell in parts.trained.cells.items():
        path = cell.folder / LOSS_HISTORY_FILENAME
        rows = json.loads(path.read_text()) if path.exists() else []
        rows = rows[:: max(1, len(rows) // 200)]
        name = "mse_loss" if rows and "mse_loss" in rows[0] else "loss"
        fig.add_trace(go.Scatter(x=[r["tokens"] for r in rows], y=[r.get(name) for r in rows], mode="lines",
                                 name=key.label))
    fig.update_layout(title="Training loss", xaxis_title="training samples", yaxis_type="log", height=380)
    return figure_html(fig)


def training_section(parts: SweepParts) -> ReportSection:
    from qsae_lens.report.html import side_by_side

    header = ["cell", "seconds", "samples/s", "cached vectors", "sinks dropped", "epochs", "dead fraction", "this run"]
    rows = [[k.label, c.stats.get("seconds"), c.stats.get("samples_per_s"), c.stats.get("cached_vectors"),
             c.stats.get("outliers_dropped"), c.stats.get("epochs"), c.stats.get("dead_fraction_train"),
             "trained" if c.computed else "reused"] for k, c in parts.trained.cells.items()]
    data = {k.label: {**c.stats, "trained_in_this_run": c.computed} for k, c in parts.trained.cells.items()}
    return ReportSection("training", "Training", 60, data, markdown_table(header, rows),
                         side_by_side(html_table(header, rows), _loss_figure(parts)))


def timings_section(parts: SweepParts) -> ReportSection:
    note = ("Wall seconds of each step in this run (a reused step takes ~0 s here); each cell's own training "
            "time, from the run that trained it, is in the training table.")
    rows = [[k, v] for k, v in parts.timings.items()]
    return ReportSection("timings", "Timings", 90, {"this_run_s": parts.timings},
                         note + "\n\n" + markdown_table(["step", "seconds"], rows, 1),
                         f"<p>{note}</p>" + html_table(["step", "seconds"], rows, 1))


def sweep_sections(parts: SweepParts) -> list[ReportSection]:
    """Every section of the sweep's report (the analyses' sections included)."""
    sections = [headline_section(parts), models_section(parts), transfer_section(parts), alignment_section(parts),
                training_section(parts), timings_section(parts), *parts.extra_sections]
    if parts.saelens_evals:
        sections.append(saelens_section(parts))
    return sections


def write_report(parts: SweepParts, out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Write ``report.json``, ``report.md`` and ``report.html`` atomically; returns report.json's content."""
    from qsae_lens import __version__
    from qsae_lens._io import atomic_write_json, atomic_write_text
    from qsae_lens.assets import DEFAULT_MODEL_NOTE
    from qsae_lens.report.html import render_html, render_markdown

    config = dict(parts.config)
    config["notes"] = [DEFAULT_MODEL_NOTE] if config.get("model") is None else []
    parts = dataclasses.replace(parts, config=config)
    sections = sweep_sections(parts)
    report = {"schema_version": REPORT_SCHEMA_VERSION, "qsae_lens_version": __version__,
              "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "config": config, "warnings": sections[0].data["warnings"],
              "sections": {s.key: s.data for s in sorted(sections, key=lambda s: (s.order, s.key))}}
    out = Path(out_dir)
    title = "qsae_lens precision sweep"
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", render_markdown(title, sections))
    atomic_write_text(out / "report.html", render_html(title, sections))
    return json.loads((out / "report.json").read_text())
