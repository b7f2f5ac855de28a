"""The sweep's report: one JSON document, a markdown summary and a self-contained HTML page.

This is the only place that knows how a sweep is presented. The headline question, "does this
model's SAE features survive quantization?", is answered per layer and precision by three kinds
of number, each beside what it should be read against:

* **the model's own cost** of quantization (CE increase, KL against the baseline precision);
* **transfer**: the baseline's SAE spliced into the quantized model (and vice versa) on the same
  held-out tokens — explained variance, CE increase, KL, CE recovered against mean ablation;
* **alignment**: matched decoder cosine (Hungarian) of the quantized SAE against the baseline's,
  at a *different* init seed, read against the **ceiling** (two baseline seeds) and the **floor**
  (a random SAE); the same-seed number is shown too, but shared initialisation inflates it.
"""

from __future__ import annotations

import datetime
import html
import json
import math
import os
from pathlib import Path
from typing import Any

REPORT_SCHEMA_VERSION = "1.0"

HEADLINE_METRICS = (
    "decoder_matched_cosine",
    "decoder_cosine_best_match_ab",
    "decoder_mutual_nn_fraction",
    "decoder_procrustes_matched_cosine",
    "activation_cka",
    "latent_activation_correlation_matched",
    "cross_reconstruction_explained_variance_ab",
)


def _metric(report: dict[str, Any], name: str) -> dict[str, Any] | None:
    m = report.get("metrics", {}).get(name)
    return dict(m) if m else None


def _value(m: dict[str, Any] | None) -> float | None:
    if m is None:
        return None
    v = m.get("value")
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def _summarise_layer(layer: int, comparisons: list[dict[str, Any]], baseline: str) -> dict[str, Any]:
    rows = [c for c in comparisons if c["layer"] == layer]
    by_kind: dict[str, dict[str, Any]] = {}
    for c in rows:
        key = c["kind"] if c["kind"] in ("ceiling", "floor") else f"{c['kind']}:{c['a']}"
        by_kind[key] = {name: _metric(c["report"], name) for name in HEADLINE_METRICS}
    ceiling = by_kind.get("ceiling", {}).get("decoder_matched_cosine")
    floor = by_kind.get("floor", {}).get("decoder_matched_cosine")
    warnings = []
    separation = None
    if ceiling and floor and _value(ceiling) is not None and _value(floor) is not None:
        separation = _value(ceiling) - _value(floor)
        c_low = ceiling["ci_low"] if ceiling.get("ci_low") is not None else _value(ceiling)
        f_high = floor["ci_high"] if floor.get("ci_high") is not None else _value(floor)
        clear = c_low > f_high and separation > 0.05
        if not clear:
            warnings.append(
                f"layer {layer}: the seed-to-seed ceiling (matched cosine {_value(ceiling):.3f}) does not stand "
                f"clear of the random floor ({_value(floor):.3f}); train longer (raise training_samples / "
                "train_tokens) before reading precision effects."
            )
    precisions = sorted({c["a"] for c in rows if c["kind"] in ("same_seed", "different_seed")})
    effects = {}
    for p in precisions:
        diff = by_kind.get(f"different_seed:{p}", {}).get("decoder_matched_cosine")
        same = by_kind.get(f"same_seed:{p}", {}).get("decoder_matched_cosine")
        effects[p] = {
            "matched_cosine_different_seed": diff,
            "matched_cosine_same_seed": same,
            "precision_effect_vs_ceiling": (_value(diff) - _value(ceiling))
            if diff and ceiling and _value(diff) is not None and _value(ceiling) is not None
            else None,
            "fraction_of_ceiling_above_floor": ((_value(diff) - _value(floor)) / separation)
            if diff and separation and _value(diff) is not None and separation > 1e-9
            else None,
        }
    return {
        "layer": layer,
        "baseline": baseline,
        "ceiling": by_kind.get("ceiling"),
        "floor": by_kind.get("floor"),
        "ceiling_minus_floor": separation,
        "precisions": effects,
        "comparisons": {k: v for k, v in by_kind.items() if k not in ("ceiling", "floor")},
        "warnings": warnings,
    }


def _downsample(rows: list[dict[str, float]], n: int = 200) -> list[dict[str, float]]:
    if len(rows) <= n:
        return rows
    step = len(rows) / n
    return [rows[int(i * step)] for i in range(n)] + [rows[-1]]


def build_sweep_report(
    *,
    config: dict[str, Any],
    model_metadata: dict[str, dict[str, Any]],
    transfer: dict[str, Any],
    saelens_evals: dict[str, Any],
    comparisons: list[dict[str, Any]],
    train_stats: dict[str, Any],
    loss_histories: dict[str, list[dict[str, float]]],
    timings: dict[str, float],
) -> dict[str, Any]:
    """Assemble ``report.json``'s content from the sweep's parts (plain values only)."""
    from qsae_lens import __version__
    from qsae_lens.assets import DEFAULT_MODEL_NOTE

    baseline = config["baseline"]
    layers = config["layers_resolved"]
    summaries = [_summarise_layer(layer, comparisons, baseline) for layer in layers]
    notes = []
    if config.get("model") is None:
        notes.append(DEFAULT_MODEL_NOTE)
    warnings = [w for s in summaries for w in s["warnings"]]
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "qsae_lens_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": config,
        "notes": notes,
        "warnings": warnings,
        "models": {p: {**model_metadata.get(p, {}), **transfer["models"].get(p, {})} for p in model_metadata},
        "transfer": transfer["cells"],
        "saelens_run_evals": saelens_evals,
        "summary": summaries,
        "comparisons": [
            {k: v for k, v in c.items() if k != "report"}
            | {"metrics": c["report"].get("metrics", {}),
               "latent_categories": c["report"].get("latent_categories", {}),
               "matched_cosine_distribution": c["report"].get("distributions", {}).get("decoder_matched_cosine"),
               "warnings": c["report"].get("warnings", [])}
            for c in comparisons
        ],
        "training": train_stats,
        "loss_histories": {k: _downsample(v) for k, v in loss_histories.items()},
        "timings_s": timings,
    }


# --------------------------------------------------------------------------------------------
# markdown


def _f(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, dict):
        val = _value(v)
        if val is None:
            return "—"
        lo, hi = v.get("ci_low"), v.get("ci_high")
        ci = f" [{lo:.{digits}f}, {hi:.{digits}f}]" if lo is not None and hi is not None else ""
        return f"{val:.{digits}f}{ci}"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _cell(report: dict[str, Any], sae: str, model: str) -> dict[str, Any] | None:
    return next((c for c in report["transfer"] if c["sae"] == sae and c["model"] == model), None)


def sweep_markdown(report: dict[str, Any]) -> str:
    """The human summary: what quantization costs the model, how SAEs transfer, how features align."""
    cfg = report["config"]
    baseline = cfg["baseline"]
    precisions = list(report["models"])
    seed = cfg["seeds"][0]
    lines = [
        "# qsae_lens precision sweep",
        "",
        f"Model `{cfg['model_path']}` ({cfg['n_layers']} layers), corpus `{cfg['corpus']}`, "
        f"{cfg['architecture']} SAEs (d_sae {cfg['d_sae']}, k {cfg['k']}), hook `{cfg['hook']}`, "
        f"layers {cfg['layers_resolved']}, baseline **{baseline}**, device {cfg['device']}. "
        f"{cfg['training_samples']:,} training samples over {cfg['train_tokens']:,} cached tokens per precision; "
        f"total {report['timings_s'].get('total_s', 0):.0f} s.",
        "",
    ]
    lines += [f"> **Note.** {n}" for n in report["notes"]]
    lines += [f"> **Warning.** {w}" for w in report["warnings"]]
    lines += ["", "## The model's own quantization cost (held-out tokens)", "",
              "| precision | quant type | compute dtype | CE (nats) | ΔCE vs baseline | KL vs baseline |",
              "|---|---|---|---|---|---|"]
    for p in precisions:
        m = report["models"][p]
        lines.append(f"| {p} | {m.get('quant_type') or '—'} | {m.get('compute_dtype') or '—'} | {_f(m.get('ce_loss'))} | "
                     f"{_f(m.get('ce_increase_vs_baseline'))} | {_f(m.get('kl_vs_baseline'))} |")
    for s in report["summary"]:
        layer = s["layer"]
        lines += ["", f"## Layer {layer}", "",
                  "### Transfer: SAE trained at row precision, spliced into the column precision's model", "",
                  "Explained variance / CE increase (nats) with the SAE spliced in; same held-out tokens in every cell.", "",
                  "| SAE \\ model | " + " | ".join(precisions) + " |", "|---|" + "---|" * len(precisions)]
        for p in precisions:
            sae = f"{p}/L{layer}/s{seed}"
            cells = []
            for q in precisions:
                c = _cell(report, sae, q)
                cells.append("—" if c is None else f"{_f(c['explained_variance'])} / {c['ce_increase']:+.3f}")
            lines.append(f"| **{p}** | " + " | ".join(cells) + " |")
        lines += ["", "### Each SAE on its own precision's model", "",
                  "| SAE | EV | ΔCE | KL | CE recovered vs mean ablation | L0 | dead fraction |", "|---|---|---|---|---|---|---|"]
        for p in precisions:
            for sae in sorted(c["sae"] for c in report["transfer"] if c["model"] == p and c["sae"].startswith(f"{p}/L{layer}/")):
                c = _cell(report, sae, p)
                lines.append(f"| {sae} | {_f(c['explained_variance'])} | {_f(c['ce_increase'])} | {_f(c['kl'])} | "
                             f"{_f(c['ce_recovered_vs_mean_ablation'])} | {_f(c['l0'], 1)} | {_f(c['dead_fraction'])} |")
        lines += ["", "### Feature alignment against the baseline (matched decoder cosine, 95% CI)", "",
                  f"Ceiling (baseline seed {cfg['ceiling_seed']} vs seed {seed}): **{_f(s['ceiling'] and s['ceiling']['decoder_matched_cosine'])}**; "
                  f"floor (random SAE): **{_f(s['floor'] and s['floor']['decoder_matched_cosine'])}**.", "",
                  "| precision | different seed | same seed (init shared) | effect vs ceiling | share of ceiling above floor | activation CKA | matched latent corr. |",
                  "|---|---|---|---|---|---|---|"]
        for p, e in s["precisions"].items():
            comp = s["comparisons"].get(f"different_seed:{p}", {})
            lines.append(f"| {p} | {_f(e['matched_cosine_different_seed'])} | {_f(e['matched_cosine_same_seed'])} | "
                         f"{_f(e['precision_effect_vs_ceiling'])} | {_f(e['fraction_of_ceiling_above_floor'])} | "
                         f"{_f(comp.get('activation_cka'))} | {_f(comp.get('latent_activation_correlation_matched'))} |")
    if report.get("saelens_run_evals"):
        lines += ["", "## SAELens `run_evals` (each SAE on its own model; CE recovered there is vs zero ablation)", "",
                  "| SAE | explained variance | CE loss score | L0 |", "|---|---|---|---|"]
        for sae, m in sorted(report["saelens_run_evals"].items()):
            lines.append(f"| {sae} | {_f(m.get('reconstruction_quality/explained_variance'))} | "
                         f"{_f(m.get('model_performance_preservation/ce_loss_score'))} | {_f(m.get('sparsity/l0'), 1)} |")
    lines += ["", "## Timings", "", "| step | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in report["timings_s"].items()]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# figures


def sweep_figures(report: dict[str, Any]) -> dict[str, Any]:
    """Plotly figures: transfer heatmaps, matched-cosine distributions, latent categories, loss curves."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    cfg = report["config"]
    precisions = list(report["models"])
    seed = cfg["seeds"][0]
    figs: dict[str, Any] = {}
    for layer in cfg["layers_resolved"]:
        saes = [f"{p}/L{layer}/s{seed}" for p in precisions]
        ev = [[(_cell(report, s, q) or {}).get("explained_variance") for q in precisions] for s in saes]
        dce = [[(_cell(report, s, q) or {}).get("ce_increase") for q in precisions] for s in saes]
        fig = make_subplots(rows=1, cols=2, subplot_titles=("explained variance", "CE increase (nats)"),
                            horizontal_spacing=0.16)
        fig.add_trace(go.Heatmap(z=ev, x=precisions, y=precisions, colorscale="Viridis", texttemplate="%{z:.3f}",
                                 colorbar={"x": 0.43, "thickness": 14}), 1, 1)
        fig.add_trace(go.Heatmap(z=dce, x=precisions, y=precisions, colorscale="Reds", texttemplate="%{z:.3f}"), 1, 2)
        fig.update_layout(title=f"Layer {layer}: SAE trained at row precision, spliced into column precision's model",
                          height=420)
        fig.update_yaxes(autorange="reversed")
        fig.update_yaxes(title_text="SAE trained at", row=1, col=1)
        fig.update_xaxes(title_text="model precision")
        figs[f"transfer_layer{layer}"] = fig

        dist = go.Figure()
        for c in report["comparisons"]:
            if c["layer"] != layer or c["kind"] == "same_seed":
                continue
            d = c.get("matched_cosine_distribution") or {}
            hist = d.get("histogram")
            if not hist:
                continue
            edges, counts = hist["edges"], hist["counts"]
            total = max(sum(counts), 1)
            centres = [(edges[i] + edges[i + 1]) / 2 for i in range(len(counts))]
            label = {"ceiling": f"ceiling ({c['b']} seed vs seed)", "floor": "floor (random SAE)"}.get(
                c["kind"], f"{c['a']} vs {c['b']} (different seed)")
            dash = {"ceiling": "dash", "floor": "dot"}.get(c["kind"])
            dist.add_trace(go.Scatter(x=centres, y=[n / total for n in counts], mode="lines", name=label,
                                      line={"dash": dash, "shape": "hvh"}))
        dist.update_layout(title=f"Layer {layer}: matched decoder cosine per latent (Hungarian)",
                           xaxis_title="cosine", yaxis_title="fraction of latents", height=420)
        figs[f"matched_cosine_layer{layer}"] = dist

        cat = go.Figure()
        seen = set()
        names = None
        by_sae: dict[str, dict[str, int]] = {}
        for c in report["comparisons"]:
            lc = c.get("latent_categories") or {}
            if c["layer"] != layer or not lc.get("names"):
                continue
            names = lc["names"]
            for side in ("a", "b"):
                who = c[side] if c["kind"] != "ceiling" or side == "b" else f"{c['a']} (seed {cfg['ceiling_seed']})"
                if who not in seen and who != "random":
                    seen.add(who)
                    by_sae[who] = lc[side]
        if names:
            for name in names:
                cat.add_trace(go.Bar(name=name, x=list(by_sae), y=[by_sae[s].get(name, 0) for s in by_sae]))
            cat.update_layout(barmode="stack", title=f"Layer {layer}: latent categories on held-out tokens",
                              yaxis_title="latents", height=420)
            figs[f"categories_layer{layer}"] = cat

    loss = go.Figure()
    for label, rows in sorted(report["loss_histories"].items()):
        key = "mse_loss" if rows and "mse_loss" in rows[0] else "loss"
        loss.add_trace(go.Scatter(x=[r["tokens"] for r in rows], y=[r.get(key) for r in rows], mode="lines",
                                  name=label))
    loss.update_layout(title="Training loss (normalised MSE for openai_topk)", xaxis_title="training samples",
                       yaxis_title="loss", yaxis_type="log", height=420)
    figs["loss_curves"] = loss
    return figs


def sweep_html(report: dict[str, Any]) -> str:
    """One self-contained page (plotly.js inlined once, so it opens offline)."""
    figs = sweep_figures(report)
    parts = []
    for i, fig in enumerate(figs.values()):
        parts.append(fig.to_html(full_html=False, include_plotlyjs=(i == 0)))
    md = html.escape(sweep_markdown(report))
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>qsae_lens precision sweep</title>"
        "<style>body{font-family:system-ui,sans-serif;max-width:1200px;margin:auto;padding:1em}"
        "pre{white-space:pre-wrap;background:#f6f8fa;padding:1em}</style></head><body>"
        "<h1>qsae_lens precision sweep</h1>" + "\n".join(parts) + f"<h2>Summary</h2><pre>{md}</pre></body></html>"
    )


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_sweep_report(report: dict[str, Any], out_dir: str | os.PathLike[str]) -> Path:
    """Write ``report.json``, ``report.md`` and ``report.html`` into ``out_dir`` (atomically)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # strict JSON: NaN (e.g. a correlation of latents that never fire) is written as null
    _atomic_write(out / "report.json", json.dumps(_nan_to_none(report), indent=2, default=str, allow_nan=False))
    _atomic_write(out / "report.md", sweep_markdown(report))
    _atomic_write(out / "report.html", sweep_html(report))
    return out


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    return obj
