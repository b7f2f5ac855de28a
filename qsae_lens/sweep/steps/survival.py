"""Sweep step ``survival``: the baseline SAE frozen on every precision's activations, per layer, plus the atlas.

Per (non-baseline precision, layer): the baseline precision's SAE (first seed) encodes the
baseline's and that precision's eval activations of the same tokens
(:func:`qsae_lens.survival.feature_survival`); the transposed view (that precision's own SAE frozen
on the baseline's activations); the survival predictor (reference-only statistics plus the
alignment of decoder directions with the weight-quantization error of the blocks at and below the
layer). Per layer: a feature atlas of the baseline SAE read by every precision's model under
``survival/atlas/layer<L>/index.html``. Every result folder is reused only when its inputs (SAE
content hashes, cache manifests, settings) are unchanged (:func:`qsae_lens.sweep.reuse.run_or_reuse`).
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qsae_lens.report.section import ReportSection, figure_html, html_table, markdown_table
from qsae_lens.survival import STATUSES, SurvivalReport, feature_survival, transposed_survival
from qsae_lens.survival.predictor import ANCHOR_AUC, SurvivalPredictor, predict_survival

NAME = "survival"

N_BOOTSTRAP = 200
"""Bootstrap replicates of the status fractions (over 16 token windows)."""
ATLAS_LATENTS = 48
"""Latents given a page in each layer's atlas (spread over statuses)."""
ATLAS_WINDOWS = 64
"""Eval windows the atlas's examples are drawn from."""

ANCHOR = ("Duan 2026 (frozen SAE, weight-only INT6): 62.4% (Pythia-70M) and 51.3% (Gemma-2-2B) of active "
          f"features survive; survival predicted from full-precision statistics with AUC {ANCHOR_AUC[0]}-{ANCHOR_AUC[1]}.")


@dataclass
class SurvivalStepResult:
    """What the survival step produced (keys ``"<precision>/L<layer>"``)."""

    baseline: str
    reports: dict[str, SurvivalReport]
    """The baseline SAE frozen on each precision's activations."""
    transposed: dict[str, SurvivalReport]
    """Each precision's own SAE frozen on the baseline's activations."""
    predictors: dict[str, SurvivalPredictor]
    atlas: dict[int, str] = field(default_factory=dict)
    """Layer -> atlas index path, relative to the sweep folder."""

    def __repr__(self) -> str:
        rows = "; ".join(f"{k}: survived {r.fractions['survived']!r}" for k, r in self.reports.items())
        return f"SurvivalStepResult(baseline={self.baseline}, {rows})"


def _cache_id(plan: Any, precision: str, layer: int) -> str:
    from qsae_lens._io import file_sha256
    from qsae_lens.activations import MANIFEST

    return file_sha256(plan.cache_dir(precision, "eval", layer) / MANIFEST)


def run_step(plan: Any, core: Any) -> SurvivalStepResult:
    """Run (or reuse) survival for every non-baseline precision and layer, and the atlas per layer."""
    import torch

    from qsae_lens._io import json_sha256
    from qsae_lens.sweep.plan import CellKey
    from qsae_lens.sweep.reuse import run_or_reuse, sae_identity

    out = plan.step_dir(NAME)
    seed = plan.seeds[0]
    reports: dict[str, SurvivalReport] = {}
    transposed: dict[str, SurvivalReport] = {}
    predictors: dict[str, SurvivalPredictor] = {}
    atlas: dict[int, str] = {}
    n_boot = int(getattr(plan.config, "n_bootstrap", N_BOOTSTRAP) or N_BOOTSTRAP)
    for layer in plan.layers:
        hook = plan.hook_name(layer)
        base_key = CellKey(plan.baseline, layer, seed)
        sae = core.saes[base_key]
        ref_cache: dict[str, Any] = {}  # the baseline's eval activations, loaded once per layer when needed
        own: dict[str, Any] = {}
        for p in plan.precision_names:
            if p == plan.baseline:
                continue
            q_key = CellKey(p, layer, seed)
            own[p] = core.saes.get(q_key)
            folder = out / p / f"layer{layer}"
            inputs = {"sae": sae_identity(base_key.dir(plan.out_dir)),
                      "sae_q": sae_identity(q_key.dir(plan.out_dir)) if own[p] is not None else None,
                      "cache_ref": _cache_id(plan, plan.baseline, layer), "cache_q": _cache_id(plan, p, layer),
                      "hook": hook, "n_bootstrap": n_boot, "version": 1}

            compute = functools.partial(_compute_cell, plan=plan, core=core, sae=sae, sae_q=own[p], precision=p,
                                        layer=layer, n_boot=n_boot, ref_cache=ref_cache)
            run_or_reuse(folder, inputs, compute)
            key = f"{p}/L{layer}"
            reports[key] = SurvivalReport.load(folder / "frozen")
            if (folder / "transposed").is_dir():
                transposed[key] = SurvivalReport.load(folder / "transposed")
            d = json.loads((folder / "predictor.json").read_text())
            predictors[key] = SurvivalPredictor(d["auc"] if d["auc"] is not None else math.nan, tuple(d["auc_folds"]),
                                                d["coefficients"], d["n_latents"], d["n_survived"])
        if core.models and core.eval_tokens is not None:
            from qsae_lens.dashboards import build_atlas

            a_folder = out / "atlas" / f"layer{layer}"
            layer_reports = {p: reports[f"{p}/L{layer}"] for p in plan.precision_names if f"{p}/L{layer}" in reports}
            a_inputs = {"sae": sae_identity(base_key.dir(plan.out_dir)),
                        "own": {p: sae_identity(CellKey(p, layer, seed).dir(plan.out_dir)) for p, s in own.items() if s is not None},
                        "reports": {p: json_sha256({"status": r.status}) for p, r in layer_reports.items()},
                        "n_latents": ATLAS_LATENTS, "n_windows": ATLAS_WINDOWS, "version": 1}

            def compute_atlas(tmp: Path, layer: int = layer, hook: str = hook, sae: Any = sae,
                              own: dict[str, Any] = own, layer_reports: dict[str, SurvivalReport] = layer_reports) -> None:
                tokens = torch.as_tensor(core.eval_tokens)[:ATLAS_WINDOWS]
                build_atlas(sae, core.models, tokens, hook, tmp / "site", reference=plan.baseline, n_latents=ATLAS_LATENTS,
                            reports=layer_reports, own_saes={p: s for p, s in own.items() if s is not None},
                            note=f"{plan.baseline} SAE of layer {layer} frozen; the embedded model's fp32 is dequantized Q4_1")

            run_or_reuse(a_folder, a_inputs, compute_atlas)
            atlas[layer] = str((a_folder / "site" / "index.html").relative_to(plan.out_dir))
    return SurvivalStepResult(plan.baseline, reports, transposed, predictors, atlas)


def _compute_cell(tmp: Path, *, plan: Any, core: Any, sae: Any, sae_q: Any, precision: str, layer: int, n_boot: int,
                  ref_cache: dict[str, Any]) -> None:
    """One (precision, layer) cell: frozen survival, transposed survival, predictor, written into ``tmp``."""
    from qsae_lens._io import atomic_write_json
    from qsae_lens.activations import load_activations

    hook = plan.hook_name(layer)
    if hook not in ref_cache:
        ref_cache[hook] = load_activations(plan.cache_dir(plan.baseline, "eval", layer), hook)
    acts_ref = ref_cache[hook]
    acts_q = load_activations(plan.cache_dir(precision, "eval", layer), hook)
    if acts_q.shape != acts_ref.shape:
        raise ValueError(f"eval caches of {plan.baseline} and {precision} at {hook} hold different rows "
                         f"({tuple(acts_ref.shape)} vs {tuple(acts_q.shape)}): rebuild them from the same tokens")
    rep = feature_survival(sae, acts_ref, acts_q, n_bootstrap=n_boot, progress=True,
                           label=f"{plan.baseline} SAE L{layer} frozen on {precision}")
    rep.save(tmp / "frozen")
    if sae_q is not None:
        transposed_survival(sae_q, acts_ref, acts_q, n_bootstrap=n_boot,
                            label=f"{precision} SAE L{layer} frozen on {plan.baseline}").save(tmp / "transposed")
    atomic_write_json(tmp / "predictor.json", _predict(rep, sae, core.models, plan.baseline, precision, layer).to_dict())


def _predict(rep: SurvivalReport, sae: Any, models: dict[str, Any], baseline: str, p: str, layer: int) -> SurvivalPredictor:
    """The survival predictor for one cell, with the weight-error alignment when both models are loaded."""
    import torch

    from qsae_lens.survival.predictor import quantization_errors, reference_features, weight_error_alignment

    err = None
    if models and baseline in models and p in models:
        try:
            err = weight_error_alignment(sae.W_dec.detach(), quantization_errors(models[baseline], models[p], layer))
        except (AttributeError, KeyError, RuntimeError):  # a model type without readable linears: go without
            err = None
    X, names = reference_features(rep, sae, err_align=err)
    st = rep.status
    alive = torch.tensor([s in ("survived", "blurred", "died") for s in st])
    y = torch.tensor([s == "survived" for s in st])
    return predict_survival(X[alive], y[alive], names)


def report_section(result: SurvivalStepResult) -> ReportSection:
    """Fractions with CIs per (precision, layer), the threshold curves, the predictor's AUC, links to the atlas."""
    import plotly.graph_objects as go

    header = ["cell", "survived", "95% CI", "blurred", "died", "born", "dead", "transposed survived", "predictor AUC"]
    rows, data = [], {"baseline": result.baseline, "anchor": ANCHOR, "cells": {}, "atlas": result.atlas}
    fig = go.Figure()
    for key, rep in result.reports.items():
        f = rep.fractions
        c = rep.counts()
        tr = result.transposed.get(key)
        pred = result.predictors.get(key)
        rows.append([key, f["survived"].value, f"[{f['survived'].lo:.3f}, {f['survived'].hi:.3f}]", f["blurred"].value,
                     f["died"].value, c["born"], c["dead"], tr.fractions["survived"].value if tr else None,
                     pred.auc if pred else None])
        data["cells"][key] = {"frozen": rep.to_dict(), "transposed": tr.to_dict() if tr else None,
                              "predictor": pred.to_dict() if pred else None}
        fig.add_trace(go.Scatter(x=rep.curve_thresholds, y=rep.curve, mode="lines+markers", name=key))
    fig.update_layout(title="Survived fraction of active latents vs the Pearson threshold (Jaccard >= 0.5)",
                      xaxis_title="Pearson threshold", yaxis_title="survived fraction", height=380)
    intro = (f"The {result.baseline} SAE of each layer, frozen, encodes the {result.baseline} and each precision's "
             "activations of the same eval tokens. Fractions of survived/blurred/died are over latents active in "
             f"the {result.baseline} model (CI: bootstrap over 16 token windows); born/dead are counts. Statuses: "
             + ", ".join(STATUSES) + " (thresholds in docs/survival.md). " + ANCHOR
             + " The embedded model's fp32 is dequantized Q4_1.")
    links_md = "\n".join(f"- layer {L}: [{p}]({p})" for L, p in result.atlas.items())
    links_html = "".join(f"<li>layer {L}: <a href='{p}'>{p}</a></li>" for L, p in result.atlas.items())
    md = intro + "\n\n" + markdown_table(header, rows) + "\n\nFeature atlas (paths relative to the sweep folder):\n" + links_md
    html = (f"<p>{intro}</p>" + html_table(header, rows) + figure_html(fig)
            + f"<p>Feature atlas:</p><ul>{links_html}</ul>")
    return ReportSection(key=NAME, title="Feature survival (frozen SAE)", order=40, data=data, markdown=md, html=html)


# --------------------------------------------------------------------------------------------- `qsae atlas`
def add_atlas_arguments(parser: Any) -> None:
    """Options of ``qsae atlas SWEEP_DIR --out DIR``."""
    parser.add_argument("sweep_dir", help="a finished sweep's output folder (holds sweep_config.json and saes/)")
    parser.add_argument("--out", required=True, help="folder to write the site into (replaced whole)")
    parser.add_argument("--layer", type=int, default=None, help="layer (default: the sweep's first layer)")
    parser.add_argument("--latents", type=int, default=ATLAS_LATENTS, help="latents given a page")
    parser.add_argument("--windows", type=int, default=ATLAS_WINDOWS, help="held-out windows the examples come from")
    parser.add_argument("--device", default="cpu")


def _plan_from_folder(sweep_dir: Path, device: str) -> Any:
    """The SweepPlan of a finished sweep, rebuilt from its recorded ``sweep_config.json``."""
    import dataclasses

    from qsae_lens.sweep.config import SweepConfig
    from qsae_lens.sweep.run import plan_sweep

    rec_path = sweep_dir / "sweep_config.json"
    if not rec_path.is_file():
        raise FileNotFoundError(f"{sweep_dir} has no sweep_config.json: pass the output folder of a finished `qsae sweep`")
    rec = json.loads(rec_path.read_text())
    names = {f.name for f in dataclasses.fields(SweepConfig)}
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in rec.items() if k in names}
    kw["model"] = rec.get("model_path", kw.get("model"))
    kw["layers"] = tuple(rec.get("layers_resolved") or kw.get("layers") or ())
    kw["device"] = device
    return plan_sweep(SweepConfig(**kw), sweep_dir)


def run_atlas_command(args: Any) -> int:
    """Build the feature atlas of a finished sweep's baseline SAE at one layer, read by every precision."""
    from qsae_lens.dashboards import build_atlas
    from qsae_lens.models import load_model
    from qsae_lens.sweep.data import prepare_data
    from qsae_lens.sweep.plan import CellKey

    sweep_dir = Path(args.sweep_dir)
    plan = _plan_from_folder(sweep_dir, args.device)
    layer = plan.layers[0] if args.layer is None else args.layer
    if layer not in plan.layers:
        raise ValueError(f"--layer {layer} is not a layer of this sweep (its layers: {list(plan.layers)})")
    from sae_lens import SAE

    def _load(p: str) -> Any:
        d = CellKey(p, layer, plan.seeds[0]).dir(sweep_dir)
        return SAE.load_from_disk(str(d), device=args.device).eval() if (d / "cfg.json").is_file() else None

    sae = _load(plan.baseline)
    if sae is None:
        raise FileNotFoundError(f"no {plan.baseline} SAE for layer {layer} under {sweep_dir / 'saes'}: finish the sweep first")
    own = {p: s for p in plan.precision_names if p != plan.baseline and (s := _load(p)) is not None}
    reports = {}
    for p in own:
        f = plan.step_dir(NAME) / p / f"layer{layer}" / "frozen"
        if (f / "survival.json").is_file():
            reports[p] = SurvivalReport.load(f)
    tokens = prepare_data(plan).eval_tokens[: args.windows]
    models = {p: load_model(plan.model_path, p, device=args.device) for p in plan.precision_names}
    res = build_atlas(sae, models, tokens, plan.hook_name(layer), args.out, reference=plan.baseline,
                      n_latents=args.latents, reports=reports, own_saes=own, progress=True,
                      note=f"{plan.baseline} SAE of layer {layer} frozen; the embedded model's fp32 is dequantized Q4_1")
    print(f"wrote {len(res.latents)} latent pages: {Path(args.out) / 'index.html'}")
    return 0
