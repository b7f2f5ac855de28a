"""The one definition of which layers a run reads: parsing, validation and the probe-layer rule.

Used by ``qsae sweep``, ``qsae cache`` and the Python API, so ``--layers 99`` is refused with the
same message everywhere and the methodology's probe set is computed in one place.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

LayersSpec = tuple[int, ...] | Literal["probe"] | None
"""What a user may ask for: explicit block indices, ``"probe"`` (the probe set) or None (the middle probe layer)."""


def probe_layers(n_layers: int) -> list[int]:
    """The methodology's probe layers: layer 0, every 4th layer, and the last two (sorted, unique).

    ``probe_layers(48) == [0, 4, 8, ..., 44, 46, 47]``; ``probe_layers(30) == [0, 4, ..., 28, 29]``.
    """
    if isinstance(n_layers, bool) or not isinstance(n_layers, (int, np.integer)) or n_layers < 1:
        raise ValueError(f"n_layers must be a positive int, got {n_layers!r}.")
    n = int(n_layers)
    return sorted({*range(0, n, 4), max(n - 2, 0), n - 1})


def parse_layers_arg(text: str | None) -> LayersSpec:
    """A ``--layers`` value -> a :data:`LayersSpec`.

    ``None``/``""``/``"middle"`` -> None (the middle probe layer); ``"probe"`` -> ``"probe"``;
    ``"8,16"`` or ``"8 16"`` -> ``(8, 16)``. Anything else raises ValueError saying what is accepted.
    Range checks need the model's depth: see :func:`resolve_layers`.
    """
    if text is None:
        return None
    t = text.strip().lower()
    if t in ("", "middle"):
        return None
    if t == "probe":
        return "probe"
    parts = [p for p in t.replace(",", " ").split() if p]
    try:
        layers = tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(
            f"--layers takes 'middle', 'probe' or comma-separated block indices like '8,16'; got {text!r}."
        ) from None
    negative = [x for x in layers if x < 0]
    if negative:
        raise ValueError(f"--layers: block indices start at 0; got {negative}.")
    return layers


def resolve_layers(layers: Sequence[int] | str | None, n_layers: int) -> list[int]:
    """A :data:`LayersSpec` -> sorted unique block indices of a model with ``n_layers`` blocks.

    None -> ``[middle probe layer]``; ``"probe"`` -> :func:`probe_layers`; ints are checked to lie
    in ``0..n_layers-1`` (ValueError naming the bad ones and the valid range otherwise).
    """
    probes = probe_layers(n_layers)
    if layers is None:
        return [probes[len(probes) // 2]]
    if isinstance(layers, str):
        spec = parse_layers_arg(layers)
        if isinstance(spec, str) or spec is None:
            return resolve_layers(spec, n_layers)
        layers = spec
    try:
        out = sorted({int(x) for x in layers})
    except (TypeError, ValueError):
        raise ValueError(f"layers must be block indices, 'probe' or None; got {layers!r}.") from None
    bad = [x for x in out if not 0 <= x < n_layers]
    if not out:
        raise ValueError("layers is empty: give at least one block index, 'probe' or None.")
    if bad:
        raise ValueError(f"Layer(s) {bad} out of range: this model has layers 0..{n_layers - 1}.")
    return out


__all__ = ["LayersSpec", "parse_layers_arg", "probe_layers", "resolve_layers"]
