"""Sweep step "interventions": does steering found at the baseline move every precision the same way?

For the first swept layer: (1) the built-in code/comment CAA vector (from the baseline model) applied
at every precision on held-out code prompts: effect on log p("#") - log p("return") with a bootstrap
CI over prompts, ratio to the baseline's effect, KL cost; (2) the 8 most frequent alive latents of the
baseline SAE (seed 0) steered at 4x their typical max activation at every precision: per-latent effect on
log p(the latent's most promoted token) and the Pearson correlation of those effects with the baseline's.
Cheap by design (a few dozen short forwards per precision). Reuse is keyed by the baseline SAE's content
hash and these settings (:func:`qsae_lens.sweep.reuse.run_or_reuse`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qsae_lens.report.section import ReportSection, figure_html, html_table, markdown_table

NAME = "interventions"
N_LATENTS = 8
FEATURE_STRENGTH = 4.0
"""Feature steering strength, in units of each latent's typical max activation (top-10 mean)."""
CAA_STRENGTH = 1.0
N_FREQ_WINDOWS = 8
"""Eval windows used to rank latents by firing frequency and to set their typical max activation."""
VERSION = 1


@dataclass(frozen=True)
class InterventionsStepResult:
    """Per-precision CAA effects and per-latent feature-steering effects (see the module docstring)."""

    baseline: str
    layer: int
    hook_name: str
    caa_norm: float
    caa_agreement: float
    caa: dict[str, dict[str, float]]
    """precision -> {effect, effect_lo, effect_hi, ratio, ratio_lo, ratio_hi, kl, kl_lo, kl_hi}."""
    latents: list[int]
    feature_effects: dict[str, list[float]]
    """precision -> per-latent mean change of log p(target token), aligned with ``latents``."""
    feature_pearson: dict[str, float]

    @classmethod
    def load(cls, folder: Path) -> InterventionsStepResult:
        return cls(**json.loads((folder / "result.json").read_text()))


def run_step(plan: Any, core: Any) -> InterventionsStepResult:
    """Compute (or reuse) the interventions result for the first swept layer."""
    from qsae_lens.sweep.plan import CellKey
    from qsae_lens.sweep.reuse import run_or_reuse, sae_identity

    layer = plan.layers[0]
    key = CellKey(plan.baseline, layer, plan.seeds[0])
    folder = plan.step_dir(NAME) / f"layer{layer}"
    inputs = {"version": VERSION, "baseline_sae": sae_identity(key.dir(plan.out_dir)),
              "precisions": list(core.models), "layer": layer, "hook": plan.hook_name(layer),
              "n_latents": N_LATENTS, "feature_strength": FEATURE_STRENGTH, "caa_strength": CAA_STRENGTH,
              "n_freq_windows": N_FREQ_WINDOWS,
              "weights": {p: m.precision_metadata.get("weights_sha256") for p, m in core.models.items()}}

    def compute(tmp: Path) -> None:
        from qsae_lens._io import atomic_write_json

        res = compute_interventions(core.models, core.saes[key], core.eval_tokens[:N_FREQ_WINDOWS],
                                    baseline=plan.baseline, hook_name=plan.hook_name(layer), layer=layer)
        atomic_write_json(tmp / "result.json", res.__dict__)

    run_or_reuse(folder, inputs, compute)
    return InterventionsStepResult.load(folder)


def compute_interventions(models: dict[str, Any], sae: Any, tokens: Any, *, baseline: str, hook_name: str,
                          layer: int) -> InterventionsStepResult:
    """The step's measurements on loaded models (``tokens``: ``Tensor[n, pos]`` eval windows)."""
    import torch

    from qsae_lens.interventions.caa import (
        CODE_COMMENT_PAIRS,
        CODE_COMMENT_TARGET,
        CODE_COMMENT_TEST_PROMPTS,
        caa_vector,
        logprob_diff_measure,
    )
    from qsae_lens.interventions.steering import steer, typical_max_activation
    from qsae_lens.interventions.transfer import feature_effect_correlation, intervention_transfer

    base = models[baseline]
    caa = caa_vector(base, *CODE_COMMENT_PAIRS, hook_name=hook_name)
    transfer = intervention_transfer(
        models, lambda m: steer(m, caa.vector, CAA_STRENGTH, hook_name=hook_name),
        CODE_COMMENT_TEST_PROMPTS, lambda m: logprob_diff_measure(m, *CODE_COMMENT_TARGET), baseline=baseline)
    caa_rows = {p: {"effect": e.effect.value, "effect_lo": e.effect.ci_low, "effect_hi": e.effect.ci_high,
                    "ratio": e.ratio.value, "ratio_lo": e.ratio.ci_low, "ratio_hi": e.ratio.ci_high,
                    "kl": e.kl.value, "kl_lo": e.kl.ci_low, "kl_hi": e.kl.ci_high}
                for p, e in transfer.effects.items()}

    with torch.no_grad():  # firing frequency of every latent on the eval windows (special tokens excluded)
        _, cache = base.run_with_cache(tokens, names_filter=[hook_name], stop_at_layer=layer + 1)
        codes = sae.encode(cache[hook_name].to(sae.W_dec.dtype))
        special = torch.tensor(sorted(set(base.tokenizer.all_special_ids)))
        keep = ~torch.isin(tokens.cpu(), special)
        freq = (codes[keep.to(codes.device)] > 0).float().mean(0)
    latents = freq.topk(N_LATENTS).indices.sort().values.tolist()
    max_act = typical_max_activation(base, sae, tokens, latents, hook_name=hook_name)
    corr = feature_effect_correlation(models, sae, latents, CODE_COMMENT_TEST_PROMPTS[:4],
                                      strength=FEATURE_STRENGTH, max_activations=max_act, baseline=baseline)
    return InterventionsStepResult(
        baseline, layer, hook_name, caa.norm, caa.pair_agreement, caa_rows, latents,
        {p: v.tolist() for p, v in corr.effects.items()}, corr.pearson)


def report_section(result: InterventionsStepResult) -> ReportSection:
    """Table of CAA effect / ratio / KL and feature-effect correlation per precision, and two figures."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    header = ["precision", "CAA effect", "95% CI", "ratio to baseline", "ratio 95% CI", "KL (nats)",
              f"feature-effect r vs {result.baseline}"]
    rows = [[p, c["effect"], f"[{c['effect_lo']:+.3f}, {c['effect_hi']:+.3f}]", c["ratio"],
             f"[{c['ratio_lo']:.2f}, {c['ratio_hi']:.2f}]", c["kl"], result.feature_pearson.get(p)]
            for p, c in result.caa.items()]
    fig = make_subplots(rows=1, cols=2, subplot_titles=(
        "CAA code→comment effect (95% CI)", f"per-latent steering effect vs {result.baseline}"))
    names = list(result.caa)
    fig.add_trace(go.Bar(x=names, y=[result.caa[p]["effect"] for p in names], error_y={
        "type": "data", "symmetric": False,
        "array": [result.caa[p]["effect_hi"] - result.caa[p]["effect"] for p in names],
        "arrayminus": [result.caa[p]["effect"] - result.caa[p]["effect_lo"] for p in names]},
        name="CAA effect"), row=1, col=1)
    base = result.feature_effects[result.baseline]
    for p in names:
        if p == result.baseline:
            continue
        fig.add_trace(go.Scatter(x=base, y=result.feature_effects[p], mode="markers", name=p,
                                 text=[f"latent {i}" for i in result.latents]), row=1, col=2)
    fig.update_xaxes(title_text=f"{result.baseline} effect", row=1, col=2)
    fig.update_yaxes(title_text="Δ log p(#) − Δ log p(return)", row=1, col=1)
    fig.update_layout(height=380, margin={"t": 40})
    note = (f"Layer {result.layer} ({result.hook_name}). CAA vector from the built-in code/comment pairs at "
            f"{result.baseline}: norm {result.caa_norm:.3g}, pair agreement {result.caa_agreement:.3f}; applied "
            f"at strength {CAA_STRENGTH} on held-out code prompts. Feature effects: latents {result.latents} "
            f"(most frequent alive of the {result.baseline} SAE) steered at {FEATURE_STRENGTH}x their typical max "
            "activation. The fp32 of the embedded SmolLM2 is dequantized Q4_1.")
    return ReportSection(
        key=NAME, title="Interventions across precisions", order=45, data=dict(result.__dict__),
        markdown=note + "\n\n" + markdown_table(header, rows),
        html=f"<p>{note}</p>" + html_table(header, rows) + figure_html(fig))
