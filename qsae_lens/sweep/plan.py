"""The typed plan of a sweep: which cells exist and where each result lives.

Every path and label of a sweep is derived here, once: no other module (and no test) builds
``saes/<precision>/layer<L>/seed<S>`` or ``"fp32/L16/s0"`` by hand.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from qsae_lens.precision import Precision


class CellKey(NamedTuple):
    """One trained SAE of the sweep: a (precision, layer, seed) cell of the grid."""

    precision: str
    """Precision name, e.g. ``"nf4"`` (see :func:`qsae_lens.precision.parse_precision`)."""
    layer: int
    """Block index whose hook the SAE reads."""
    seed: int
    """Init (and data-order) seed of the SAE."""

    @property
    def label(self) -> str:
        """Short human label, e.g. ``"nf4/L16/s0"`` (report tables, logs, JSON keys)."""
        return f"{self.precision}/L{self.layer}/s{self.seed}"

    def dir(self, out_dir: str | os.PathLike[str]) -> Path:
        """The SAELens checkpoint folder of this cell under a sweep's ``out_dir``."""
        return Path(out_dir) / "saes" / self.precision / f"layer{self.layer}" / f"seed{self.seed}"

    @classmethod
    def from_label(cls, label: str) -> CellKey:
        """Inverse of :attr:`label`."""
        precision, layer, seed = label.rsplit("/", 2)
        if not (layer.startswith("L") and seed.startswith("s")):
            raise ValueError(f"not a cell label: {label!r} (expected like 'nf4/L16/s0')")
        return cls(precision, int(layer[1:]), int(seed[1:]))


def hook_name(layer: int, hook: str = "hook_resid_post") -> str:
    """TransformerLens hook name of ``hook`` at block ``layer``: ``blocks.{layer}.{hook}``."""
    return f"blocks.{layer}.{hook}"


def cache_group_name(layers: list[int] | tuple[int, ...]) -> str:
    """Folder name of an activation cache holding ``layers``: ``"layers8_16"``."""
    return "layers" + "_".join(str(x) for x in sorted(layers))


def cache_group_layers(name: str) -> set[int]:
    """Inverse of :func:`cache_group_name` (empty for any other name)."""
    if not name.startswith("layers"):
        return set()
    try:
        return {int(x) for x in name[len("layers"):].split("_")}
    except ValueError:
        return set()


@dataclass(frozen=True)
class SweepPlan:
    """Everything resolved before any long work: model, layers, hooks, precisions, cells, folders."""

    config: Any
    """The validated :class:`qsae_lens.sweep.SweepConfig`."""
    out_dir: Path
    model_path: str
    """Resolved local path (or hub id) of the model."""
    n_layers: int
    layers: tuple[int, ...]
    hook: str
    """Hook suffix, e.g. ``"hook_resid_post"``."""
    precisions: tuple[Precision, ...]
    baseline: str
    """Name of the precision every other is compared with."""
    seeds: tuple[int, ...]
    """Seeds trained at every precision (the baseline's seed pairs give the seed-to-seed ceiling)."""
    cells: tuple[CellKey, ...]
    device: str

    def hook_name(self, layer: int) -> str:
        return hook_name(layer, self.hook)

    @property
    def hook_names(self) -> list[str]:
        return [self.hook_name(layer) for layer in self.layers]

    @property
    def precision_names(self) -> list[str]:
        return [p.name for p in self.precisions]

    def find_cache_dir(self, precision: str, split: str, layer: int) -> Path | None:
        """The finished activation cache holding ``layer`` at ``precision``/``split``, or None.

        Caches are grouped by the layers cached in one forward pass
        (``activations/<precision>/<split>/layers<L1>_<L2>``); see :mod:`qsae_lens.sweep.data`.
        """
        root = self.out_dir / "activations" / precision / split
        if not root.is_dir():
            return None
        for folder in sorted(root.iterdir()):
            if layer in cache_group_layers(folder.name) and (folder / "manifest.json").is_file():
                return folder
        return None

    def cache_dir(self, precision: str, split: str, layer: int | None = None) -> Path:
        """The activation cache holding ``layer`` (default: the first layer) at ``precision``;
        ``split`` is ``"train"`` or ``"eval"``. Read it with ``load_activations(folder, hook_name)``."""
        layer = self.layers[0] if layer is None else layer
        found = self.find_cache_dir(precision, split, layer)
        if found is None:
            raise FileNotFoundError(f"No finished {split} activation cache of layer {layer} at {precision} "
                                    f"under {self.out_dir / 'activations'}: run the caching step first.")
        return found

    def step_dir(self, name: str) -> Path:
        """Folder where the step ``name`` (e.g. ``"survival"``) keeps its outputs."""
        return self.out_dir / name

    def cells_at(self, precision: str | None = None, layer: int | None = None) -> list[CellKey]:
        return [c for c in self.cells if (precision is None or c.precision == precision)
                and (layer is None or c.layer == layer)]


@dataclass
class CoreResults:
    """What the core steps returned, handed to every analysis step (``run_step(plan, core)``).

    Activation caches are not held here: read them with
    ``qsae_lens.activations.load_activations(plan.cache_dir(precision, "train"|"eval"), hook_name)``
    (rows aligned across precisions: the same tokens in the same order).
    """

    models: dict[str, Any]
    """Precision name -> loaded :class:`qsae_lens.models.HookedQuantizedLM` (all kept in memory)."""
    tokenizer: Any
    eval_tokens: Any
    """Tensor[n_windows, context_size] int64: held-out BOS-led windows, the same for every precision."""
    saes: dict[CellKey, Any]
    """Every trained SAE of the sweep (SAELens ``SAE`` objects, eval mode)."""
    max_norms: dict[str, float | None]
    """Hook name -> attention-sink norm limit (positions above it are left out of scoring), or None."""
    transfer: Any = None
    """The transfer-matrix step's result."""
    comparisons: Any = None
    """The comparison step's result."""
