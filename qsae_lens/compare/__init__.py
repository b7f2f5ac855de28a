"""Compare two SAEs: ``compare_saes(a, b) -> ComparisonReport``, and the plain metric functions it
composes (one function per metric over tensors with documented shapes).

- ``alignment``: best match, mutual nearest neighbours, one-to-one matching, Procrustes (blockwise).
- ``nulls``: what random SAEs of the same shapes score: anisotropy-matched (default) or isotropic.
- ``seeds``: a precision's effect against the seed-to-seed ceiling, seeds as the replication unit.
- ``stats``: bootstrap CIs, paired permutation tests, Holm / Benjamini-Hochberg.
- ``cka``: linear CKA (feature-space form, streamed; debiased; permutation null).
- ``categories``: dead / rare / common / frequent latents and their transitions.
- ``activation_metrics``: SAE codes, matched-latent correlation, (cross-)reconstruction.
- ``api`` (``compare_saes``), ``report`` (``ComparisonReport``), ``figures`` (plotly), ``cli`` (``qsae compare``).

Names load lazily: importing this package does not import SAELens, scipy or plotly.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> submodule that defines it
_EXPORTS: dict[str, str] = {
    "compare_saes": "api",
    "load_sae_for_comparison": "api",
    "ComparisonReport": "report",
    "MetricResult": "report",
    "SCHEMA_VERSION": "report",
    # alignment
    "BestMatch": "alignment",
    "Matching": "alignment",
    "ProcrustesResult": "alignment",
    "normalize_rows": "alignment",
    "best_match": "alignment",
    "best_match_both": "alignment",
    "top_k_neighbours": "alignment",
    "mutual_nearest_neighbours": "alignment",
    "mutual_nn_fraction": "alignment",
    "one_to_one_matching": "alignment",
    "fraction_above": "alignment",
    "procrustes_matched": "alignment",
    "procrustes_rowwise_naive": "alignment",
    # nulls
    "NullDistribution": "nulls",
    "best_match_null": "nulls",
    "matched_cosine_null": "nulls",
    "mutual_nn_null": "nulls",
    "simulate_alignment_nulls": "nulls",
    "anisotropic_directions": "nulls",
    "reflection_basis": "nulls",
    "anisotropic_random_sae_like": "nulls",
    "covariance_matched_activations": "nulls",
    # seeds as the replication unit
    "SeedEffect": "seeds",
    "SharingBar": "seeds",
    "seed_effect": "seeds",
    "sharing_bar": "seeds",
    # statistics
    "Estimate": "stats",
    "bootstrap_ci": "stats",
    "paired_permutation_test": "stats",
    "holm": "stats",
    "benjamini_hochberg": "stats",
    # CKA
    "linear_cka": "cka",
    "CKAAccumulator": "cka",
    "cka_permutation_null": "cka",
    # categories
    "latent_categories": "categories",
    "CATEGORY_NAMES": "categories",
    "category_counts": "categories",
    "category_transition_table": "categories",
    "firing_stats_from_codes": "categories",
    "firing_frequency_from_sparsity_file": "categories",
    # activation metrics
    "latent_activation_correlation": "activation_metrics",
    "explained_variance": "activation_metrics",
    "cross_reconstruction_explained_variance": "activation_metrics",
    "sae_codes": "activation_metrics",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'qsae_lens.compare' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"qsae_lens.compare.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
