"""qsae_lens: do the sparse-autoencoder features of a model survive quantization?

Load a Hugging Face causal LM at any precision behind a HookedTransformer-compatible interface,
train SAEs on it with SAELens, compare SAEs across precisions with statistics and null baselines,
and publish them to the hub with precision metadata.

The public API is listed in ``__all__``. Names are imported lazily: ``import qsae_lens`` is cheap,
and SAELens/transformers (slow to import) load only when a name that needs them is used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "Precision": "qsae_lens.precision",
    "parse_precision": "qsae_lens.precision",
    "load_model": "qsae_lens.models",
    "HookedQuantizedLM": "qsae_lens.models",
    "load_dequantized_hooked_transformer": "qsae_lens.models",
    "default_model_path": "qsae_lens.assets",
    "probe_layers": "qsae_lens.layers",
    "cache_activations": "qsae_lens.activations",
    "load_activations": "qsae_lens.activations",
    "tokenize_corpus": "qsae_lens.corpus",
    "compare_saes": "qsae_lens.compare",
    "ComparisonReport": "qsae_lens.compare",
    "run_precision_sweep": "qsae_lens.sweep",
    "SweepConfig": "qsae_lens.sweep",
    "plan_sweep": "qsae_lens.sweep",
    "CellKey": "qsae_lens.sweep",
    "publish_saes": "qsae_lens.hub",
    "load_sae": "qsae_lens.hub",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'qsae_lens' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
