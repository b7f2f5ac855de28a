"""Sweep step ``probing``: the built-in probing tasks on the sweep's models at its layers.

Per (precision, layer, task): a probe with its Hewitt-Liang control task on the residuals, and on
the codes of the baseline precision's SAE (first seed) applied to that precision's residuals, with
sparse probing by k and the overlap of each precision's top latents with the baseline's (same SAE,
so latent indices agree). Small budgets keep it to about a minute and a half on CPU. The result
folder is reused only when its inputs (model weights, SAE content hashes, settings) are unchanged.
"""

from __future__ import annotations

from typing import Any

from qsae_lens.probing.api import ProbeSweepResult
from qsae_lens.probing.report import probe_section
from qsae_lens.report.section import ReportSection

NAME = "probing"

TASKS = ("py_token_class", "shakespeare_king")
"""One token-level and one sentence-level task (the other built-ins run with ``qsae probe``)."""
N_EXAMPLES = 600
"""Rows per task (classes balanced): small, so the step stays within its CPU budget."""
MAX_DOCS = 40
"""stdlib files (one 64-token window each) for the token task; the forward pass is the step's main cost."""
CV = 5


def run_step(plan: Any, core: Any) -> ProbeSweepResult:
    """Run (or reuse) the probe sweep over ``core.models`` at ``plan.layers``."""
    from qsae_lens._io import atomic_write_json
    from qsae_lens.probing.api import probe_sweep
    from qsae_lens.sweep.plan import CellKey
    from qsae_lens.sweep.reuse import run_or_reuse, sae_identity

    seed = plan.seeds[0]
    saes = {layer: core.saes[CellKey(plan.baseline, layer, seed)] for layer in plan.layers
            if CellKey(plan.baseline, layer, seed) in core.saes}
    order = [plan.baseline] + [p for p in plan.precision_names if p != plan.baseline]
    models = {p: core.models[p] for p in order if p in core.models}
    inputs = {"models": {p: m.precision_metadata.get("weights_sha256") for p, m in models.items()},
              "saes": {str(layer): sae_identity(CellKey(plan.baseline, layer, seed).dir(plan.out_dir)) for layer in saes},
              "layers": list(plan.layers), "hook": plan.hook, "tasks": list(TASKS), "n_examples": N_EXAMPLES, "max_docs": MAX_DOCS,
              "cv": CV, "seed": seed, "version": 1}
    folder = plan.step_dir(NAME)

    def compute(tmp: Any) -> None:
        from qsae_lens.probing.tasks import build_task

        tasks = [build_task(t, core.tokenizer, n_examples=N_EXAMPLES, max_docs=MAX_DOCS, seed=seed) for t in TASKS]
        result = probe_sweep(models, tasks, plan.layers, saes=saes, baseline=plan.baseline, hook=plan.hook,
                             n_examples=N_EXAMPLES, cv=CV, seed=seed, model_path=plan.model_path)
        atomic_write_json(tmp / "probe.json", result.to_json())

    run_or_reuse(folder, inputs, compute)
    return ProbeSweepResult.load(folder / "probe.json")


def report_section(result: ProbeSweepResult) -> ReportSection:
    """Tables (accuracy, control, selectivity with fold CIs; sparse probing; top-latent overlap) and figures."""
    return probe_section(result, order=60)
