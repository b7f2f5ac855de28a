"""``ComparisonReport``: the result of :func:`qsae_lens.compare.compare_saes`, and the only place
that knows about formatting (JSON schema, markdown, HTML page with plotly figures).

The report holds plain Python values only (numbers, strings, lists): every figure is drawn from the
summaries kept in ``to_dict()`` (histograms, quantiles, category tables), so a report read back from
``report.json`` with :meth:`ComparisonReport.from_dict` draws the same figures as the original.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from qsae_lens._io import atomic_write_text

SCHEMA_VERSION = "1.0"

# metric name -> (short description, how to read it against its null). The order is the order of
# the markdown table; metrics absent from a report (no activations given) are skipped.
METRIC_DESCRIPTIONS: dict[str, str] = {
    "decoder_cosine_best_match_ab": "mean over a's latents of the max cosine to any decoder direction of b",
    "decoder_cosine_best_match_ba": "mean over b's latents of the max cosine to any decoder direction of a",
    "encoder_cosine_best_match_ab": "as decoder_cosine_best_match_ab, on encoder directions (columns of W_enc)",
    "encoder_cosine_best_match_ba": "as decoder_cosine_best_match_ba, on encoder directions",
    "decoder_mutual_nn_fraction": "fraction of a's latents whose best match in b has them as its best match",
    "decoder_matched_cosine": "mean cosine of one-to-one matched decoder pairs (Hungarian; PW-MCC)",
    "decoder_matched_fraction_above_0.5": "fraction of matched pairs with cosine > 0.5",
    "decoder_matched_fraction_above_0.7": "fraction of matched pairs with cosine > 0.7",
    "decoder_matched_fraction_above_0.9": "fraction of matched pairs with cosine > 0.9",
    "decoder_procrustes_matched_cosine": "matched cosine after an orthogonal map fitted on half the pairs, scored on the other half",
    "activation_cka": "linear CKA between the two activation sets (same tokens)",
    "activation_cka_debiased": "debiased linear CKA between the two activation sets",
    "latent_code_cka": "linear CKA between the codes of one-to-one matched latents",
    "latent_activation_correlation_matched": "mean Pearson correlation across tokens of matched latents' activations",
    "cross_reconstruction_explained_variance_aa": "explained variance of SAE a on its own activations (reference)",
    "cross_reconstruction_explained_variance_ab": "explained variance of SAE a applied to b's activations",
    "cross_reconstruction_explained_variance_ab_procrustes": "as above, with b's activations mapped into a's space by the fitted rotation",
}


class MetricResult(NamedTuple):
    """One reported number, with its uncertainty and its baseline."""

    value: float
    """The point estimate (a mean over latents, a fraction, or a single statistic such as CKA)."""
    ci_low: float | None = None
    """Lower end of the 95% percentile-bootstrap interval, where the metric is a mean."""
    ci_high: float | None = None
    """Upper end of the 95% percentile-bootstrap interval."""
    null: float | None = None
    """The value expected when the two SAEs share nothing (random SAEs of the same shapes, or permuted tokens)."""
    p_value: float | None = None
    """p of a test against that null (one-sided: larger than chance), unadjusted."""
    p_value_holm: float | None = None
    """p after Holm's family-wise correction over all p-values of this report."""
    p_value_bh: float | None = None
    """p after Benjamini-Hochberg false-discovery-rate correction over all p-values of this report."""
    null_kind: str | None = None
    """What ``null`` and ``p_value`` are read against: ``"anisotropic"`` (the target dictionary mirrored
    across random axes of its own shape), ``"isotropic"`` (uniform directions), ``"covariance-matched"`` or
    ``"token-permutation"`` (activation metrics), ``"sign-flip"``; None without a null."""

    def to_dict(self) -> dict[str, float | None]:
        return {k: _clean(v) for k, v in self._asdict().items()}

    def __repr__(self) -> str:
        return f"MetricResult({_describe(self)})"


@dataclass
class ComparisonReport:
    """Everything :func:`compare_saes` found, as plain values; see ``to_dict()`` for the schema."""

    a: dict[str, Any]
    """Metadata of SAE a: source, architecture, d_in, d_sae, hook, model, precision (None where unknown)."""
    b: dict[str, Any]
    """Metadata of SAE b."""
    metrics: dict[str, MetricResult]
    """Metric name -> result. Names are listed in ``METRIC_DESCRIPTIONS``."""
    latent_categories: dict[str, Any] = field(default_factory=dict)
    """Dead/rare/common/frequent counts for a and b, and the transition table over matched latents."""
    distributions: dict[str, Any] = field(default_factory=dict)
    """Per-latent distributions: name -> {"n", "mean", "quantiles", "histogram": {"edges", "counts"}, "null"}."""
    warnings: list[str] = field(default_factory=list)
    """Things a reader must know before trusting the numbers (different hooks or models, ...)."""
    settings: dict[str, Any] = field(default_factory=dict)
    """How the numbers were computed (seed, n_bootstrap, n_permutations, null mode, block size, n_tokens)."""
    schema_version: str = SCHEMA_VERSION

    # ---- serialisation ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The stable, versioned schema (plain JSON values; non-finite numbers become None)."""
        return _clean(
            {
                "schema_version": self.schema_version,
                "a": self.a,
                "b": self.b,
                "metrics": {name: m.to_dict() for name, m in self.metrics.items()},
                "latent_categories": self.latent_categories,
                "distributions": self.distributions,
                "warnings": list(self.warnings),
                "settings": self.settings,
            }
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ComparisonReport:
        """Rebuild a report from ``to_dict()`` output (e.g. a ``report.json`` read back)."""
        version = str(data.get("schema_version", ""))
        if version.split(".")[0] != SCHEMA_VERSION.split(".")[0]:
            raise ValueError(
                f"report schema_version {version!r} is not readable by this qsae_lens "
                f"(expects {SCHEMA_VERSION}); re-run compare_saes to regenerate it"
            )
        fields_ = MetricResult._fields
        metrics = {
            name: MetricResult(**{k: m.get(k) for k in fields_})
            for name, m in data.get("metrics", {}).items()
        }
        return cls(
            a=dict(data["a"]),
            b=dict(data["b"]),
            metrics=metrics,
            latent_categories=dict(data.get("latent_categories") or {}),
            distributions=dict(data.get("distributions") or {}),
            warnings=list(data.get("warnings") or []),
            settings=dict(data.get("settings") or {}),
            schema_version=version,
        )

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> ComparisonReport:
        """Read a ``report.json`` written by :meth:`to_json` or :meth:`save`."""
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def to_json(self, path: str | os.PathLike[str] | None = None) -> str:
        """The JSON text of ``to_dict()``; written atomically to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2, allow_nan=False)
        if path is not None:
            atomic_write_text(Path(path), text + "\n")
        return text

    # ---- presentation ----------------------------------------------------------------------------
    def to_markdown(self) -> str:
        """A human summary: every headline number beside its null, its 95% CI and its adjusted p."""
        lines: list[str] = ["# SAE comparison: a vs b", ""]
        lines += ["| | a | b |", "|---|---|---|"]
        for key in ("source", "architecture", "d_in", "d_sae", "hook", "model", "precision"):
            lines.append(
                f"| {key} | {_md_cell(_meta_value(self.a, key))} | {_md_cell(_meta_value(self.b, key))} |"
            )
        lines.append("")
        if self.warnings:
            lines.append("**Warnings**")
            lines.append("")
            lines += [f"- {w}" for w in self.warnings]
            lines.append("")
        lines += [
            "## Metrics",
            "",
            "`null`: the value expected between SAEs that share nothing (random SAEs of the same shapes for "
            "weight metrics, tokens shuffled for activation metrics). A number means something only as far "
            "as it stands above its null.",
            "",
            "| metric | value | 95% CI | null | p | p (Holm) |",
            "|---|---|---|---|---|---|",
        ]
        for name in _ordered(self.metrics):
            m = self.metrics[name]
            ci = f"[{_fmt(m.ci_low)}, {_fmt(m.ci_high)}]" if m.ci_low is not None else "–"
            lines.append(
                f"| {name} | {_fmt(m.value)} | {ci} | {_fmt(m.null)} | {_fmt_p(m.p_value)} | {_fmt_p(m.p_value_holm)} |"
            )
        lines.append("")
        if self.distributions:
            lines += ["## Distributions (per latent)", ""]
            qs = _quantile_keys(self.distributions)
            lines.append("| distribution | n | mean | " + " | ".join(f"q{q}" for q in qs) + " | null mean |")
            lines.append("|---" * (len(qs) + 4) + "|")
            for name, d in self.distributions.items():
                qv = " | ".join(_fmt(d.get("quantiles", {}).get(q)) for q in qs)
                lines.append(
                    f"| {name} | {d.get('n')} | {_fmt(d.get('mean'))} | {qv} | {_fmt(d.get('null'))} |"
                )
            lines.append("")
        cats = self.latent_categories
        if cats and cats.get("a") is not None:
            names = cats.get("names") or list(cats["a"])
            lines += [f"## Latent categories (from {cats.get('source', 'unknown')})", ""]
            lines.append("| | " + " | ".join(names) + " |")
            lines.append("|---" * (len(names) + 1) + "|")
            for side in ("a", "b"):
                if cats.get(side) is not None:
                    lines.append(f"| {side} | " + " | ".join(str(cats[side].get(n, 0)) for n in names) + " |")
            lines.append("")
            trans = cats.get("transition")
            if trans:
                lines += ["Matched latents: category in a (rows) → category in b (columns)", ""]
                lines.append("| a \\ b | " + " | ".join(trans["cols"]) + " |")
                lines.append("|---" * (len(trans["cols"]) + 1) + "|")
                for r, row in zip(trans["rows"], trans["counts"]):
                    lines.append(f"| {r} | " + " | ".join(str(int(c)) for c in row) + " |")
                lines.append("")
        s = self.settings
        if s:
            lines.append(
                "_Settings: "
                + ", ".join(f"{k}={v}" for k, v in s.items() if not isinstance(v, (dict, list)))
                + "_"
            )
            lines.append("")
        return "\n".join(lines)

    def figures(self) -> dict[str, Any]:
        """Plotly figures by name: best-match histograms a→b and b→a (null marked), matched-cosine
        distribution, category transition heatmap (when categories are known)."""
        from qsae_lens.compare.figures import report_figures

        return report_figures(self.to_dict())

    def to_html(self) -> str:
        """A self-contained HTML page (plotly.js inlined, so it opens offline) with the summary and figures."""
        from qsae_lens.compare.figures import report_html

        return report_html(self.to_dict(), self.to_markdown())

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write ``report.json``, ``report.md`` and ``report.html`` into ``folder`` (each atomically)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.to_json(folder / "report.json")
        atomic_write_text(folder / "report.md", self.to_markdown() + "\n")
        atomic_write_text(folder / "report.html", self.to_html())
        return folder

    def __repr__(self) -> str:
        head = (
            f"ComparisonReport(a={_short_meta(self.a)}, b={_short_meta(self.b)}, "
            f"{len(self.metrics)} metrics, {len(self.warnings)} warnings)"
        )
        rows = [f"  {name}: {_describe(self.metrics[name])}" for name in _ordered(self.metrics)]
        rows += [f"  warning: {w}" for w in self.warnings]
        return "\n".join([head, *rows])


# ---- helpers -------------------------------------------------------------------------------------
def _ordered(metrics: dict[str, Any]) -> list[str]:
    known = [n for n in METRIC_DESCRIPTIONS if n in metrics]
    return known + sorted(n for n in metrics if n not in METRIC_DESCRIPTIONS)


def _clean(obj: Any) -> Any:
    """Plain-JSON copy: tuples -> lists, numpy/torch scalars -> Python, NaN/Inf -> None."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if hasattr(obj, "item") and getattr(obj, "ndim", 0) == 0:  # numpy / torch scalars
        obj = obj.item()
        if isinstance(obj, bool):
            return obj
    if isinstance(obj, (int, float)):
        if isinstance(obj, float) and not math.isfinite(obj):
            return None
        return obj
    if hasattr(obj, "tolist"):
        return _clean(obj.tolist())
    return str(obj)


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def _fmt_p(p: float | None) -> str:
    if p is None:
        return "–"
    return f"{p:.1e}" if p < 1e-3 else f"{p:.3f}"


def _md_cell(v: Any) -> str:
    return "–" if v is None else str(v).replace("|", "\\|")


def _meta_value(meta: dict[str, Any], key: str) -> Any:
    v = meta.get(key)
    if key == "precision" and isinstance(v, dict):
        parts = [str(v.get("precision"))] if v.get("precision") else []
        parts += [
            f"{k}={v[k]}" for k in ("quant_type", "compute_dtype", "double_quant") if v.get(k) is not None
        ]
        return ", ".join(parts) or None
    return v


def _short_meta(meta: dict[str, Any]) -> str:
    prec = _meta_value(meta, "precision")
    bits = [str(meta.get("architecture")), f"{meta.get('d_sae')}x{meta.get('d_in')}"]
    if meta.get("hook"):
        bits.append(str(meta["hook"]))
    if prec:
        bits.append(str(prec).split(",")[0])
    return "<" + " ".join(bits) + ">"


def _describe(m: MetricResult) -> str:
    s = f"{m.value:.4f}" if isinstance(m.value, float) else str(m.value)
    if m.ci_low is not None and m.ci_high is not None:
        s += f" [{m.ci_low:.4f}, {m.ci_high:.4f}]"
    if m.null is not None:
        s += f" ({m.null_kind + ' ' if m.null_kind else ''}null {m.null:.4f})"
    if m.p_value is not None:
        s += f" p={_fmt_p(m.p_value)}"
    return s


def _quantile_keys(distributions: dict[str, Any]) -> list[str]:
    for d in distributions.values():
        if d.get("quantiles"):
            return list(d["quantiles"])
    return []


