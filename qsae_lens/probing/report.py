"""Tables and plotly figures of a :class:`ProbeSweepResult`: markdown, a report section, a self-contained HTML page."""

from __future__ import annotations

import html as _html
from typing import Any

from qsae_lens.probing.api import ProbeSweepResult
from qsae_lens.report.section import ReportSection, figure_html, html_table, markdown_table

_HEADER = ["task", "precision", "layer", "features", "accuracy", "95% CI", "control", "95% CI",
           "selectivity", "95% CI", "chance", "rows"]


def _ci(ci: tuple[float, float]) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def probe_table_rows(result: ProbeSweepResult) -> list[list[Any]]:
    """One row per probe, in :data:`_HEADER` order."""
    return [[r.task, r.precision, r.layer, r.source, r.accuracy, _ci(r.accuracy_ci), r.control_accuracy,
             _ci(r.control_ci), r.selectivity, _ci(r.selectivity_ci), r.chance, r.n] for r in result.probes]


def _sparse_rows(result: ProbeSweepResult) -> list[list[Any]]:
    return [[r.task, r.precision, r.layer, r.k, r.accuracy, _ci(r.accuracy_ci)] for r in result.sparse]


def _overlap_rows(result: ProbeSweepResult) -> list[list[Any]]:
    return [[r.task, r.precision, r.layer, r.k, r.overlap] for r in result.overlap]


def probe_figures(result: ProbeSweepResult) -> list[Any]:
    """Accuracy vs layer per precision (one panel per task), and selectivity vs layer; error bars are the CIs."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    tasks = result.settings.get("tasks") or sorted({r.task for r in result.probes})
    figs = []
    for metric, ci, title in (("accuracy", "accuracy_ci", "Probe accuracy vs layer"),
                              ("selectivity", "selectivity_ci", "Selectivity (accuracy - control) vs layer")):
        fig = make_subplots(rows=1, cols=len(tasks), subplot_titles=list(tasks), shared_yaxes=True)
        series = sorted({(r.precision, r.source) for r in result.probes})
        for col, task in enumerate(tasks, start=1):
            for precision, source in series:
                rows = sorted((r for r in result.probes if (r.task, r.precision, r.source) == (task, precision, source)),
                              key=lambda r: r.layer)
                if not rows:
                    continue
                y = [getattr(r, metric) for r in rows]
                fig.add_trace(go.Scatter(
                    x=[r.layer for r in rows], y=y, mode="lines+markers", name=f"{precision} ({source})",
                    legendgroup=f"{precision}/{source}", showlegend=col == 1,
                    line={"dash": "solid" if source == "resid" else "dot"},
                    error_y={"type": "data", "symmetric": False,
                             "array": [getattr(r, ci)[1] - v for r, v in zip(rows, y)],
                             "arrayminus": [v - getattr(r, ci)[0] for r, v in zip(rows, y)]}), row=1, col=col)
        fig.update_layout(title=title, height=380, xaxis_title="layer", yaxis_title=metric)
        figs.append(fig)
    return figs


def probe_markdown(result: ProbeSweepResult) -> str:
    """The probe, sparse-probe and overlap tables in markdown, with the CI unit and the fp32 note."""
    s = result.settings
    parts = [f"Probes: multinomial logistic regression, {s.get('cv')} folds grouped by document; "
             f"control task = Hewitt-Liang random label per word type; CIs: {s.get('ci_unit')}. "
             f"{s.get('note', '')}", "", markdown_table(_HEADER, probe_table_rows(result))]
    if result.sparse:
        parts += ["", "Sparse probing (k best latents by class-mean difference, chosen on training folds):", "",
                  markdown_table(["task", "precision", "layer", "k", "accuracy", "95% CI"], _sparse_rows(result))]
    if result.overlap:
        parts += ["", f"Top-{s.get('top_k')} latent overlap with {s.get('baseline')} (same SAE):", "",
                  markdown_table(["task", "precision", "layer", "k", "overlap"], _overlap_rows(result))]
    return "\n".join(parts)


def probe_html_body(result: ProbeSweepResult, *, include_plotlyjs: bool = False) -> str:
    """Tables and figures as HTML; with ``include_plotlyjs`` the first figure inlines plotly.js (offline page)."""
    s = result.settings
    figs = probe_figures(result)
    divs = [fig.to_html(full_html=False, include_plotlyjs=(include_plotlyjs and i == 0)) if include_plotlyjs
            else figure_html(fig) for i, fig in enumerate(figs)]
    parts = [f"<p>{_html.escape(str(s.get('note', '')))} CIs: {_html.escape(str(s.get('ci_unit')))}.</p>", *divs,
             html_table(_HEADER, probe_table_rows(result), caption="Probes")]
    if result.sparse:
        parts.append(html_table(["task", "precision", "layer", "k", "accuracy", "95% CI"], _sparse_rows(result),
                                caption="Sparse probing"))
    if result.overlap:
        parts.append(html_table(["task", "precision", "layer", "k", "overlap"], _overlap_rows(result),
                                caption=f"Top-k latent overlap with {s.get('baseline')}"))
    return "\n".join(parts)


def probe_html_page(result: ProbeSweepResult) -> str:
    """A whole self-contained HTML page (plotly.js inlined once; opens offline)."""
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>qsae probe</title></head><body>"
            "<h1>Probing across precisions</h1>" + probe_html_body(result, include_plotlyjs=True) + "</body></html>")


def probe_section(result: ProbeSweepResult, order: int = 60) -> ReportSection:
    """The sweep report's section for probing."""
    return ReportSection("probing", "Probing across precisions", order, result.to_json(),
                         probe_markdown(result), probe_html_body(result))
