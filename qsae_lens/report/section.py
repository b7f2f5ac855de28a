"""``ReportSection``: what one step contributes to a report, and the small helpers that format it.

A section carries the same content three ways: ``data`` (plain JSON for ``report.json``),
``markdown`` (for ``report.md``) and ``html`` (tables as real ``<table>`` elements and plotly
figures as ``<div>``s without plotly.js; the page inlines plotly.js once, so it opens offline).
"""

from __future__ import annotations

import html as _html
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ReportSection:
    """One section of a report, produced by one step from its typed result."""

    key: str
    """Key of ``data`` in ``report.json["sections"]`` and the HTML anchor, e.g. ``"survival"``."""
    title: str
    """Heading shown in markdown and HTML."""
    order: int
    """Sections are sorted by this (headline 0, transfer 20, comparisons 30, analyses 40+)."""
    data: dict[str, Any] = field(default_factory=dict)
    """Plain JSON values (numbers, strings, lists, dicts) for ``report.json``."""
    markdown: str = ""
    """The section body in markdown (no heading: the report adds ``## title``)."""
    html: str = ""
    """The section body in HTML (no heading), tables as <table>, figures via :func:`figure_html`."""


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != value:  # NaN
            return "—"
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 3) -> str:
    """A GitHub-markdown table; floats with ``digits`` decimals, None/NaN as an em dash."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v, digits) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def html_table(header: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 3,
               caption: str | None = None) -> str:
    """The same table as an HTML ``<table>`` (cells escaped)."""
    cap = f"<caption>{_html.escape(caption)}</caption>" if caption else ""
    head = "".join(f"<th>{_html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_html.escape(_fmt(v, digits))}</td>" for v in row) + "</tr>"
                   for row in rows)
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def figure_html(fig: Any) -> str:
    """A plotly figure as a ``<div>`` without plotly.js (the page that holds it inlines plotly.js once)."""
    return fig.to_html(full_html=False, include_plotlyjs=False)
