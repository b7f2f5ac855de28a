"""Feature survival across precisions, latent by latent: frozen-SAE survival, its predictor, top examples.

``feature_survival`` (frozen SAE on reference vs quantized activations of the same tokens),
``predict_survival`` (why features die), ``top_examples`` / ``logit_lens`` (what each feature is).
"""

from qsae_lens.survival.examples import (
    ExampleAccumulator,
    FeatureExamples,
    LogitLens,
    logit_lens,
    quantile_examples,
    top_examples,
    top_examples_from_activations,
    unembedding,
)
from qsae_lens.survival.frozen import (
    STATUSES,
    Fraction,
    SurvivalReport,
    SurvivalThresholds,
    feature_survival,
    threshold_curve,
    transposed_survival,
)
from qsae_lens.survival.predictor import (
    SurvivalPredictor,
    predict_survival,
    quantization_errors,
    reference_features,
    weight_error_alignment,
)
from qsae_lens.survival.streaming import HIST_EDGES, FixedBinHistogram, RunningTopK

__all__ = [
    "STATUSES",
    "Fraction",
    "SurvivalReport",
    "SurvivalThresholds",
    "feature_survival",
    "threshold_curve",
    "transposed_survival",
    "ExampleAccumulator",
    "FeatureExamples",
    "LogitLens",
    "logit_lens",
    "quantile_examples",
    "top_examples",
    "top_examples_from_activations",
    "unembedding",
    "SurvivalPredictor",
    "predict_survival",
    "quantization_errors",
    "reference_features",
    "weight_error_alignment",
    "HIST_EDGES",
    "FixedBinHistogram",
    "RunningTopK",
]
