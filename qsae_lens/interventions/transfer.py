"""The same intervention at every precision: effect sizes, ratios to the baseline, per-feature agreement.

An intervention is a callable ``model -> context manager`` (e.g. ``functools.partial(steer,
direction=v, strength=4.0, hook_name=...)`` or ``lambda m: steer_feature(m, sae, 12, 2.0)``), so
the identical intervention is applied to each precision's model on identical prompts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, NamedTuple

import torch
from torch import Tensor

from qsae_lens.compare.stats import Estimate, bootstrap_ci
from qsae_lens.interventions.caa import Measure, kl_last, last_logits
from qsae_lens.interventions.steering import steer_feature

Intervention = Callable[[Any], AbstractContextManager[Any]]


class PrecisionEffect(NamedTuple):
    """One precision's response to the intervention."""

    precision: str
    effect: Estimate
    """Mean over prompts of measure(intervened) - measure(clean), bootstrap CI over prompts."""
    ratio: Estimate
    """effect / baseline effect (ratio of prompt means; CI from the same prompt resamples at both)."""
    kl: Estimate
    """Mean over prompts of KL(clean || intervened) at the last position (nats), bootstrap CI."""
    per_prompt: Tensor
    """Tensor[n_prompts] float64: each prompt's effect."""


class TransferResult(NamedTuple):
    """Per-precision effects of one intervention, baseline first."""

    baseline: str
    effects: dict[str, PrecisionEffect]

    def __repr__(self) -> str:
        rows = ", ".join(f"{k}: {v.effect.value:+.3f} (x{v.ratio.value:.2f})" for k, v in self.effects.items())
        return f"TransferResult(baseline={self.baseline!r}, {rows})"


def ratio_ci(num: Tensor, den: Tensor, *, n_resamples: int = 1000, confidence: float = 0.95,
             seed: int = 0) -> Estimate:
    """Percentile-bootstrap CI of ``mean(num) / mean(den)`` resampling the paired rows (``Tensor[n]`` each).

    Written here because :func:`~qsae_lens.compare.stats.bootstrap_ci` bootstraps one mean; a ratio
    needs the same resample at numerator and denominator. Vectorised over resamples."""
    num, den = num.double(), den.double()
    value = float(num.mean() / den.mean()) if float(den.mean()) != 0.0 else float("nan")
    n = num.numel()
    if n < 2:
        return Estimate(value, value, value)
    idx = torch.randint(0, n, (n_resamples, n), generator=torch.Generator().manual_seed(seed))
    ratios = num[idx].mean(1) / den[idx].mean(1)
    ratios = ratios[torch.isfinite(ratios)]
    if ratios.numel() == 0:
        return Estimate(value, float("nan"), float("nan"))
    alpha = (1 - confidence) / 2
    lo, hi = torch.quantile(ratios, torch.tensor([alpha, 1 - alpha], dtype=torch.float64)).tolist()
    return Estimate(value, lo, hi)


def intervention_transfer(models: Mapping[str, Any], intervention: Intervention, prompts: Sequence[str],
                          measure: Callable[[Any], Measure], *, baseline: str | None = None,
                          n_resamples: int = 1000, seed: int = 0) -> TransferResult:
    """Apply ``intervention`` to every model (precision name -> model) on ``prompts``.

    ``measure`` builds each model's :data:`~qsae_lens.interventions.caa.Measure` (it may need the
    model's tokenizer), e.g. ``lambda m: logprob_diff_measure(m, " #", " return")``. ``baseline`` defaults to the first
    model. Returns per precision the effect with CI, the ratio to the baseline's effect, the KL cost.
    """
    if not models:
        raise ValueError("models is empty: pass {precision: model} with at least one model.")
    baseline = next(iter(models)) if baseline is None else baseline
    if baseline not in models:
        raise ValueError(f"baseline {baseline!r} is not one of the models: {sorted(models)}.")
    per_prompt, kls = {}, {}
    for name, model in models.items():
        m = measure(model)
        clean, tokens = last_logits(model, prompts)
        with intervention(model):
            hit, _ = last_logits(model, prompts)
        per_prompt[name] = (m(hit, tokens) - m(clean, tokens)).double()
        kls[name] = kl_last(clean, hit).double().clamp_min(0)
    base = per_prompt[baseline]
    effects = {
        name: PrecisionEffect(name, bootstrap_ci(e, n_resamples=n_resamples, seed=seed),
                              ratio_ci(e, base, n_resamples=n_resamples, seed=seed),
                              bootstrap_ci(kls[name], n_resamples=n_resamples, seed=seed), e)
        for name, e in per_prompt.items()
    }
    order = [baseline] + [k for k in effects if k != baseline]
    return TransferResult(baseline, {k: effects[k] for k in order})


class FeatureCorrelation(NamedTuple):
    """Steering effects of a set of latents at each precision, and their agreement with the baseline."""

    latents: Tensor
    """LongTensor[n_latents]."""
    target_tokens: Tensor
    """LongTensor[n_latents]: the token each latent's decoder row promotes most (through the baseline's W_U)."""
    effects: dict[str, Tensor]
    """precision -> Tensor[n_latents] float64: mean over prompts of the change in log p(target token)."""
    pearson: dict[str, float]
    """precision -> Pearson correlation of its effects with the baseline's across latents."""
    baseline: str

    def __repr__(self) -> str:
        rows = ", ".join(f"{k}: r={v:.3f}" for k, v in self.pearson.items())
        return f"FeatureCorrelation(n_latents={self.latents.numel()}, baseline={self.baseline!r}, {rows})"


@torch.no_grad()
def feature_effect_correlation(models: Mapping[str, Any], sae: Any, latents: Sequence[int] | Tensor,
                               prompts: Sequence[str], *, strength: float = 4.0, mode: str = "add",
                               max_activations: Tensor | None = None, baseline: str | None = None
                               ) -> FeatureCorrelation:
    """Steer each latent of ``sae`` (the baseline's SAE, same directions at every precision) and
    measure the change of log p(the latent's most-promoted token) at the last position, averaged over
    prompts; then correlate the per-latent effects between each precision and the baseline.

    ``strength`` is in units of ``max_activations`` (``Tensor[n_latents]``) when given."""
    lat = torch.as_tensor(latents, dtype=torch.long).reshape(-1)
    baseline = next(iter(models)) if baseline is None else baseline
    w_u = models[baseline].W_U.float()
    targets = (sae.W_dec[lat].detach().float().to(w_u.device) @ w_u).argmax(-1).cpu()
    effects: dict[str, Tensor] = {}
    for name, model in models.items():
        clean, _ = last_logits(model, prompts)
        clean_lp = clean[:, -1].log_softmax(-1)[:, targets]  # [n_prompts, n_latents]
        out = torch.empty(lat.numel(), dtype=torch.float64)
        for j, latent in enumerate(lat.tolist()):
            scale = None if max_activations is None else float(max_activations[j])
            with steer_feature(model, sae, latent, strength, mode=mode, max_activation=scale):  # type: ignore[arg-type]
                hit, _ = last_logits(model, prompts)
            out[j] = float((hit[:, -1].log_softmax(-1)[:, targets[j]] - clean_lp[:, j]).mean())
        effects[name] = out
    base = effects[baseline]
    pearson = {k: float(torch.corrcoef(torch.stack([base, v]))[0, 1]) for k, v in effects.items()}
    return FeatureCorrelation(lat, targets, effects, pearson, baseline)
