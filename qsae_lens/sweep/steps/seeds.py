"""Sweep analysis "seeds": the headline, with seeds as the unit of replication (issue 9).

For each layer, from the trained SAEs in ``core.saes`` (computed here with the alignment functions, so it
does not depend on the comparison step's file format): per-latent decoder metrics for every pair of
baseline seeds (the ceiling), every (baseline seed, precision seed) pair, and every pair of precision seeds
(which lets the permutation test relabel SAEs exactly); then, per precision and metric,
:func:`qsae_lens.compare.seeds.seed_effect`. The bar (:func:`qsae_lens.compare.seeds.sharing_bar`): the
baseline seed pairs must share features above the anisotropic null, else the section's first line says the
SAEs are too undertrained for any conclusion and the headline table is withheld.

``report.json["precision_effects"][precision][metric]`` = ``{"value", "ceiling", "effect", "ci_low",
"ci_high", "p_value", "n_pairs", ...}`` (layer ``L`` of a multi-layer sweep under ``"<precision>/L<L>"``).
"""

from __future__ import annotations

import dataclasses
import json
from itertools import combinations
from pathlib import Path
from typing import Any

import torch

from qsae_lens.report.section import ReportSection, html_table, markdown_table

NAME = "seeds"
METRICS = ("decoder_matched_cosine", "decoder_matched_fraction_above_0.5", "decoder_mutual_nn_fraction")


@dataclasses.dataclass
class SeedsStepResult:
    """Per layer: the bar, and per precision and metric the seed-level effect (plain dicts, as in report.json)."""

    baseline: str
    bars: dict[int, dict[str, Any]]
    """Layer -> SharingBar as a dict (``cleared``, ``observed``, ``null``, ``p_values``, ``message``...)."""
    effects: dict[str, dict[str, dict[str, Any]]]
    """``"<precision>"`` (or ``"<precision>/L<layer>"`` with several layers) -> metric -> SeedEffect dict."""
    floor: dict[int, dict[str, float]]
    """Layer -> metric -> mean value of baseline seeds against an anisotropy-matched random SAE."""

    def __repr__(self) -> str:
        cleared = {L: b["cleared"] for L, b in self.bars.items()}
        return f"SeedsStepResult(baseline={self.baseline}, bar cleared={cleared}, {len(self.effects)} precisions)"


BAR_NULL_DRAWS = 199
"""Mirror-image null draws per baseline seed pair for the sharing bar (p floor 1/200, below alpha 0.01)."""

def _per_latent(dec_a: torch.Tensor, dec_b: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-latent values Tensor[d_sae] of each headline metric for one pair of decoders [d_sae, d_in]."""
    from qsae_lens.compare.alignment import mutual_nearest_neighbours, one_to_one_matching

    m = one_to_one_matching(dec_a, dec_b)
    return {
        "decoder_matched_cosine": m.cosine.double(),
        "decoder_matched_fraction_above_0.5": (m.cosine > 0.5).double(),
        "decoder_mutual_nn_fraction": mutual_nearest_neighbours(dec_a, dec_b).double(),
    }


def _layer_effects(plan: Any, saes: dict[Any, Any], layer: int, n_boot: int, n_perm: int, seed: int
                   ) -> tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, float]]:
    from qsae_lens.compare.nulls import reflect, reflection_basis
    from qsae_lens.compare.seeds import seed_effect, sharing_bar

    dec = {(k.precision, k.seed): saes[k].W_dec.detach().float().cpu() for k in saes if k.layer == layer}
    base = plan.baseline
    b_seeds = sorted(s for p, s in dec if p == base)
    if len(b_seeds) < 2:
        raise ValueError(f"seeds step: layer {layer} has {len(b_seeds)} baseline seed(s); the ceiling needs >= 2")
    ceiling = {(s, t): _per_latent(dec[(base, s)], dec[(base, t)]) for s, t in combinations(b_seeds, 2)}
    # the null: BAR_NULL_DRAWS mirror images of s' per pair (so that the bar's p can reach below alpha = 0.01);
    # the floor is each metric's mean over pairs and draws
    null_draws = {}
    for s, t in combinations(b_seeds, 2):
        basis = reflection_basis(dec[(base, t)], seed=seed)
        null_draws[(s, t)] = [
            _per_latent(dec[(base, s)], reflect(dec[(base, t)], basis, seed=seed + 97 * s + t + 7_919 * (i + 1)))
            for i in range(BAR_NULL_DRAWS)
        ]
    stacked = {m: {k: torch.stack([v[m] for v in draws]) for k, draws in null_draws.items()} for m in METRICS}
    bar = sharing_bar({k: v["decoder_matched_cosine"] for k, v in ceiling.items()}, stacked["decoder_matched_cosine"],
                      n_permutations=n_perm, seed=seed,
                      mnn_observed={k: v["decoder_mutual_nn_fraction"] for k, v in ceiling.items()},
                      mnn_null=stacked["decoder_mutual_nn_fraction"])  # fmt: skip
    floor = {m: float(torch.stack([x.mean() for x in stacked[m].values()]).mean()) for m in METRICS}
    effects: dict[str, dict[str, Any]] = {}
    for p in plan.precision_names:
        if p == base:
            continue
        p_seeds = sorted(s for q, s in dec if q == p)
        if not p_seeds:
            continue
        cross = {(s, t): _per_latent(dec[(base, s)], dec[(p, t)]) for s in b_seeds for t in p_seeds}
        within = {(s, t): _per_latent(dec[(p, s)], dec[(p, t)]) for s, t in combinations(p_seeds, 2)}
        effects[p] = {
            m: seed_effect({k: v[m] for k, v in ceiling.items()}, {k: v[m] for k, v in cross.items()},
                           within={k: v[m] for k, v in within.items()} or None,
                           n_bootstrap=n_boot, n_permutations=n_perm, seed=seed).to_dict()
            for m in METRICS
        }
    return bar._asdict(), effects, floor


def run_step(plan: Any, core: Any) -> SeedsStepResult:
    """Seed-level effects per precision and metric, the ceiling distribution, the floor and the bar.

    Reuses ``<out>/seeds/<layer>/`` when the SAE content hashes and statistics settings are unchanged.
    """
    from qsae_lens.compare.nulls import ANISOTROPIC_NULL_VERSION
    from qsae_lens.sweep.reuse import run_or_reuse, sae_identity

    cfg = plan.config
    n_boot = int(getattr(cfg, "n_bootstrap", 1000))
    n_perm = int(getattr(cfg, "n_permutations", 2000))
    seed = int(getattr(cfg, "seed", 0))
    bars, effects, floors = {}, {}, {}
    for layer in plan.layers:
        keys = sorted((k for k in core.saes if k.layer == layer), key=lambda k: (k.precision, k.seed))
        folder = plan.step_dir(NAME) / f"layer{layer}"
        inputs = {"saes": {k.label: sae_identity(k.dir(plan.out_dir)) for k in keys},
                  "n_bootstrap": n_boot, "n_permutations": n_perm, "seed": seed, "version": 4,
                  "null": f"anisotropic-v{ANISOTROPIC_NULL_VERSION}"}

        def compute(tmp: Path, layer: int = layer) -> None:
            bar, eff, floor = _layer_effects(plan, core.saes, layer, n_boot, n_perm, seed)
            from qsae_lens._io import atomic_write_json

            atomic_write_json(tmp / "seeds.json", {"bar": bar, "effects": eff, "floor": floor})

        run_or_reuse(folder, inputs, compute)
        data = json.loads((folder / "seeds.json").read_text())
        bars[layer], floors[layer] = data["bar"], data["floor"]
        for p, eff in data["effects"].items():
            effects[p if len(plan.layers) == 1 else f"{p}/L{layer}"] = eff
    return SeedsStepResult(baseline=plan.baseline, bars=bars, effects=effects, floor=floors)


def report_section(result: SeedsStepResult) -> ReportSection:
    """The headline first (order 0): effects with seed-level CIs, the ceiling distribution and the floor, or
    the statement that the SAEs are too undertrained for any conclusion, with the table withheld."""
    cleared = all(b["cleared"] for b in result.bars.values())
    data = {"precision_effects": result.effects, "bar": {str(k): v for k, v in result.bars.items()},
            "floor": {str(k): v for k, v in result.floor.items()}, "headline_withheld": not cleared}
    bar_lines = [f"Layer {L}: {b['message']}" for L, b in result.bars.items()]
    if not cleared:
        first = ("The SAEs are too undertrained for any conclusion: their baseline seed pairs do not share "
                 "features clearly above the anisotropic null, so the headline table is withheld.")
        md = first + "\n\n" + "\n".join(f"- {x}" for x in bar_lines)
        html = f"<p><strong>{first}</strong></p><ul>" + "".join(f"<li>{x}</li>" for x in bar_lines) + "</ul>"
        return ReportSection(key=NAME, title="Headline", order=0, data=data, markdown=md, html=html)
    header = ["precision", "metric", "value", "ceiling (baseline seed pairs)", "effect", "95% CI (seed bootstrap)",
              "p (one-sided, effect < 0)", "pairs"]
    rows = []
    for p, per_metric in result.effects.items():
        for m, e in per_metric.items():
            ceil = ", ".join(f"{x:.3f}" for x in e["ceiling_values"])
            rows.append([p, m, e["value"], f"{e['ceiling']:.4f} ({ceil})", f"{e['effect']:+.4f}",
                         f"[{e['ci_low']:+.4f}, {e['ci_high']:+.4f}]" if e["ci_low"] is not None else "n/a",
                         e["p_value_text"], f"{e['n_pairs']} vs {e['n_ceiling_pairs']}"])
    floor_rows = [[L, m, v] for L, f in result.floor.items() for m, v in f.items()]
    intro = (f"Each precision's SAEs against the {result.baseline} SAEs of other seeds, beside the seed-to-seed "
             "ceiling (every pair of baseline seeds). Effect = mean over (baseline seed, precision seed) pairs "
             "with different seeds minus the mean over baseline seed pairs; its CI resamples seeds (both sides, "
             "with replacement) with each pair's mean over latents as the unit; p is one-sided (effect < 0) from a permutation "
             "test exchanging precision labels across seeds, and at its floor reads '<= 1/N' (N relabelings): "
             "with 3 seeds per precision it cannot go below 1/20. The embedded model's fp32 is dequantized Q4_1.")
    md = (intro + "\n\n" + "\n".join(f"- {x}" for x in bar_lines) + "\n\n" + markdown_table(header, rows)
          + "\n\nFloor (baseline seeds against an anisotropy-matched random SAE):\n\n"
          + markdown_table(["layer", "metric", "floor"], floor_rows))
    html = (f"<p>{intro}</p><ul>" + "".join(f"<li>{x}</li>" for x in bar_lines) + "</ul>" + html_table(header, rows)
            + "<p>Floor (baseline seeds against an anisotropy-matched random SAE):</p>"
            + html_table(["layer", "metric", "floor"], floor_rows))
    return ReportSection(key=NAME, title="Headline", order=0, data=data, markdown=md, html=html)
