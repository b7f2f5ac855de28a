"""Contrastive activation addition (CAA): a steering vector from paired prompts, and a strength sweep.

``caa_vector`` = mean over pairs of (activation on the positive prompt - on the negative one) at one
hook, at the last token or averaged over tokens; its norm and the pairs' agreement (cosine of each
pair's difference with the mean) say whether the pairs point one way. ``strength_sweep`` applies a
vector at several strengths and reports, per strength, the change of a target measure and the KL
from the unsteered model, each with a bootstrap CI over prompts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from qsae_lens.compare.stats import Estimate, bootstrap_ci
from qsae_lens.interventions.steering import Positions, steer

Measure = Callable[[Tensor, Tensor], Tensor]
"""``measure(logits Tensor[batch, pos, d_vocab], tokens Tensor[batch, pos]) -> Tensor[batch]`` (one value per prompt)."""


class CAAVector(NamedTuple):
    """A contrastive steering vector and how consistent its pairs are."""

    vector: Tensor
    """Tensor[d_model]: mean over pairs of positive minus negative activation."""
    norm: float
    """L2 norm of ``vector`` (compare with the residual norm at the hook to choose strengths)."""
    pair_agreement: float
    """Mean cosine between each pair's difference and ``vector`` (1 = all pairs point one way)."""
    pair_cosines: Tensor
    """Tensor[n_pairs]: each pair's cosine with ``vector``."""

    def __repr__(self) -> str:
        return f"CAAVector(d={self.vector.shape[0]}, norm={self.norm:.3g}, pair_agreement={self.pair_agreement:.3f})"


def _layer_of(hook_name: str) -> int | None:
    return int(hook_name.split(".")[1]) + 1 if hook_name.startswith("blocks.") else None


@torch.no_grad()
def collect_activations(model: Any, prompts: Sequence[str], *, hook_name: str,
                        aggregation: Literal["last", "mean"] = "last", batch_size: int = 8,
                        prepend_bos: bool | None = None) -> Tensor:
    """``Tensor[n_prompts, d_model]`` float32: the activation at ``hook_name`` at each prompt's last token,
    or its mean over the prompt's tokens (padding and BOS excluded). Prompts are left-padded in
    batches, so the last token is the last position; the forward stops after the hook's block."""
    from transformer_lens.utilities.tokenize_utils import get_attention_mask

    if aggregation not in ("last", "mean"):
        raise ValueError(f"aggregation must be 'last' or 'mean'; got {aggregation!r}.")
    if not prompts:
        raise ValueError("prompts is empty: pass at least one prompt.")
    pb = model.cfg.default_prepend_bos if prepend_bos is None else prepend_bos
    rows = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        tokens = model.to_tokens(chunk, prepend_bos=pb, padding_side="left")
        mask = get_attention_mask(model.tokenizer, tokens, pb, padding_side="left")
        _, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=[hook_name],
                                        stop_at_layer=_layer_of(hook_name))
        act = cache[hook_name].float()
        if aggregation == "last":
            rows.append(act[:, -1])
        else:
            keep = mask.bool() & (tokens != model.tokenizer.bos_token_id)
            keep = keep.to(act.device)
            rows.append((act * keep[..., None]).sum(1) / keep.sum(1, keepdim=True).clamp_min(1))
    return torch.cat(rows).cpu()


def caa_from_activations(positive: Tensor, negative: Tensor) -> CAAVector:
    """CAA vector from paired activations ``Tensor[n_pairs, d]`` each (row i of both is pair i)."""
    if positive.shape != negative.shape or positive.ndim != 2:
        raise ValueError(f"positive and negative must both be Tensor[n_pairs, d]; got {tuple(positive.shape)} "
                         f"and {tuple(negative.shape)}.")
    diffs = positive.float() - negative.float()
    vector = diffs.mean(0)
    cos = torch.nn.functional.cosine_similarity(diffs, vector[None], dim=-1)
    return CAAVector(vector, float(vector.norm()), float(cos.mean()), cos)


def caa_vector(model: Any, positive: Sequence[str], negative: Sequence[str], *, hook_name: str,
               aggregation: Literal["last", "mean"] = "last", batch_size: int = 8) -> CAAVector:
    """CAA vector at ``hook_name`` from paired prompts (``positive[i]`` pairs with ``negative[i]``);
    apply it with :func:`~qsae_lens.interventions.steer` (``.vector``)."""
    if len(positive) != len(negative):
        raise ValueError(f"positive and negative must pair up: {len(positive)} vs {len(negative)} prompts.")
    pos = collect_activations(model, positive, hook_name=hook_name, aggregation=aggregation, batch_size=batch_size)
    neg = collect_activations(model, negative, hook_name=hook_name, aggregation=aggregation, batch_size=batch_size)
    return caa_from_activations(pos, neg)


def logprob_diff_measure(model: Any, target: str, foil: str) -> Measure:
    """Measure: at each prompt's last position, log p(first token of ``target``) - log p(first token of ``foil``).

    Why first tokens only: one forward per prompt and strength, and the first token is where a
    continuation "as a comment" vs "as code" diverges."""
    t_id = model.tokenizer(target, add_special_tokens=False)["input_ids"][0]
    f_id = model.tokenizer(foil, add_special_tokens=False)["input_ids"][0]
    if t_id == f_id:
        raise ValueError(f"target {target!r} and foil {foil!r} start with the same token; choose different ones.")

    def measure(logits: Tensor, tokens: Tensor) -> Tensor:  # noqa: ARG001
        logp = logits[:, -1].float().log_softmax(-1)
        return logp[:, t_id] - logp[:, f_id]

    return measure


class SweepPoint(NamedTuple):
    """One strength of a strength sweep."""

    strength: float
    effect: Estimate
    """Mean over prompts of measure(steered) - measure(unsteered), with a bootstrap CI."""
    kl: Estimate
    """Mean over prompts of KL(unsteered || steered) at the last position (nats), with a bootstrap CI."""


class StrengthSweep(NamedTuple):
    """Per-strength effect and KL cost of one steering vector."""

    points: list[SweepPoint]
    n_prompts: int

    def __repr__(self) -> str:
        rows = ", ".join(f"{p.strength:g}: effect {p.effect.value:+.3f} kl {p.kl.value:.3f}" for p in self.points)
        return f"StrengthSweep(n_prompts={self.n_prompts}, {rows})"


@torch.no_grad()
def last_logits(model: Any, prompts: Sequence[str], batch_size: int = 8) -> tuple[Tensor, Tensor]:
    """``(logits Tensor[n, 1, d_vocab] float32 at each prompt's last token, tokens of the last batch)``
    with whatever hooks are active (left padding, so the last position is the last token)."""
    from transformer_lens.utilities.tokenize_utils import get_attention_mask

    out, tokens = [], None
    pb = model.cfg.default_prepend_bos
    for start in range(0, len(prompts), batch_size):
        tokens = model.to_tokens(list(prompts[start:start + batch_size]), padding_side="left")
        mask = get_attention_mask(model.tokenizer, tokens, pb, padding_side="left")
        out.append(model(tokens, attention_mask=mask)[:, -1:].float().cpu())
    return torch.cat(out), tokens  # type: ignore[return-value]


def kl_last(ref_logits: Tensor, logits: Tensor) -> Tensor:
    """``Tensor[n]``: KL(ref || other) at the last position; both ``Tensor[n, pos, d_vocab]``."""
    ref = ref_logits[:, -1].float().log_softmax(-1)
    other = logits[:, -1].float().log_softmax(-1)
    return (ref.exp() * (ref - other)).sum(-1)


def strength_sweep(model: Any, vector: Tensor, strengths: Sequence[float], prompts: Sequence[str], *,
                   hook_name: str, measure: Measure, positions: Positions = "all",
                   n_resamples: int = 1000, seed: int = 0) -> StrengthSweep:
    """Apply ``vector`` at each strength to ``prompts``: change of ``measure`` and KL cost, CIs over prompts."""
    base, tokens = last_logits(model, prompts)
    base_m = measure(base, tokens)
    points = []
    for s in strengths:
        with steer(model, vector, s, hook_name=hook_name, positions=positions):
            logits, _ = last_logits(model, prompts)
        effect = (measure(logits, tokens) - base_m).double()
        kl = kl_last(base, logits).double().clamp_min(0)
        points.append(SweepPoint(float(s), bootstrap_ci(effect, n_resamples=n_resamples, seed=seed),
                                 bootstrap_ci(kl, n_resamples=n_resamples, seed=seed)))
    return StrengthSweep(points, len(prompts))


_HEADERS = [
    "def add(a, b):", "def read_file(path):", "class Stack:\n    def push(self, item):", "def mean(values):",
    "for i in range(10):", "def parse_args(argv):", "with open(name) as f:", "def fib(n):",
    "if __name__ == '__main__':", "def normalize(text):", "while queue:", "def area(r):",
]

CODE_COMMENT_PAIRS: tuple[tuple[str, ...], tuple[str, ...]] = (
    tuple(f"{h}\n    # " for h in _HEADERS),
    tuple(f"{h}\n    return " for h in _HEADERS),
)
"""Built-in CAA pair set on code: ``(positive, negative)`` prompts that continue a Python line as a
comment vs as code (same header, last tokens differ). Steering with the resulting vector should
raise log p("#") - log p("return") after a new indented line (:data:`CODE_COMMENT_TEST_PROMPTS`)."""

CODE_COMMENT_TEST_PROMPTS: tuple[str, ...] = tuple(f"{h}\n    " for h in (
    "def sub(a, b):", "def write_file(path, text):", "def median(values):", "for j in range(5):",
    "def main():", "def clean(line):", "try:", "def volume(r, h):",
))
"""Held-out prompts ending at an indented new line, where a comment or code may start."""

CODE_COMMENT_TARGET = ("#", "return")
"""(target, foil) of :func:`logprob_diff_measure` for the code/comment pair set."""
