"""SAE architectures registered with SAELens, so ``LanguageModelSAERunnerConfig(sae=...)`` and
``LanguageModelSAETrainingRunner`` train them unchanged.

Importing this package registers (idempotently) with ``sae_lens.registry``:

- ``"openai_topk"``: TopK with OpenAI's aux-k loss and training recipe (``openai_topk.py``);
  saved for inference as plain ``"topk"``.
- ``"gated_frozen_aux"``: SAELens's Gated SAE with the paper's frozen-decoder auxiliary loss
  and seeded init (``gated.py``); saved for inference as plain ``"gated"``.

``ARCHITECTURES`` maps each registered name to its training config class.
"""

from __future__ import annotations

from typing import Any

from sae_lens.registry import (
    SAE_CLASS_REGISTRY,
    SAE_TRAINING_CLASS_REGISTRY,
    register_sae_class,
    register_sae_training_class,
)
from sae_lens.saes.gated_sae import GatedSAE

from qsae_lens.training.common import (
    PRECISION_METADATA_KEYS,
    SAE_PROVENANCE_KEYS,
    WandbSettings,
    attach_precision_metadata,
    geometric_median,
    renormalize_after_steps,
    safe_logging_config,
)
from qsae_lens.training.fit import UnitNormSAETrainer
from qsae_lens.training.gated import ARCHITECTURE as GATED_FROZEN_AUX
from qsae_lens.training.gated import (
    GatedFrozenAuxSAEConfig,
    GatedFrozenAuxTrainingSAE,
    GatedFrozenAuxTrainingSAEConfig,
)
from qsae_lens.training.openai_topk import ARCHITECTURE as OPENAI_TOPK
from qsae_lens.training.openai_topk import (
    OpenAITopKSAE,
    OpenAITopKSAEConfig,
    OpenAITopKTrainingSAE,
    OpenAITopKTrainingSAEConfig,
)

# name -> (inference class, inference config, training class, training config)
_REGISTRATIONS: dict[str, tuple[type, type, type, type]] = {
    OPENAI_TOPK: (OpenAITopKSAE, OpenAITopKSAEConfig, OpenAITopKTrainingSAE, OpenAITopKTrainingSAEConfig),
    GATED_FROZEN_AUX: (
        GatedSAE,
        GatedFrozenAuxSAEConfig,
        GatedFrozenAuxTrainingSAE,
        GatedFrozenAuxTrainingSAEConfig,
    ),
}

#: Registered architecture name -> training config class.
ARCHITECTURES: dict[str, type[Any]] = {name: classes[3] for name, classes in _REGISTRATIONS.items()}


def _same_class(registered: type, ours: type) -> bool:
    # A re-import (importlib.reload, a second copy of the module) creates new class objects with
    # the same qualified name: treat those as ours, anything else as a real name clash.
    return registered is ours or (
        registered.__module__ == ours.__module__ and registered.__qualname__ == ours.__qualname__
    )


def register_architectures() -> None:
    """Register qsae_lens's architectures with SAELens; safe to call any number of times."""
    for name, (sae_cls, sae_cfg, train_cls, train_cfg) in _REGISTRATIONS.items():
        for registry, register, cls, cfg_cls in (
            (SAE_CLASS_REGISTRY, register_sae_class, sae_cls, sae_cfg),
            (SAE_TRAINING_CLASS_REGISTRY, register_sae_training_class, train_cls, train_cfg),
        ):
            existing = registry.get(name)
            if existing is None:
                register(name, cls, cfg_cls)
            elif _same_class(existing[1], cfg_cls):
                registry[name] = (cls, cfg_cls)  # refresh after a reload
            else:
                raise ValueError(
                    f"SAELens architecture name {name!r} is already registered by "
                    f"{existing[1].__module__}.{existing[1].__qualname__}; qsae_lens cannot register its own"
                )


register_architectures()

__all__ = [
    "ARCHITECTURES",
    "GATED_FROZEN_AUX",
    "OPENAI_TOPK",
    "PRECISION_METADATA_KEYS",
    "SAE_PROVENANCE_KEYS",
    "GatedFrozenAuxTrainingSAE",
    "GatedFrozenAuxTrainingSAEConfig",
    "OpenAITopKTrainingSAE",
    "OpenAITopKTrainingSAEConfig",
    "UnitNormSAETrainer",
    "WandbSettings",
    "attach_precision_metadata",
    "geometric_median",
    "register_architectures",
    "renormalize_after_steps",
    "safe_logging_config",
]
