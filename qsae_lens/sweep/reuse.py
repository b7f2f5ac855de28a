"""The one rule that decides "reuse the result on disk, or recompute": keyed by the result's inputs.

Every step result of a sweep lives in its own folder with a ``_done.json`` that records the
*identities of its inputs* (cell keys and SAE checkpoint hashes, the settings it depends on, ...)
and their hash. A folder is reused only when that record equals the inputs of this run; otherwise
it is rebuilt in a temporary sibling and renamed into place whole (:func:`qsae_lens._io.atomic_dir`),
so a crash between any two writes leaves either the old complete folder or none, never a half.

This replaces hand-kept lists of "settings that matter" and "cells retrained in this run": if an
SAE is retrained its hash changes, so everything computed from it is recomputed; if
``n_bootstrap`` changes, only the steps that list it among their inputs are.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from qsae_lens._io import atomic_dir, atomic_write_json, folder_sha256, json_sha256, to_plain_json

DONE = "_done.json"
"""Marker written last inside a finished result folder: ``{"inputs": ..., "inputs_sha256": ...}``."""

SAE_FILES = ["cfg.json", "sae_weights.safetensors"]


def sae_identity(folder: str | os.PathLike[str]) -> str:
    """Content hash of an SAE checkpoint (its cfg.json and weights): what a result computed from it depends on."""
    return folder_sha256(folder, SAE_FILES)


def recorded_inputs(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The inputs a finished folder was computed from, or None if it is absent or unfinished."""
    try:
        return json.loads((Path(folder) / DONE).read_text())["inputs"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return None


def is_current(folder: str | os.PathLike[str], inputs: Mapping[str, Any]) -> bool:
    """True when ``folder`` is finished and was computed from exactly ``inputs``."""
    old = recorded_inputs(folder)
    return old is not None and json_sha256(old) == json_sha256(dict(inputs))


def run_or_reuse(folder: str | os.PathLike[str], inputs: Mapping[str, Any],
                 compute: Callable[[Path], Any]) -> bool:
    """Reuse ``folder`` if it was computed from ``inputs``; else rebuild it whole.

    ``compute(tmp)`` writes the result into the empty temporary folder ``tmp``; then the inputs
    record is written and ``tmp`` replaces ``folder`` in one rename. Returns True when computed,
    False when reused.
    """
    folder = Path(folder)
    if is_current(folder, inputs):
        return False
    plain = to_plain_json(dict(inputs))
    with atomic_dir(folder, replace=True) as tmp:
        compute(tmp)
        atomic_write_json(tmp / DONE, {"inputs": plain, "inputs_sha256": json_sha256(plain)})
    return True
