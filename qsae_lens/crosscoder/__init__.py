"""Cross-precision crosscoders: one dictionary over the baseline's and a quantized model's
activations, and the per-latent diffing that says which features quantization creates or destroys.

See docs/crosscoder.md. ``qsae crosscode SWEEP_DIR --precision nf4`` runs it on a sweep's caches.
"""

from qsae_lens.crosscoder.diff import (
    DEAD,
    SHARED,
    Calibration,
    LatentDiff,
    calibrate_threshold,
    classify,
    diff_latents,
)
from qsae_lens.crosscoder.model import CrossCoder, CrossCoderConfig, SparseCodes, decode_bags, stack_sources
from qsae_lens.crosscoder.pages import CrosscoderPages, exclusive_latent_pages
from qsae_lens.crosscoder.train import (
    TrainResult,
    explained_variance,
    train_crosscoder,
    train_crosscoder_with_history,
)

__all__ = [
    "DEAD", "SHARED", "Calibration", "CrossCoder", "CrossCoderConfig", "CrosscoderPages", "LatentDiff", "TrainResult",
    "exclusive_latent_pages",
    "SparseCodes", "calibrate_threshold", "classify", "decode_bags", "diff_latents", "explained_variance",
    "stack_sources",
    "train_crosscoder", "train_crosscoder_with_history",
]
