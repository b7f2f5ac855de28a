"""Pluggable interpretation: an ``Explainer`` turns a latent's top examples into a short label, a ``Scorer``
checks a label by detection (EleutherAI's Delphi): told the label, can it tell held-out activating
contexts from non-activating ones? The score is the balanced accuracy ((TPR + TNR) / 2, 0.5 = chance).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol, runtime_checkable

__all__ = ["Context", "Explainer", "Scorer", "DetectionScore", "detection_score", "format_examples"]


class Context(NamedTuple):
    """A token window and a latent's activation on each token (what explainers read)."""

    tokens: list[str]
    acts: list[float]

    @property
    def text(self) -> str:
        return "".join(self.tokens)


@runtime_checkable
class Explainer(Protocol):
    """Anything that labels a latent from its activating contexts."""

    def explain(self, examples: Sequence[Context]) -> str:
        """A short natural-language label of what the examples share (the highlighted tokens)."""
        ...


@runtime_checkable
class Scorer(Protocol):
    """Anything that predicts, from a label, whether a text activates the latent."""

    def predict(self, label: str, texts: Sequence[str]) -> list[bool]:
        """One prediction per text: True = "this text contains what the label describes"."""
        ...


class DetectionScore(NamedTuple):
    """Detection scoring of one label on held-out activating and non-activating contexts."""

    balanced_accuracy: float
    """(TPR + TNR) / 2: 0.5 is chance, 1 is perfect."""
    tpr: float
    tnr: float
    n_activating: int
    n_non_activating: int

    def __repr__(self) -> str:
        return (f"DetectionScore(balanced_accuracy={self.balanced_accuracy:.3f}, tpr={self.tpr:.3f}, "
                f"tnr={self.tnr:.3f}, n={self.n_activating}+{self.n_non_activating})")


def format_examples(examples: Sequence[Context], *, threshold: float = 0.0) -> str:
    """The examples as numbered lines with activating tokens marked ``<<like this>>`` (Delphi's convention)."""
    lines = []
    for n, ex in enumerate(examples, 1):
        top = max(ex.acts, default=0.0)
        cut = max(threshold, 0.3 * top)
        s = "".join(f"<<{t}>>" if a > cut and a > 0 else t for t, a in zip(ex.tokens, ex.acts))
        lines.append(f"{n}. {s.strip()}")
    return "\n".join(lines)


def detection_score(scorer: Scorer, label: str, activating: Sequence[str], non_activating: Sequence[str]) -> DetectionScore:
    """Balanced accuracy of ``scorer`` telling ``activating`` from ``non_activating`` texts given ``label``.

    Cross-precision use: score the reference model's label on the quantized model's activating and
    non-activating contexts ("does the explanation still hold?").
    """
    if not activating or not non_activating:
        raise ValueError("detection scoring needs at least one activating and one non-activating text")
    preds = scorer.predict(label, list(activating) + list(non_activating))
    tp = sum(preds[: len(activating)])
    tn = sum(not p for p in preds[len(activating):])
    tpr, tnr = tp / len(activating), tn / len(non_activating)
    return DetectionScore((tpr + tnr) / 2, tpr, tnr, len(activating), len(non_activating))
