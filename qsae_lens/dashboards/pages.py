"""The static feature browser: an index of latents and one page per latent, plain HTML that opens from disk.

Every page is self-contained: inline CSS, a few lines of inline JavaScript (sorting the index),
histograms as inline SVG, no external URL anywhere, so the site works offline and from ``file://``.
HTML is written with f-strings and ``html.escape`` (say why: a template engine would be one more
dependency for five small templates); histograms are drawn as SVG by hand because inlining
plotly.js (3.5 MB) into each latent page for one bar chart would make a 100-page site ~350 MB.
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qsae_lens._io import atomic_dir, atomic_write_text

__all__ = ["Example", "PrecisionView", "LatentPage", "write_feature_pages", "latent_filename"]


@dataclass
class Example:
    """One context: its token strings and the latent's activation on each; ``focus`` is the example's own token."""

    tokens: list[str]
    acts: list[float]
    focus: int
    value: float


@dataclass
class PrecisionView:
    """What one precision's model shows for a latent of the frozen SAE."""

    precision: str
    top: list[Example]
    quantiles: list[Example]
    hist_edges: list[float]
    hist_counts: list[int]
    frequency: float
    promoted: list[tuple[str, float]]
    suppressed: list[tuple[str, float]]
    status: str | None = None
    pearson: float | None = None
    jaccard: float | None = None
    matched: tuple[int, float] | None = None
    """(latent index, decoder cosine) of the best-matching latent in this precision's own SAE."""


@dataclass
class LatentPage:
    latent: int
    views: list[PrecisionView]
    label: str | None = None
    """An explanation, when an explainer ran."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Further per-latent facts (name -> number or text), shown on the page and as sortable index
    columns (the first page's keys), e.g. a crosscoder latent's relative norm and decoder cosine."""


def latent_filename(latent: int) -> str:
    """File name of a latent's page (index links use it)."""
    return f"latent_{latent:06d}.html"


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.2em;color:#222}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}
th{cursor:pointer;background:#f3f3f3}.cols{display:flex;gap:1em;align-items:flex-start}
.col{flex:1;min-width:18em;border:1px solid #ddd;padding:.5em}.ex{font-family:monospace;font-size:12px;
margin:3px 0;white-space:pre-wrap;word-break:break-all}.tok{border-radius:2px}.focus{outline:1px solid #333}
.status-survived{color:#1a7f37}.status-blurred{color:#9a6700}.status-died{color:#cf222e}
.status-born{color:#8250df}.status-dead{color:#888}
"""

_SORT_JS = """
document.querySelectorAll('th').forEach(function(th, i){th.addEventListener('click', function(){
 var tb = th.closest('table').tBodies[0]; var rows = Array.from(tb.rows);
 var asc = th.dataset.asc !== '1'; th.dataset.asc = asc ? '1' : '0';
 rows.sort(function(a, b){var x = a.cells[i].dataset.v || a.cells[i].textContent,
   y = b.cells[i].dataset.v || b.cells[i].textContent; var nx = parseFloat(x), ny = parseFloat(y);
   var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y); return asc ? c : -c;});
 rows.forEach(function(r){tb.appendChild(r);});});});
"""


def _page(title: str, body: str, script: str = "") -> str:
    js = f"<script>{script}</script>" if script else ""
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>{body}{js}</body></html>")


def _num(x: float | None, digits: int = 3) -> str:
    return "—" if x is None or x != x else f"{x:.{digits}f}"


def _example_html(ex: Example, scale: float) -> str:
    spans = []
    for i, (t, a) in enumerate(zip(ex.tokens, ex.acts)):
        alpha = 0.0 if scale <= 0 else max(0.0, min(1.0, a / scale))
        cls = "tok focus" if i == ex.focus else "tok"
        spans.append(f"<span class='{cls}' style='background:rgba(255,120,0,{alpha:.2f})' "
                     f"title='{a:.3f}'>{html.escape(t)}</span>")
    return f"<div class='ex'><b>{ex.value:.2f}</b> {''.join(spans)}</div>"


def _hist_svg(edges: Sequence[float], counts: Sequence[int], width: int = 260, height: int = 70) -> str:
    nz = [i for i, c in enumerate(counts) if c > 0]
    if not nz:
        return "<p>never fires</p>"
    lo, hi = nz[0], nz[-1] + 1
    cs = counts[lo:hi]
    top = max(cs)
    bw = width / len(cs)
    bars = "".join(f"<rect x='{i * bw:.1f}' y='{height - height * c / top:.1f}' width='{max(bw - 1, 1):.1f}' "
                   f"height='{height * c / top:.1f}' fill='#e07000'><title>{edges[lo + i]:.3g}–{edges[lo + i + 1]:.3g}: "
                   f"{c}</title></rect>" for i, c in enumerate(cs))
    return (f"<svg width='{width}' height='{height + 14}' role='img'>{bars}<text x='0' y='{height + 12}' "
            f"font-size='10'>{edges[lo]:.3g}</text><text x='{width - 40}' y='{height + 12}' font-size='10'>"
            f"{edges[hi]:.3g}</text></svg>")


def _view_html(v: PrecisionView, scale: float) -> str:
    status = (f"<span class='status-{html.escape(v.status)}'>{html.escape(v.status)}</span>" if v.status else "reference")
    head = (f"<h3>{html.escape(v.precision)}: {status}</h3><p>frequency {v.frequency:.2e}"
            + (f", r = {_num(v.pearson)}, Jaccard = {_num(v.jaccard)}" if v.pearson is not None else "")
            + (f"<br>own SAE match: latent {v.matched[0]} (cos {v.matched[1]:.2f})" if v.matched else "") + "</p>")
    lens = ("<p><b>promotes</b> " + ", ".join(f"<code>{html.escape(t)}</code>" for t, _ in v.promoted)
            + "<br><b>suppresses</b> " + ", ".join(f"<code>{html.escape(t)}</code>" for t, _ in v.suppressed) + "</p>"
            if v.promoted or v.suppressed else "")  # no logit lens given (e.g. pages built from caches alone)
    top = "".join(_example_html(e, scale) for e in v.top) or "<p>no firing</p>"
    qs = "".join(_example_html(e, scale) for e in v.quantiles) or "<p>no firing</p>"
    return (f"<div class='col' data-precision='{html.escape(v.precision)}'>{head}{lens}"
            f"{_hist_svg(v.hist_edges, v.hist_counts)}<h4>top examples</h4><div class='top'>{top}</div>"
            f"<h4>quantile examples</h4><div class='quantiles'>{qs}</div></div>")


def _extra_cell(v: Any) -> str:
    """A table cell for an ``extra`` value: numbers sortable (``data-v``) and shown to 3 decimals."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return f"<td>{html.escape('—' if v is None else str(v))}</td>"
    return f"<td data-v='{v:.6g}'>{v if isinstance(v, int) else _num(v)}</td>"


def write_feature_pages(out_dir: str | os.PathLike[str], pages: Sequence[LatentPage], *, title: str = "Feature atlas",
                        note: str = "") -> Path:
    """Write ``index.html`` and one page per latent into ``out_dir`` (replaced whole, atomically).

    Each latent page shows one column per precision side by side (the first is the reference):
    top and quantile examples with highlighted tokens (shading scaled to the reference's top
    activation), logit lens, histogram, status and the matched latent of that precision's own SAE.
    """
    out_dir = Path(out_dir)
    precisions = [v.precision for v in pages[0].views] if pages else []
    extra_keys = list(pages[0].extra) if pages else []
    with atomic_dir(out_dir, replace=True) as tmp:
        rows = []
        for p in pages:
            ref = p.views[0]
            cells = [f"<td data-v='{p.latent}'><a href='{latent_filename(p.latent)}'>{p.latent}</a></td>",
                     f"<td data-v='{ref.frequency:.6g}'>{ref.frequency:.2e}</td>"]
            for v in p.views[1:]:
                cells.append(f"<td class='status-{html.escape(v.status or '')}'>{html.escape(v.status or '—')}</td>")
                cells.append(f"<td data-v='{'' if v.pearson is None else f'{v.pearson:.6g}'}'>{_num(v.pearson)}</td>")
            cells.extend(_extra_cell(p.extra.get(key)) for key in extra_keys)
            cells.append(f"<td>{html.escape(p.label or '')}</td>")
            rows.append("<tr>" + "".join(cells) + "</tr>")
            scale = max((e.value for e in ref.top), default=0.0)
            body = (f"<p><a href='index.html'>index</a></p><h1>latent {p.latent}</h1>"
                    + (f"<p>label: {html.escape(p.label)}</p>" if p.label else "")
                    + f"<p>{html.escape(note)}</p>"
                    + ("<table class='extra'>" + "".join(f"<tr><th>{html.escape(str(key))}</th>{_extra_cell(v)}</tr>"
                                                         for key, v in p.extra.items()) + "</table>" if p.extra else "")
                    + "<div class='cols'>"
                    + "".join(_view_html(v, scale) for v in p.views) + "</div>")
            atomic_write_text(tmp / latent_filename(p.latent), _page(f"latent {p.latent}", body))
        head = "<th>latent</th><th>frequency</th>" + "".join(
            f"<th>status {html.escape(q)}</th><th>r {html.escape(q)}</th>" for q in precisions[1:]) + "".join(
            f"<th>{html.escape(str(key))}</th>" for key in extra_keys) + "<th>label</th>"
        body = (f"<h1>{html.escape(title)}</h1><p>{html.escape(note)}</p><p>{len(pages)} latents; click a column to sort.</p>"
                f"<table id='latents'><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>")
        atomic_write_text(tmp / "index.html", _page(title, body, _SORT_JS))
    return out_dir
