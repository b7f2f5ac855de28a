"""Sweep step 5: compare SAEs pairwise at each layer, against the seed-to-seed ceiling and a floor.

The pairs (:func:`comparison_pairs`): every pair of baseline seeds (the **ceiling**: how alike two
SAEs trained at the same precision are); per other precision, each of its seeds against the next
baseline seed in cyclic order (**different_seed**: every seed of both sides used once) and its first
seed against the baseline's first seed (**same_seed**: shared initialisation inflates alignment, so
it is shown apart); and an anisotropy-matched random SAE (:func:`qsae_lens.compare.nulls.
anisotropic_random_sae_like`: the baseline decoder's second moment, norms and biases, no learned
direction) against baseline seed 0 (the **floor**). A full comparison (activations, Procrustes,
CKA, categories) costs ~20 s at 1024 latents on a 2-core CPU, so not every cross pair gets one: the
seed-level statistics over *all* (baseline seed, precision seed) pairs come from the ``seeds``
analysis (:mod:`qsae_lens.sweep.steps.seeds`), which needs only the decoder matchings. Each :class:`~qsae_lens.compare.ComparisonReport` is kept in ``compare/<name>/`` with the
identities of its inputs (SAE content hashes, activations, statistics settings): it is reused only
when they are the same, so reordering seeds or retraining a cell can never attach a stale number
to a label, and a changed ``n_bootstrap`` recomputes the comparisons and nothing else.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, NamedTuple

import torch

from qsae_lens.sweep.plan import CellKey, SweepPlan
from qsae_lens.sweep.reuse import run_or_reuse

N_NULL_DRAWS = 39
"""Mirror-image null draws per comparison (``compare_saes(n_null_draws=...)``): p's floor is 1/40."""

FLOOR = "random"
"""The ``precision`` of the floor's pseudo cell key."""


class Pair(NamedTuple):
    """One comparison: SAE ``a`` against baseline SAE ``b`` at one layer."""

    kind: str
    """"ceiling" | "same_seed" | "different_seed" | "floor"."""
    a: CellKey
    """For the floor: ``CellKey("random", layer, seed of the random draw)``."""
    b: CellKey

    @property
    def name(self) -> str:
        """Folder name under ``compare/``, e.g. ``"L16_different_seed_nf4s0_vs_fp32s1"``."""
        return f"L{self.b.layer}_{self.kind}_{self.a.precision}s{self.a.seed}_vs_{self.b.precision}s{self.b.seed}"


class ComparisonRow(NamedTuple):
    """A finished comparison."""

    pair: Pair
    report: Any
    """The :class:`qsae_lens.compare.ComparisonReport`."""
    computed: bool


@dataclasses.dataclass
class ComparisonsResult:
    rows: list[ComparisonRow]

    def at(self, layer: int, kind: str | None = None) -> list[ComparisonRow]:
        return [r for r in self.rows if r.pair.b.layer == layer and (kind is None or r.pair.kind == kind)]

    def __repr__(self) -> str:
        return f"ComparisonsResult({len(self.rows)} pairs, {sum(r.computed for r in self.rows)} computed in this run)"


def comparison_pairs(plan: SweepPlan) -> list[Pair]:
    """Every pair the report needs, in a fixed order (see the module docstring)."""
    seeds = sorted(plan.seeds)
    pairs = []
    for layer in plan.layers:
        base = {s: CellKey(plan.baseline, layer, s) for s in seeds}
        pairs += [Pair("ceiling", base[j], base[i]) for i in seeds for j in seeds if i < j]
        pairs.append(Pair("floor", CellKey(FLOOR, layer, 12345 + layer), base[seeds[0]]))
        for p in plan.precision_names:
            if p == plan.baseline:
                continue
            pairs += [Pair("different_seed", CellKey(p, layer, s), base[seeds[(i + 1) % len(seeds)]])
                      for i, s in enumerate(seeds)]
            pairs.append(Pair("same_seed", CellKey(p, layer, seeds[0]), base[seeds[0]]))
    return pairs


class _EvalActivations:
    """Held-out activations per (precision, layer), loaded once and kept; rows aligned across precisions.

    The baseline's sink rows (:mod:`qsae_lens.sweep.sinks`) are dropped for every precision.
    """

    def __init__(self, plan: SweepPlan, max_norms: dict[str, float | None]) -> None:
        self.plan, self.max_norms = plan, max_norms
        self._x: dict[tuple[str, int], torch.Tensor] = {}
        self._keep: dict[int, torch.Tensor] = {}

    def _raw(self, precision: str, layer: int) -> torch.Tensor:
        from qsae_lens.activations import load_activations

        return load_activations(self.plan.cache_dir(precision, "eval", layer), self.plan.hook_name(layer))

    def get(self, precision: str, layer: int) -> torch.Tensor:
        """Tensor[n_kept, d_in] held-out activations of ``precision`` at ``layer``."""
        from qsae_lens.sweep.sinks import non_sink_rows

        if layer not in self._keep:
            self._keep[layer] = non_sink_rows(self._raw(self.plan.baseline, layer),
                                              self.max_norms.get(self.plan.hook_name(layer)))
        if (precision, layer) not in self._x:
            self._x[(precision, layer)] = self._raw(precision, layer)[self._keep[layer]]
        return self._x[(precision, layer)]


def run_comparisons(plan: SweepPlan, saes: dict[CellKey, Any], identities: dict[CellKey, str],
                    max_norms: dict[str, float | None], data_ids: dict[str, Any], *,
                    progress: bool = True) -> ComparisonsResult:
    """``compare_saes`` on every pair of :func:`comparison_pairs`, with the SAEs and activations in memory."""
    from qsae_lens.compare import ComparisonReport, compare_saes
    from qsae_lens.compare.nulls import ANISOTROPIC_NULL_VERSION, anisotropic_random_sae_like

    cfg = plan.config
    acts = _EvalActivations(plan, max_norms)
    rows = []
    for pair in comparison_pairs(plan):
        b_sae = saes[pair.b]
        floor = pair.kind == "floor"
        a_sae = anisotropic_random_sae_like(b_sae, pair.a.seed) if floor else saes[pair.a]
        a_id = f"anisotropic_random(seed={pair.a.seed}, like={identities[pair.b]})" if floor else identities[pair.a]
        a_prec = plan.baseline if floor else pair.a.precision
        hook = plan.hook_name(pair.b.layer)
        folder = plan.step_dir("compare") / pair.name
        inputs = {"a": {"cell": pair.a.label, "sae": a_id}, "b": {"cell": pair.b.label, "sae": identities[pair.b]},
                  "activations": {"a": a_prec, "b": pair.b.precision, "hook": hook, "data": data_ids,
                                  "max_norm": max_norms.get(hook)},
                  "n_bootstrap": cfg.n_bootstrap, "n_permutations": cfg.n_permutations, "seed": cfg.seed,
                  "null": f"anisotropic-v{ANISOTROPIC_NULL_VERSION}", "n_null_draws": N_NULL_DRAWS}

        def compute(tmp: Path, a_sae: Any = a_sae, a_prec: str = a_prec, pair: Pair = pair, hook: str = hook) -> None:
            print(f"[qsae sweep] comparing {pair.name}", flush=True)
            report = compare_saes(a_sae, saes[pair.b], activations=(acts.get(a_prec, pair.b.layer),
                                                                     acts.get(pair.b.precision, pair.b.layer)),
                                  hook=hook, n_bootstrap=cfg.n_bootstrap, n_permutations=cfg.n_permutations,
                                  n_null_draws=N_NULL_DRAWS,
                                  seed=cfg.seed, device=plan.device, progress=progress)
            report.save(tmp)

        computed = run_or_reuse(folder, inputs, compute)
        rows.append(ComparisonRow(pair, ComparisonReport.from_json(folder / "report.json"), computed))
    return ComparisonsResult(rows)
