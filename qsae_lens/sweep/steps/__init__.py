"""Optional analysis steps of the sweep, one module each, found by name.

Each module named in :data:`ANALYSES` exposes::

    NAME: str
    def run_step(plan: SweepPlan, core: CoreResults) -> <a typed result (dataclass/NamedTuple)>
    def report_section(result) -> qsae_lens.report.ReportSection

``core`` holds what the core steps returned (models, caches, trained SAEs, transfer matrix,
comparisons): see :class:`qsae_lens.sweep.plan.CoreResults`. A step keeps its files under
``plan.step_dir(NAME)`` and decides reuse with :mod:`qsae_lens.sweep.reuse`.
"""

from __future__ import annotations

ANALYSES: dict[str, str] = {
    "seeds": "qsae_lens.sweep.steps.seeds",
    "survival": "qsae_lens.sweep.steps.survival",
    "interventions": "qsae_lens.sweep.steps.interventions",
    "probing": "qsae_lens.sweep.steps.probing",
    "crosscoder": "qsae_lens.sweep.steps.crosscoder",
    "bitwidth": "qsae_lens.sweep.steps.bitwidth",
}
"""Analysis name -> module implementing it (imported only when that analysis is chosen)."""
