"""Linear probes with control tasks and grouped splits, and sparse probing on SAE latents.

* :func:`train_probe` — multinomial logistic regression (scikit-learn) scored by k-fold cross
  validation. With ``groups`` (the document of each row) the folds are grouped, so no document is on
  both sides of a split; word *types* do cross the split, which is what lets a Hewitt-Liang control
  task (``types``) expose a probe that memorises types. Accuracy, control accuracy and selectivity
  come with 95% t-intervals **over the cv folds** (selectivity is paired: the same folds for both).
* :func:`sparse_probe` — Gurnee et al. (2023) / SAEBench: the k latents with the largest class-mean
  difference, chosen on each training fold only, then probed on the held-out fold.

scikit-learn is a core dependency, imported when used.
Memory: a probe holds the features once plus one standardised fold copy (``n x d`` float32 each);
latent scores are one ``classes x d`` matrix product.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from qsae_lens.compare.stats import Estimate
from qsae_lens.probing.control import control_task_labels

CI_UNIT = "95% t-interval over the cv folds"
DEFAULT_KS: tuple[int, ...] = (1, 2, 5, 10, 20)


def _sklearn() -> Any:
    try:
        import sklearn  # noqa: F401
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("Probing needs scikit-learn: pip install scikit-learn (a qsae-lens dependency).") from err
    import sklearn.linear_model
    import sklearn.model_selection
    import sklearn.pipeline
    import sklearn.preprocessing

    return sklearn


class ProbeResult(NamedTuple):
    """A cross-validated probe, optionally with its Hewitt-Liang control task."""

    accuracy: Estimate
    """Mean held-out accuracy over the folds, with a 95% t-interval over folds."""
    control_accuracy: Estimate | None
    """The same probe on control labels (None without ``types``)."""
    selectivity: Estimate | None
    """accuracy - control_accuracy, paired per fold, with its t-interval (None without ``types``)."""
    fold_accuracy: np.ndarray
    """float64[cv]: held-out accuracy of each fold."""
    fold_control_accuracy: np.ndarray | None
    """float64[cv]: held-out control accuracy of each fold (same folds)."""
    majority: float
    """Share of the most frequent class: the accuracy of always guessing it."""
    n: int
    """Rows probed."""
    n_classes: int
    ci_unit: str = CI_UNIT

    def __repr__(self) -> str:
        def f(e: Estimate | None) -> str:
            return "—" if e is None else f"{e.value:.3f} [{e.ci_low:.3f}, {e.ci_high:.3f}]"

        return (f"ProbeResult(accuracy={f(self.accuracy)}, control={f(self.control_accuracy)}, "
                f"selectivity={f(self.selectivity)}, majority={self.majority:.3f}, n={self.n}, "
                f"classes={self.n_classes}, folds={len(self.fold_accuracy)})")


class SparseProbeResult(NamedTuple):
    """Sparse-probing accuracy by the number k of latents kept."""

    ks: tuple[int, ...]
    accuracy: list[Estimate]
    """One per k: held-out accuracy over folds (latents chosen on each training fold only)."""
    top_latents: np.ndarray
    """int64[max k]: the best latents on all rows (for reporting and rank overlap, not for scoring)."""
    ci_unit: str = CI_UNIT

    def __repr__(self) -> str:
        accs = ", ".join(f"k={k}: {e.value:.3f}" for k, e in zip(self.ks, self.accuracy))
        return f"SparseProbeResult({accs}; top={self.top_latents[:5].tolist()}...)"


def fold_estimate(values: Sequence[float] | np.ndarray, confidence: float = 0.95,
                  bounds: tuple[float, float] = (-np.inf, np.inf)) -> Estimate:
    """Mean of per-fold values with a Student-t interval (the folds as the sampling unit), clipped
    to ``bounds`` (an accuracy's interval never leaves [0, 1])."""
    from scipy import stats

    v = np.asarray(values, dtype=np.float64)
    mean = float(v.mean())
    if len(v) < 2:
        return Estimate(mean, float("nan"), float("nan"))
    half = float(stats.t.ppf(0.5 + confidence / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))
    return Estimate(mean, max(bounds[0], mean - half), min(bounds[1], mean + half))


def _as_numpy(x: Tensor | np.ndarray, dtype: Any = np.float32) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().to("cpu").numpy()
    return np.asarray(x, dtype=dtype)


def cv_splits(labels: np.ndarray, groups: np.ndarray | None = None, cv: int = 5,
              seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``cv`` (train, test) index pairs: grouped (no group on both sides) when ``groups`` is given,
    else stratified by class. Raises when there are fewer groups than folds."""
    ms = _sklearn().model_selection
    idx = np.zeros(len(labels))
    if groups is not None:
        groups = np.asarray(groups)
        n_groups = len(np.unique(groups))
        if n_groups < cv:
            raise ValueError(f"{n_groups} groups (documents) cannot fill {cv} grouped folds: "
                             f"use more documents or a smaller cv.")
        splitter = ms.GroupKFold(n_splits=cv, shuffle=True, random_state=seed)
        return [(tr, te) for tr, te in splitter.split(idx, labels, groups)]
    _, counts = np.unique(labels, return_counts=True)
    if counts.min() >= cv:
        splitter = ms.StratifiedKFold(n_splits=cv, shuffle=True, random_state=seed)
        return [(tr, te) for tr, te in splitter.split(idx, labels)]
    return [(tr, te) for tr, te in ms.KFold(n_splits=cv, shuffle=True, random_state=seed).split(idx)]


def _make_probe(l2: float, max_iter: int) -> Any:
    sk = _sklearn()
    return sk.pipeline.make_pipeline(
        sk.preprocessing.StandardScaler(),
        sk.linear_model.LogisticRegression(C=1.0 / l2, max_iter=max_iter, tol=1e-3),
    )


def _fold_accuracies(x: np.ndarray, y: np.ndarray, splits: list[tuple[np.ndarray, np.ndarray]],
                     l2: float, max_iter: int) -> np.ndarray:
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    out = np.empty(len(splits))
    for i, (tr, te) in enumerate(splits):
        if len(np.unique(y[tr])) < 2:  # a fold that sees one class can only predict it
            out[i] = float(np.mean(y[te] == y[tr][0]))
            continue
        probe = _make_probe(l2, max_iter)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            probe.fit(x[tr], y[tr])
        out[i] = float(np.mean(probe.predict(x[te]) == y[te]))
    return out


def _check(features: Tensor | np.ndarray, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    x = _as_numpy(features)
    y = np.asarray(_as_numpy(labels, np.int64))
    if x.ndim != 2:
        raise ValueError(f"features must be Tensor[n, d]; got shape {x.shape}.")
    if y.shape != (x.shape[0],):
        raise ValueError(f"labels must have one entry per row ({x.shape[0]}); got shape {y.shape}.")
    if len(np.unique(y)) < 2:
        raise ValueError("labels hold a single class: a probe needs at least two.")
    return x, y


def train_probe(features: Tensor | np.ndarray, labels: Tensor | np.ndarray | Sequence[int], *,
                types: Sequence[object] | np.ndarray | None = None,
                groups: Sequence[object] | np.ndarray | None = None, cv: int = 5, l2: float = 1.0,
                seed: int = 0, max_iter: int = 200) -> ProbeResult:
    """Cross-validated multinomial logistic-regression probe of ``labels`` from ``features``.

    ``features``: ``Tensor[n, d]`` (standardised inside each training fold). ``labels``: ``int[n]``.
    ``types``: each row's word type; when given, the same probe is trained on Hewitt-Liang control
    labels (:func:`control_task_labels`) over the same folds and selectivity is reported.
    ``groups``: each row's document; folds never split a group. ``l2``: inverse of scikit-learn's C.
    """
    x, y = _check(features, labels)
    g = None if groups is None else np.asarray(groups)
    if g is not None and len(g) != len(y):
        raise ValueError(f"groups must have one entry per row ({len(y)}); got {len(g)}.")
    splits = cv_splits(y, g, cv, seed)
    fold_acc = _fold_accuracies(x, y, splits, l2, max_iter)
    _, counts = np.unique(y, return_counts=True)
    control = sel = None
    fold_ctl = None
    if types is not None:
        y_ctl = control_task_labels(types, y, seed)
        fold_ctl = _fold_accuracies(x, y_ctl, splits, l2, max_iter)
        control, sel = fold_estimate(fold_ctl, bounds=(0, 1)), fold_estimate(fold_acc - fold_ctl, bounds=(-1, 1))
    return ProbeResult(fold_estimate(fold_acc, bounds=(0, 1)), control, sel, fold_acc, fold_ctl,
                       float(counts.max() / counts.sum()), len(y), len(counts))


def latent_scores(codes: Tensor | np.ndarray, labels: Tensor | np.ndarray | Sequence[int]) -> Tensor:
    """How well each latent separates the classes, ``Tensor[d]``: max over classes c of
    ``|mean(codes | c) - mean(codes | not c)|`` (for two classes, the plain mean difference).

    One ``classes x d`` matrix product over ``codes: Tensor[n, d]``; no loop over latents.
    """
    x = torch.as_tensor(_as_numpy(codes), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64) if not isinstance(labels, Tensor) else labels.long())
    _, inv = torch.unique(y, return_inverse=True)
    onehot = torch.nn.functional.one_hot(inv).to(torch.float64)  # [n, C]
    n_c = onehot.sum(0)  # [C]
    sums = onehot.T @ x  # [C, d]
    total = x.sum(0, keepdim=True)
    mean_in = sums / n_c[:, None]
    mean_out = (total - sums) / (len(y) - n_c).clamp(min=1)[:, None]
    return (mean_in - mean_out).abs().amax(0)


def top_latents(codes: Tensor | np.ndarray, labels: Any, k: int) -> np.ndarray:
    """Indices ``int64[k]`` of the k latents with the largest :func:`latent_scores`, best first."""
    scores = latent_scores(codes, labels)
    return torch.topk(scores, min(k, scores.numel())).indices.numpy().astype(np.int64)


def rank_overlap(a: Sequence[int] | np.ndarray, b: Sequence[int] | np.ndarray) -> float:
    """Share of ``a``'s top latents that are also among ``b``'s (|a ∩ b| / |a|): do the same latents
    encode the task at two precisions? Both are index lists of the same SAE's latents."""
    a, b = np.asarray(a), np.asarray(b)
    return float(len(np.intersect1d(a, b)) / max(len(a), 1))


def sparse_probe(codes: Tensor | np.ndarray, labels: Tensor | np.ndarray | Sequence[int], *,
                 ks: Sequence[int] = DEFAULT_KS, groups: Sequence[object] | np.ndarray | None = None,
                 cv: int = 5, l2: float = 1.0, seed: int = 0, max_iter: int = 200) -> SparseProbeResult:
    """Probe the k best latents for each k in ``ks``, choosing them on each training fold only.

    ``codes``: SAE codes ``Tensor[n, d_sae]``; ``labels``: ``int[n]``; ``groups`` as in
    :func:`train_probe`. Choosing on the full data would leak the test fold into the selection.
    """
    x, y = _check(codes, labels)
    ks = tuple(sorted({int(k) for k in ks if 0 < int(k) <= x.shape[1]}))
    if not ks:
        raise ValueError(f"no k in {list(ks)} fits {x.shape[1]} latents.")
    splits = cv_splits(y, None if groups is None else np.asarray(groups), cv, seed)
    acc = np.empty((len(ks), len(splits)))
    for j, (tr, te) in enumerate(splits):
        order = top_latents(x[tr], y[tr], max(ks))
        for i, k in enumerate(ks):
            cols = order[:k]
            acc[i, j] = _fold_accuracies(x[:, cols], y, [(tr, te)], l2, max_iter)[0]
    return SparseProbeResult(ks, [fold_estimate(a, bounds=(0, 1)) for a in acc], top_latents(x, y, max(ks)))
