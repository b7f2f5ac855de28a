"""Plotly figures of a comparison report, drawn from its ``to_dict()`` summaries only (histograms,
quantiles, category tables), so a report read back from JSON draws the same figures."""

from __future__ import annotations

import html
from typing import Any

import plotly.graph_objects as go

# distribution name (in report["distributions"]) -> figure title
_HISTOGRAMS: dict[str, str] = {
    "decoder_cosine_best_match_ab": "Decoder best-match cosine, a → b",
    "decoder_cosine_best_match_ba": "Decoder best-match cosine, b → a",
    "encoder_cosine_best_match_ab": "Encoder best-match cosine, a → b",
    "encoder_cosine_best_match_ba": "Encoder best-match cosine, b → a",
    "decoder_matched_cosine": "Decoder cosine of one-to-one matched pairs",
}


def distribution_figure(dist: dict[str, Any], title: str) -> go.Figure:
    """Histogram of one per-latent distribution (fraction of latents per bin), with its mean and,
    where known, the null mean (random SAEs of the same shapes) marked as vertical lines."""
    edges = dist["histogram"]["edges"]
    counts = dist["histogram"]["counts"]
    total = max(sum(counts), 1)
    centers = [(lo + hi) / 2 for lo, hi in zip(edges[:-1], edges[1:])]
    widths = [hi - lo for lo, hi in zip(edges[:-1], edges[1:])]
    fig = go.Figure()
    fig.add_bar(
        x=centers, y=[c / total for c in counts], width=widths, name="observed", marker_color="#1f77b4"
    )
    null_counts = dist.get("null_histogram")
    if null_counts:
        null_total = max(sum(null_counts), 1)
        fig.add_bar(
            x=centers,
            y=[c / null_total for c in null_counts],
            width=widths,
            name="null (random SAEs)",
            marker_color="#7f7f7f",
            opacity=0.5,
        )
    if dist.get("mean") is not None:
        fig.add_vline(x=dist["mean"], line_color="#1f77b4", annotation_text=f"mean {dist['mean']:.3f}")
    if dist.get("null") is not None:
        fig.add_vline(
            x=dist["null"],
            line_dash="dash",
            line_color="#d62728",
            annotation_text=f"null {dist['null']:.3f}",
            annotation_position="top left",
        )
    fig.update_layout(
        title=title,
        xaxis_title="cosine",
        yaxis_title="fraction of latents",
        barmode="overlay",
        bargap=0,
        template="plotly_white",
        height=360,
    )
    return fig


def transition_figure(transition: dict[str, Any]) -> go.Figure:
    """Heatmap of matched latents' category in a (rows) against their category in b (columns)."""
    counts = transition["counts"]
    fig = go.Figure(
        go.Heatmap(
            z=counts,
            x=[f"b: {c}" for c in transition["cols"]],
            y=[f"a: {r}" for r in transition["rows"]],
            colorscale="Blues",
            text=[[str(int(v)) for v in row] for row in counts],
            texttemplate="%{text}",
            hovertemplate="%{y} → %{x}: %{z}<extra></extra>",
        )
    )
    fig.update_layout(
        title="Latent category transitions (matched latents)",
        yaxis_autorange="reversed",
        template="plotly_white",
        height=360,
    )
    return fig


def report_figures(report: dict[str, Any]) -> dict[str, go.Figure]:
    """All figures of a report dict (``ComparisonReport.to_dict()``), by name."""
    figs: dict[str, go.Figure] = {}
    dists = report.get("distributions") or {}
    for name, title in _HISTOGRAMS.items():
        if name in dists and dists[name].get("histogram"):
            figs[name] = distribution_figure(dists[name], title)
    trans = (report.get("latent_categories") or {}).get("transition")
    if trans:
        figs["latent_category_transitions"] = transition_figure(trans)
    return figs


def report_html(report: dict[str, Any], markdown_text: str) -> str:
    """A self-contained page: the markdown summary and every figure, plotly.js inlined once
    (``include_plotlyjs=True``) so that the page works offline."""
    parts = []
    for i, fig in enumerate(report_figures(report).values()):
        parts.append(fig.to_html(full_html=False, include_plotlyjs=(i == 0), default_width="100%"))
    title = "SAE comparison"
    return (
        "<!DOCTYPE html>\n<html lang='en'>\n<head>\n<meta charset='utf-8'>\n"
        f"<title>{html.escape(title)}</title>\n"
        "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
        "text-align:left}pre{white-space:pre-wrap}</style>\n</head>\n<body>\n"
        f"{_markdown_to_html(markdown_text)}\n<h2>Figures</h2>\n" + "\n".join(parts) + "\n</body>\n</html>\n"
    )


def _markdown_to_html(text: str) -> str:
    # markdown-it-py ships with SAELens's dependency tree (rich); without it, the summary is shown verbatim.
    try:
        from markdown_it import MarkdownIt
    except ImportError:
        return f"<pre>{html.escape(text)}</pre>"
    return MarkdownIt("commonmark", {"html": False}).enable("table").render(text)
