"""Interventions that work at every precision: steering, contrastive activation addition, ablation.

Each intervention is a context manager over a model with TransformerLens hook names
(:class:`~qsae_lens.models.hooked.HookedQuantizedLM` or a ``HookedTransformer``), so it composes
with ``forward``, ``run_with_hooks``, ``run_with_cache`` and ``generate``. :mod:`.transfer`
applies one intervention to several precisions on identical prompts.
"""

from __future__ import annotations

from qsae_lens.interventions.ablation import ablate, ablate_direction, intervention_effect
from qsae_lens.interventions.caa import (
    CAAVector,
    caa_from_activations,
    caa_vector,
    collect_activations,
    logprob_diff_measure,
    strength_sweep,
)
from qsae_lens.interventions.steering import steer, steer_feature, typical_max_activation
from qsae_lens.interventions.transfer import feature_effect_correlation, intervention_transfer

__all__ = [
    "CAAVector",
    "ablate",
    "ablate_direction",
    "caa_from_activations",
    "caa_vector",
    "collect_activations",
    "feature_effect_correlation",
    "intervention_effect",
    "intervention_transfer",
    "logprob_diff_measure",
    "steer",
    "steer_feature",
    "strength_sweep",
    "typical_max_activation",
]
