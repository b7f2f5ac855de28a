"""Evaluate SAEs spliced into models on one fixed set of held-out tokens: the transfer matrix.

Why not only SAELens's ``run_evals``: it computes CE/KL and explained variance on *different*
token batches drawn from an activation store that keeps advancing, so two cells of a transfer
matrix evaluated one after the other never see the same tokens, and it measures "CE loss
recovered" against zero ablation, which on a bias-free model like SmolLM2 gives all-zero logits
and makes every SAE look ~0.99. Here every (model, SAE) cell is evaluated on the *same* tokens in
one loop, special-token positions are neither spliced nor scored (their residual norm is ~100x
the others'), and CE recovered is measured against **mean ablation** (the residual replaced by
its training-set mean at that precision). The model's own quantization cost (CE increase and KL
against the baseline precision) is reported beside the SAE's, since at nf4 it can exceed it.

SAELens's ``run_evals`` is still run on the diagonal by the sweep (see
:func:`qsae_lens.sweep.run_precision_sweep`) for numbers comparable with other SAELens work.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@dataclasses.dataclass
class ModelEval:
    """A model's own quality on the held-out tokens, and its cost against the baseline precision."""

    model: str
    ce_loss: float
    """Mean next-token cross-entropy (nats) over scored positions."""
    ce_increase_vs_baseline: float
    """``ce_loss`` minus the baseline model's: the quantization cost."""
    kl_vs_baseline: float
    """Mean KL(baseline || this model) per scored token (nats)."""
    n_tokens: int


@dataclasses.dataclass
class SpliceEval:
    """One cell of the transfer matrix: SAE ``sae`` spliced into model ``model`` at its hook."""

    sae: str
    model: str
    hook_name: str
    explained_variance: float
    """1 - sum||x - x_hat||^2 / sum||x - mean(x)||^2 over non-special positions (SAELens's definition)."""
    mse: float
    """Mean squared reconstruction error per token (sum over d_in)."""
    l0: float
    """Mean number of active latents per non-special token."""
    dead_fraction: float
    """Fraction of latents that never fired on these tokens."""
    ce_clean: float
    ce_spliced: float
    ce_mean_ablation: float
    ce_increase: float
    """``ce_spliced - ce_clean`` (nats): what splicing the SAE costs this model."""
    kl: float
    """Mean KL(clean || spliced) per scored token (nats)."""
    ce_recovered_vs_mean_ablation: float
    """(CE_mean_ablation - CE_spliced) / (CE_mean_ablation - CE_clean): 1 = lossless, 0 = no better than the mean."""
    n_tokens: int


class _Sums:
    """Float64 running sums for one cell."""

    def __init__(self, d_sae: int, device: torch.device) -> None:
        self.ce = 0.0
        self.kl = 0.0
        self.n_scored = 0
        self.ss_res = 0.0
        self.sum_x = None
        self.sum_x2 = 0.0
        self.n_pos = 0
        self.l0 = 0.0
        self.fired = torch.zeros(d_sae, dtype=torch.bool, device=device)


def _next_token_ce(logp: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Per-position CE [b, t-1] of predicting tokens[:, 1:] from logp[:, :-1]."""
    return -logp[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1)


def _kl(logp_ref: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """Per-position KL(ref || other) [b, t-1] (positions that predict a next token)."""
    return (logp_ref[:, :-1].exp() * (logp_ref[:, :-1] - logp[:, :-1])).sum(-1)


def _splice_hook(replace: Callable[[torch.Tensor], torch.Tensor], keep: torch.Tensor):
    """A hook that replaces the activation at non-special positions only (``keep`` is [b, t] bool)."""

    def hook(act: torch.Tensor, hook: Any) -> torch.Tensor:  # noqa: ARG001 - TransformerLens signature
        new = replace(act.to(torch.float32)).to(act.dtype)
        return torch.where(keep[..., None], new, act)

    return hook


def _sae_replacement(sae: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> SAE reconstruction of x, computed on the SAE's device and returned on x's."""
    device = sae.W_dec.device
    return lambda act: sae(act.to(device)).to(act.device)


@torch.no_grad()
def evaluate_transfer(
    models: Mapping[str, Any],
    saes: Mapping[str, Any],
    tokens: torch.Tensor,
    *,
    baseline: str,
    mean_activations: Mapping[tuple[str, str], torch.Tensor],
    special_token_ids: Sequence[int],
    max_norms: Mapping[str, float] | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> tuple[dict[str, ModelEval], dict[tuple[str, str], SpliceEval]]:
    """Evaluate every SAE spliced into every model on the same held-out tokens.

    Parameters
    ----------
    models:
        ``{label: HookedRootModule}`` (e.g. one per precision); must include ``baseline``.
    saes:
        ``{label: sae_lens.SAE}``; each is spliced at ``sae.cfg.metadata.hook_name``.
    tokens:
        ``LongTensor[n_seq, ctx]`` held-out windows (never seen in training).
    mean_activations:
        ``{(model_label, hook_name): Tensor[d_in]}``: the training-set mean activation used for
        the mean-ablation baseline of that model at that hook.
    special_token_ids:
        Positions holding these tokens are neither spliced nor scored.
    max_norms:
        ``{hook_name: norm}``: positions where the *baseline* model's activation at that hook is
        longer than this (attention sinks that are not special tokens; the SAEs were trained
        without them) are treated like special tokens, for every model. One such position has
        ~100x the norm of the others and would otherwise dominate explained variance.

    Returns
    -------
    (model_evals, cells): ``model_evals[model]`` and ``cells[(sae, model)]``.
    """
    if baseline not in models:
        raise ValueError(f"baseline {baseline!r} is not one of the models {sorted(models)}")
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be [n_seq, ctx>=2], got shape {tuple(tokens.shape)}")
    hooks = {label: sae.cfg.metadata.hook_name for label, sae in saes.items()}
    for label, hook in hooks.items():
        if hook is None:
            raise ValueError(f"SAE {label!r} has no cfg.metadata.hook_name: cannot know where to splice it.")
    needed_hooks = sorted(set(hooks.values()))
    for m_label in models:
        for hook in needed_hooks:
            if (m_label, hook) not in mean_activations:
                raise ValueError(f"mean_activations lacks ({m_label!r}, {hook!r}) for the mean-ablation baseline")

    special = torch.tensor(sorted(set(special_token_ids)), dtype=torch.long)
    model_sums = {m: {"ce": 0.0, "kl": 0.0, "n": 0} for m in models}
    ablation_ce = {(m, h): 0.0 for m in models for h in needed_hooks}
    cells = {(s, m): _Sums(sae.cfg.d_sae, torch.device("cpu")) for s, sae in saes.items() for m in models}
    order = [baseline, *[m for m in models if m != baseline]]

    batches = tokens.split(batch_size)
    bar = tqdm(total=len(batches) * len(models), desc="transfer matrix", disable=not progress)
    for batch in batches:
        keep = ~torch.isin(batch, special)  # [b, t] positions that are ordinary text
        baseline_logp = None
        for m_label in order:
            model = models[m_label]
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
            b = batch.to(device)
            logits, cache = model.run_with_cache(b, names_filter=needed_hooks)
            if baseline_logp is None:
                # The baseline model (first in `order`) decides which positions are attention-sink
                # outliers; the same positions are then excluded for every model and SAE.
                for hook, limit in (max_norms or {}).items():
                    if hook in cache:
                        keep &= cache[hook].float().norm(dim=-1).cpu() <= limit
                scored = keep[:, :-1] & keep[:, 1:]  # predict an ordinary token from an ordinary token
                n_scored = int(scored.sum())
            logp = F.log_softmax(logits.float(), dim=-1).cpu()
            ce_tok = _next_token_ce(logp, batch)
            ms = model_sums[m_label]
            ms["ce"] += float(ce_tok[scored].sum())
            ms["n"] += n_scored
            if baseline_logp is None:
                baseline_logp = logp
            else:
                ms["kl"] += float(_kl(baseline_logp, logp)[scored].sum())

            keep_dev = keep.to(device)
            for hook in needed_hooks:
                mean = mean_activations[(m_label, hook)].to(device)
                abl_logits = model.run_with_hooks(
                    b, fwd_hooks=[(hook, _splice_hook(lambda a, mean=mean: mean.expand_as(a), keep_dev))]
                )
                abl_logp = F.log_softmax(abl_logits.float(), dim=-1).cpu()
                ablation_ce[(m_label, hook)] += float(_next_token_ce(abl_logp, batch)[scored].sum())

            for s_label, sae in saes.items():
                hook = hooks[s_label]
                x = cache[hook].float()[keep_dev]  # [n_pos, d_in]
                sae_device = sae.W_dec.device
                codes = sae.encode(x.to(sae_device))
                x_hat = sae.decode(codes).to(x.device)
                c = cells[(s_label, m_label)]
                c.ss_res += float(((x - x_hat) ** 2).sum())
                c.sum_x = x.double().sum(0) if c.sum_x is None else c.sum_x + x.double().sum(0)
                c.sum_x2 += float((x.double() ** 2).sum())
                c.n_pos += x.shape[0]
                c.l0 += float((codes != 0).sum())
                c.fired |= (codes != 0).any(0).cpu()

                replace = _sae_replacement(sae)
                spliced = model.run_with_hooks(b, fwd_hooks=[(hook, _splice_hook(replace, keep_dev))])
                sp_logp = F.log_softmax(spliced.float(), dim=-1).cpu()
                c.ce += float(_next_token_ce(sp_logp, batch)[scored].sum())
                c.kl += float(_kl(logp, sp_logp)[scored].sum())
                c.n_scored += n_scored
            bar.update(1)
    bar.close()

    model_evals: dict[str, ModelEval] = {}
    base_ce = model_sums[baseline]["ce"] / max(model_sums[baseline]["n"], 1)
    for m_label, ms in model_sums.items():
        n = max(ms["n"], 1)
        model_evals[m_label] = ModelEval(
            model=m_label,
            ce_loss=ms["ce"] / n,
            ce_increase_vs_baseline=ms["ce"] / n - base_ce,
            kl_vs_baseline=ms["kl"] / n,
            n_tokens=ms["n"],
        )

    results: dict[tuple[str, str], SpliceEval] = {}
    for (s_label, m_label), c in cells.items():
        n = max(c.n_scored, 1)
        ce_clean = model_evals[m_label].ce_loss
        ce_abl = ablation_ce[(m_label, hooks[s_label])] / n
        ce_sp = c.ce / n
        ss_tot = c.sum_x2 - float((c.sum_x**2).sum()) / max(c.n_pos, 1)
        denom = ce_abl - ce_clean
        results[(s_label, m_label)] = SpliceEval(
            sae=s_label,
            model=m_label,
            hook_name=hooks[s_label],
            explained_variance=1.0 - c.ss_res / ss_tot if ss_tot > 0 else float("nan"),
            mse=c.ss_res / max(c.n_pos, 1),
            l0=c.l0 / max(c.n_pos, 1),
            dead_fraction=float((~c.fired).float().mean()),
            ce_clean=ce_clean,
            ce_spliced=ce_sp,
            ce_mean_ablation=ce_abl,
            ce_increase=ce_sp - ce_clean,
            kl=c.kl / n,
            ce_recovered_vs_mean_ablation=(ce_abl - ce_sp) / denom if abs(denom) > 1e-12 else float("nan"),
            n_tokens=c.n_scored,
        )
    return model_evals, results
