"""Interpretation, pluggable: explainers label latents from examples, scorers check labels by detection.

Built in: a local Hugging Face chat model (default: the embedded SmolLM2-135M-Instruct) and an
OpenAI-compatible HTTP client (stdlib only; key from an argument or ``OPENAI_API_KEY``, never logged).
"""

from qsae_lens.interpret.base import (
    Context,
    DetectionScore,
    Explainer,
    Scorer,
    detection_score,
    format_examples,
)
from qsae_lens.interpret.openai_compat import OpenAICompatibleClient, OpenAIExplainer, OpenAIScorer

__all__ = ["Context", "DetectionScore", "Explainer", "Scorer", "detection_score", "format_examples",
           "OpenAICompatibleClient", "OpenAIExplainer", "OpenAIScorer", "LocalChatModel", "LocalExplainer",
           "LocalScorer"]


def __getattr__(name: str):  # the local model classes import transformers: only on use
    if name in ("LocalChatModel", "LocalExplainer", "LocalScorer"):
        from qsae_lens.interpret import local

        return getattr(local, name)
    raise AttributeError(name)
