"""Why features die: predict a latent's survival from reference-only statistics, with a cross-validated AUC.

Duan 2026 report that survival is predictable from full-precision statistics with AUC 0.92-0.97.
The features here are all computed without the quantized *activations*:

- ``log10_freq``: log10 firing frequency in the reference;
- ``log_mean_act``: log mean activation over firing tokens;
- ``dec_norm``: decoder-row norm; ``enc_norm``: encoder-column norm (the latent's gain on its input);
- ``err_align`` (when weight errors are given): how much of the weight-quantization error of the
  residual-writing projections of the blocks at and below the SAE's layer lies along the decoder
  direction, ``Σ_m ‖ΔW_mᵀ d‖² / Σ_m ‖ΔW_m‖_F² · d_model`` (1 = an isotropic share; ΔW_m = dequantized
  quantized weight − reference weight, both read from the loaded models).

scikit-learn's ``LogisticRegression`` on standardised features, stratified K-fold cross-validation
(``roc_auc_score`` on held-out folds); the coefficients are those of a final fit on all latents
(standardised units: comparable across features). Needs the ``analysis`` extra (scikit-learn).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

__all__ = ["SurvivalPredictor", "reference_features", "predict_survival", "weight_error_alignment",
           "quantization_errors", "ANCHOR_AUC"]

ANCHOR_AUC = (0.92, 0.97)
"""Duan 2026's published AUC range (Pythia-70M, Gemma-2-2B) for predicting survival from fp statistics."""


class SurvivalPredictor(NamedTuple):
    """A cross-validated logistic model of "survived" vs "blurred or died" among reference-alive latents."""

    auc: float
    """Mean held-out ROC AUC over folds (NaN when a class has fewer members than folds)."""
    auc_folds: tuple[float, ...]
    coefficients: dict[str, float]
    """Feature name -> coefficient of the full-data fit on standardised features."""
    n_latents: int
    n_survived: int

    def __repr__(self) -> str:
        coef = ", ".join(f"{k}={v:+.2f}" for k, v in self.coefficients.items())
        return (f"SurvivalPredictor(auc={self.auc:.3f} over {len(self.auc_folds)} folds, n={self.n_latents}, "
                f"survived={self.n_survived}; {coef}; anchor {ANCHOR_AUC[0]}-{ANCHOR_AUC[1]})")

    def to_dict(self) -> dict[str, Any]:
        return {"auc": None if math.isnan(self.auc) else self.auc, "auc_folds": list(self.auc_folds),
                "coefficients": self.coefficients, "n_latents": self.n_latents, "n_survived": self.n_survived,
                "anchor_auc": list(ANCHOR_AUC)}


def _sklearn() -> Any:
    try:
        import sklearn  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the survival predictor needs scikit-learn: pip install scikit-learn (a qsae-lens dependency)") from e
    return sklearn


def weight_error_alignment(W_dec: Tensor, errors: Sequence[Tensor]) -> Tensor:
    """``Tensor[d_sae]``: share of the weight-error energy along each decoder direction, times d_model.

    ``W_dec: Tensor[d_sae, d_model]``; ``errors``: ``Tensor[d_model, k_m]`` each (ΔW of a projection
    that writes into the residual stream, output dimension first as in ``nn.Linear.weight``).
    """
    d = W_dec.float() / W_dec.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
    num = torch.zeros(d.shape[0])
    den = 0.0
    for e in errors:
        e = e.float()
        num += ((d @ e) ** 2).sum(1)
        den += float((e ** 2).sum())
    return num / max(den, 1e-30) * d.shape[1]


def quantization_errors(model_ref: Any, model_q: Any, layer: int) -> list[Tensor]:
    """ΔW (``Tensor[d_model, in]``) of every residual-writing linear (``out_features == d_model``) in blocks 0..layer.

    Reads the quantized weights dequantized (:func:`qsae_lens.models.dequantized.dequantize_linear_weight`).
    """
    from qsae_lens.models.architectures import get_submodule
    from qsae_lens.models.dequantized import dequantize_linear_weight

    d_model = model_ref.cfg.d_model
    layers_r = get_submodule(model_ref.hf_model, model_ref.adapter.layers)
    layers_q = get_submodule(model_q.hf_model, model_q.adapter.layers)
    out = []
    for L in range(layer + 1):
        mods_q = dict(layers_q[L].named_modules())
        for name, mod in layers_r[L].named_modules():
            w = getattr(mod, "weight", None)
            if not isinstance(mod, torch.nn.Linear) or w is None or w.shape[0] != d_model:
                continue
            mq = mods_q[name]
            wq = dequantize_linear_weight(mq)
            wq = mq.weight.detach().float() if wq is None else wq
            out.append(wq.float() - w.detach().float())
    return out


def reference_features(report: Any, sae: Any, *, err_align: Tensor | None = None) -> tuple[Tensor, list[str]]:
    """``(X: Tensor[d_sae, f] float64, names)`` of reference-only statistics (see the module docstring)."""
    cols = {
        "log10_freq": report.freq_ref.clamp_min(1e-9).log10(),
        "log_mean_act": report.mean_ref.clamp_min(1e-9).log(),
        "dec_norm": sae.W_dec.detach().double().norm(dim=1),
        "enc_norm": sae.W_enc.detach().double().norm(dim=0),
    }
    if err_align is not None:
        cols["err_align"] = err_align.double()
    return torch.stack(list(cols.values()), dim=1), list(cols)


def predict_survival(X: Tensor, survived: Tensor, names: Sequence[str], *, n_folds: int = 5,
                     seed: int = 0) -> SurvivalPredictor:
    """Cross-validated logistic regression of ``survived: Tensor[n] bool`` on ``X: Tensor[n, f]``.

    Pass only reference-alive latents (dead/born ones have no reference statistics to speak of).
    """
    _sklearn()
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.nan_to_num(X.double().numpy())
    y = survived.bool().numpy().astype(int)
    n_pos = int(y.sum())
    folds = min(n_folds, n_pos, len(y) - n_pos)
    aucs: list[float] = []
    if folds >= 2:
        for tr, te in StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, y):
            clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(x[tr], y[tr])
            aucs.append(float(roc_auc_score(y[te], clf.predict_proba(x[te])[:, 1])))
    coef: dict[str, float] = {}
    if 0 < n_pos < len(y):
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(x, y)
        coef = dict(zip(names, clf[-1].coef_[0].tolist()))
    return SurvivalPredictor(float(np.mean(aucs)) if aucs else math.nan, tuple(aucs), coef, len(y), n_pos)
