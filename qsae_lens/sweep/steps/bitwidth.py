"""The bit-width view: every quantity the sweep measures, plotted against bits per weight, one line per method.

Reads what the core steps already computed (no new model runs): the model's own cost
(``core.transfer.models``: CE increase and KL against the baseline), the transfer of the baseline
SAE into each model (``core.transfer.cells``: explained variance, ΔCE), the matched decoder cosine
of each precision's SAE against the baseline's (``core.comparisons``, same and different seed)
beside the seed ceiling (the baseline against itself at another seed), and, once the survival
step has written its files, the survived fraction (``<sweep>/survival/<precision>/layer<L>/frozen/survival.json``).
The anchor (Duan 2026: 62.4% of features survive in Pythia-70M, 51.3% in Gemma-2-2B, weight-only
INT6) is marked on the survival panel. A panel with no data is skipped with the reason stated.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from qsae_lens.precision import parse_precision
from qsae_lens.report.section import ReportSection, figure_html, html_table, markdown_table

NAME = "bitwidth"
ANCHOR_BITS = 6
ANCHOR_SURVIVAL = {"Pythia-70M": 0.624, "Gemma-2-2B": 0.513}
"""Duan 2026, frozen SAE under weight-only INT6 round-to-nearest: fraction of active features surviving."""


@dataclass
class BitwidthResult:
    """Rows ``{precision, method, bits, layer, metric: value...}`` and why panels were skipped."""

    baseline: str
    rows: list[dict[str, Any]]
    """One row per (precision, layer): method, bits, ce_increase, kl, transfer_ev, transfer_dce,
    matched_cosine_same_seed, matched_cosine_different_seed, ceiling_cosine, survived (None when absent)."""
    skipped: dict[str, str] = field(default_factory=dict)
    """Panel -> why it has no data."""

    def __repr__(self) -> str:
        return f"BitwidthResult(baseline={self.baseline}, {len(self.rows)} rows, skipped={sorted(self.skipped)})"


PANELS: dict[str, str] = {
    "ce_increase": "model CE increase vs baseline (nats)",
    "kl": "model KL vs baseline (nats/token)",
    "transfer_ev": "baseline SAE's explained variance on this model",
    "transfer_dce": "baseline SAE's ΔCE spliced into this model (nats)",
    "matched_cosine_different_seed": "matched decoder cosine vs baseline (different seed)",
    "survived": "survived fraction (baseline SAE frozen)",
}


def _num(x: Any) -> float | None:
    v = getattr(x, "value", x)
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def _matched(report: Any) -> float | None:
    metrics = getattr(report, "metrics", None) or {}
    return _num(metrics.get("decoder_matched_cosine")) if isinstance(metrics, dict) else None


def run_step(plan: Any, core: Any) -> BitwidthResult:
    """Collect the per-(precision, layer) numbers from ``core`` and the survival step's files."""
    baseline = plan.baseline
    rows: list[dict[str, Any]] = []
    transfer, comparisons = core.transfer, core.comparisons
    survival_root = plan.step_dir("survival")
    for precision in plan.precision_names:
        spec = parse_precision(precision).spec
        for layer in plan.layers:
            row: dict[str, Any] = {"precision": precision, "method": spec.family if spec.family != "float" else "float",
                                   "bits": spec.bits, "layer": layer}
            m = getattr(transfer, "models", {}).get(precision) if transfer is not None else None
            row["ce_increase"] = _num(getattr(m, "ce_increase_vs_baseline", None))
            row["kl"] = _num(getattr(m, "kl_vs_baseline", None))
            cell = None
            if transfer is not None:
                from qsae_lens.sweep.plan import CellKey

                cell = transfer.cell(CellKey(baseline, layer, plan.seeds[0]), precision)
            row["transfer_ev"] = _num(getattr(cell, "explained_variance", None))
            row["transfer_dce"] = _num(getattr(cell, "ce_increase", None))
            for kind in ("same_seed", "different_seed", "ceiling"):
                found = [r for r in (comparisons.at(layer, kind) if comparisons is not None else [])
                         if kind == "ceiling" or r.pair.a.precision == precision]
                key = "ceiling_cosine" if kind == "ceiling" else f"matched_cosine_{kind}"
                row[key] = _matched(found[0].report) if found else None
            surv = survival_root / precision / f"layer{layer}" / "frozen" / "survival.json"
            row["survived"] = None
            if surv.is_file():
                frac = json.loads(surv.read_text()).get("fractions", {}).get("survived", {})
                row["survived"] = _num(frac.get("value") if isinstance(frac, dict) else frac)
            rows.append(row)
    skipped = {p: "no value for any precision in this sweep" + (
        " (the survival step has not run: add it to --analyses)" if p == "survived" else "")
        for p in PANELS if all(r.get(p) is None for r in rows)}
    return BitwidthResult(baseline=baseline, rows=rows, skipped=skipped)


def _figure(result: BitwidthResult) -> Any:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    panels = [p for p in PANELS if p not in result.skipped]
    fig = make_subplots(rows=max(1, math.ceil(len(panels) / 2)), cols=2, subplot_titles=[PANELS[p] for p in panels])
    methods = sorted({r["method"] for r in result.rows})
    for i, panel in enumerate(panels):
        row, col = i // 2 + 1, i % 2 + 1
        for method in methods:
            pts = sorted((r["bits"], r[panel], r["precision"], r["layer"]) for r in result.rows
                         if r["method"] == method and r.get(panel) is not None and r["bits"] is not None)
            if not pts:
                continue
            fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines+markers", name=method,
                                     legendgroup=method, showlegend=i == 0,
                                     text=[f"{p[2]} L{p[3]}" for p in pts]), row=row, col=col)
        if panel == "matched_cosine_different_seed":
            ceil = [r["ceiling_cosine"] for r in result.rows if r.get("ceiling_cosine") is not None]
            if ceil:
                fig.add_hline(y=max(ceil), line_dash="dot", annotation_text="seed ceiling", row=row, col=col)
        if panel == "survived":
            for model, frac in ANCHOR_SURVIVAL.items():
                fig.add_trace(go.Scatter(x=[ANCHOR_BITS], y=[frac], mode="markers", marker_symbol="star", marker_size=12,
                                         name=f"Duan 2026 INT6, {model}", showlegend=True), row=row, col=col)
        fig.update_xaxes(title_text="bits per weight code", row=row, col=col)
    fig.update_layout(height=320 * max(1, math.ceil(len(panels) / 2)), title="Cost and feature transfer against bit width")
    return fig


def report_section(result: BitwidthResult) -> ReportSection:
    """Table of every row, the bit-width figure, and which panels were skipped and why."""
    cols = ["precision", "bits", "layer", "ce_increase", "kl", "transfer_ev", "transfer_dce",
            "matched_cosine_different_seed", "ceiling_cosine", "survived"]
    table = [[("—" if r.get(c) is None else (f"{r[c]:.4g}" if isinstance(r[c], float) else r[c])) for c in cols]
             for r in result.rows]
    notes = [f"* {PANELS[p]}: skipped ({why})" for p, why in result.skipped.items()]
    md = "\n".join([
        "Bits are weight-code bits (scales not counted); fake-quantized methods (RTN, GGUF, GPTQ, AWQ) compute in "
        "float32 on dequantized weights. The default model's fp32 is itself dequantized Q4_1. Anchor: Duan 2026, "
        "62.4% (Pythia-70M) / 51.3% (Gemma-2-2B) of features survive weight-only INT6.",
        "",
        markdown_table(cols, table),
        *([""] + notes if notes else []),
    ])
    try:
        fig_html = figure_html(_figure(result)) if len(result.skipped) < len(PANELS) else ""
    except Exception as err:  # a plotting failure must not sink the report: say so in place of the figure
        fig_html = f"<p>figure not drawn: {type(err).__name__}: {err}</p>"
    html = fig_html + html_table(cols, table) + "".join(f"<p>{n.removeprefix('* ')}</p>" for n in notes)
    return ReportSection(key=NAME, title="Bit width", order=80, data={"rows": result.rows, "skipped": result.skipped},
                         markdown=md, html=html)
