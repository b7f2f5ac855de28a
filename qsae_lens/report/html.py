"""One self-contained HTML page (and its markdown twin) from :class:`ReportSection` s.

Sections are sorted by ``order``; plotly.js is inlined once at the top (no CDN: the page opens
offline), so each section's figures are plain ``<div>`` s (:func:`qsae_lens.report.section.figure_html`).
"""

from __future__ import annotations

import html as _html
from collections.abc import Sequence

from qsae_lens.report.section import ReportSection

_CSS = """body{font-family:system-ui,sans-serif;max-width:1280px;margin:auto;padding:1em;color:#222}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:.25em .5em;
text-align:right}th{background:#f3f4f6}td:first-child,th:first-child{text-align:left}caption{text-align:left;
font-weight:600;padding:.25em 0}.row{display:flex;flex-wrap:wrap;gap:1.5em;align-items:flex-start}
.row>div{flex:1 1 520px;min-width:0}.headline{background:#f0f7ff;border-left:4px solid #2563eb;padding:.5em 1em}
.warning{background:#fff7ed;border-left:4px solid #ea580c;padding:.5em 1em}nav a{margin-right:1em}"""


def _plotly_js() -> str:
    from plotly.offline import get_plotlyjs

    return f"<script type='text/javascript'>{get_plotlyjs()}</script>"


def render_html(title: str, sections: Sequence[ReportSection]) -> str:
    """The page: title, a table of contents, then each section (sorted by ``order``)."""
    ordered = sorted(sections, key=lambda s: (s.order, s.key))
    nav = " ".join(f"<a href='#{_html.escape(s.key)}'>{_html.escape(s.title)}</a>" for s in ordered)
    body = "\n".join(f"<section id='{_html.escape(s.key)}'><h2>{_html.escape(s.title)}</h2>{s.html}</section>"
                     for s in ordered)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{_html.escape(title)}</title>"
            f"<style>{_CSS}</style>{_plotly_js()}</head><body><h1>{_html.escape(title)}</h1>"
            f"<nav>{nav}</nav>{body}</body></html>")


def render_markdown(title: str, sections: Sequence[ReportSection]) -> str:
    """The same sections as markdown (``## title`` + body)."""
    ordered = sorted(sections, key=lambda s: (s.order, s.key))
    return "\n\n".join([f"# {title}", *[f"## {s.title}\n\n{s.markdown.strip()}" for s in ordered]]) + "\n"


def side_by_side(*blocks: str) -> str:
    """Blocks (a table and the figure that illustrates it) in one row that wraps on narrow screens."""
    return "<div class='row'>" + "".join(f"<div>{b}</div>" for b in blocks) + "</div>"
