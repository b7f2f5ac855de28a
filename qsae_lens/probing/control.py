"""Hewitt & Liang (2019) control tasks: a random label per word *type*, with the task's class frequencies.

A probe that reaches high accuracy on a control task has memorised word types, not read a
property off the representation; selectivity = task accuracy - control accuracy separates the two.
No library builds control tasks (checked: scikit-learn, SAELens, sae-probes), hence this module.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def control_task_labels(types: Sequence[object] | np.ndarray, labels: Sequence[int] | np.ndarray,
                        seed: int = 0) -> np.ndarray:
    """Control labels, ``int64[n]``: every row of the same type gets the same random class.

    ``types``: each row's word type (token string, token id, speaker name, ...), length n.
    ``labels``: the real task's class of each row, length n (any integers). Each distinct type draws
    one class from the empirical distribution of ``labels`` (the task's class frequencies, as in
    Hewitt & Liang), independently of its real labels; the draw depends only on ``seed`` and the
    sorted set of types, so it is reproducible.
    """
    labels = np.asarray(labels)
    types_arr = np.asarray(list(types) if not isinstance(types, np.ndarray) else types)
    if labels.ndim != 1 or types_arr.ndim != 1 or len(labels) != len(types_arr):
        raise ValueError(f"types and labels must be 1-D of the same length; got {types_arr.shape} and {labels.shape}.")
    if len(labels) == 0:
        raise ValueError("control_task_labels needs at least one row.")
    classes, counts = np.unique(labels, return_counts=True)
    uniq, inverse = np.unique(types_arr, return_inverse=True)
    rng = np.random.default_rng(seed)
    per_type = rng.choice(classes, size=len(uniq), p=counts / counts.sum())
    return per_type[inverse].astype(np.int64)
