"""The precision sweep: plan -> models -> activations -> SAEs -> evals -> analyses -> report.

Reading order: :mod:`qsae_lens.sweep.run` (the list of steps) -> the step it calls -> the module that
step uses. :mod:`qsae_lens.sweep.plan` holds the typed plan (``SweepPlan``, ``CellKey``).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SweepConfig": "qsae_lens.sweep.config",
    "validate_config": "qsae_lens.sweep.config",
    "plan_sweep": "qsae_lens.sweep.run",
    "SweepResult": "qsae_lens.sweep.run",
    "run_precision_sweep": "qsae_lens.sweep.run",
    "add_sweep_arguments": "qsae_lens.sweep.run",
    "run_sweep_command": "qsae_lens.sweep.run",
    "resolve_layers": "qsae_lens.layers",
    "CellKey": "qsae_lens.sweep.plan",
    "SweepPlan": "qsae_lens.sweep.plan",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'qsae_lens.sweep' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
