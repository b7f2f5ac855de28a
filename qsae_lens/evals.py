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

from qsae_lens.metrics import explained_variance_from_sums, kl_per_token, next_token_ce


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
    explained_variance_ci: tuple[float, float] | None = None
    """95% percentile-bootstrap interval of ``explained_variance`` over held-out windows (paired across cells)."""
    ce_increase_ci: tuple[float, float] | None = None
    """95% percentile-bootstrap interval of ``ce_increase`` over held-out windows (paired across cells)."""


class _WindowSums:
    """Float64 sums per held-out window (row of ``tokens``) for one (SAE, model) cell.

    Kept per window, not only in total, so a bootstrap over windows can resample them: all
    Tensor[n_windows] except ``sum_x`` Tensor[n_windows, d_in] and ``fired`` Tensor[d_sae] bool.
    """

    def __init__(self, n_windows: int, d_in: int, d_sae: int) -> None:
        z = lambda: torch.zeros(n_windows, dtype=torch.float64)  # noqa: E731
        self.ss_res, self.sum_sq, self.n_pos, self.l0, self.ce, self.kl = z(), z(), z(), z(), z(), z()
        self.sum_x = torch.zeros(n_windows, d_in, dtype=torch.float64)
        self.fired = torch.zeros(d_sae, dtype=torch.bool)


class _ModelSums:
    """Per-window sums of one model: clean CE, KL against the baseline, scored positions; Tensor[n_windows]."""

    def __init__(self, n_windows: int) -> None:
        self.ce = torch.zeros(n_windows, dtype=torch.float64)
        self.kl = torch.zeros(n_windows, dtype=torch.float64)
        self.n = torch.zeros(n_windows, dtype=torch.float64)


def _row_sums(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of ``values`` Tensor[b, t] over ``mask`` Tensor[b, t] per row -> Tensor[b] float64."""
    return (values.double() * mask.to(values.device)).sum(-1).cpu()


def _splice_hook(replace: Callable[[torch.Tensor], torch.Tensor], keep: torch.Tensor):
    """A hook that replaces the activation at non-special positions only (``keep`` is [b, t] bool)."""

    def hook(act: torch.Tensor, hook: Any) -> torch.Tensor:  # noqa: ARG001 - TransformerLens signature
        new = replace(act.to(torch.float32)).to(act.dtype)
        return torch.where(keep[..., None], new, act)

    return hook


def _check_transfer_inputs(models: Mapping[str, Any], saes: Mapping[str, Any], tokens: torch.Tensor, baseline: str,
                           mean_activations: Mapping[tuple[str, str], torch.Tensor]) -> dict[str, str]:
    """Validate evaluate_transfer's inputs; returns ``{sae label: hook name}``."""
    if baseline not in models:
        raise ValueError(f"baseline {baseline!r} is not one of the models {sorted(models)}")
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be [n_seq, ctx>=2], got shape {tuple(tokens.shape)}")
    hooks = {label: sae.cfg.metadata.hook_name for label, sae in saes.items()}
    for label, hook in hooks.items():
        if hook is None:
            raise ValueError(f"SAE {label!r} has no cfg.metadata.hook_name: cannot know where to splice it.")
    for m_label in models:
        for hook in sorted(set(hooks.values())):
            if (m_label, hook) not in mean_activations:
                raise ValueError(f"mean_activations lacks ({m_label!r}, {hook!r}) for the mean-ablation baseline")
    return hooks


def _sae_cell_update(c: _WindowSums, sae: Any, x: torch.Tensor, keep: torch.Tensor, row0: int) -> torch.Tensor:
    """Add one batch's reconstruction sums to ``c``; returns x_hat Tensor[b, t, d] (x where not kept).

    ``x`` Tensor[b, t, d] float32 clean activations, ``keep`` Tensor[b, t] bool (same device as x);
    the batch's first row is window ``row0``. The returned x_hat is what the splice writes into the model, so each SAE runs once per batch.
    """
    rows = keep.nonzero()[:, 0].cpu() + row0
    x_sel = x[keep]  # [n_pos, d]
    codes = sae.encode(x_sel.to(sae.W_dec.device))
    x_hat_sel = sae.decode(codes).to(x.device)
    x64, r64 = x_sel.double().cpu(), (x_sel - x_hat_sel).double().cpu()
    c.ss_res.index_add_(0, rows, (r64 * r64).sum(-1))
    c.sum_sq.index_add_(0, rows, (x64 * x64).sum(-1))
    c.sum_x.index_add_(0, rows, x64)
    c.n_pos.index_add_(0, rows, torch.ones(len(rows), dtype=torch.float64))
    active = (codes != 0).cpu()
    c.l0.index_add_(0, rows, active.sum(-1).double())
    c.fired |= active.any(0)
    x_hat = x.clone()
    x_hat[keep] = x_hat_sel
    return x_hat


def _model_batch(model: Any, b: torch.Tensor, batch: torch.Tensor, keep: torch.Tensor, hooks: list[str],
                 max_norms: Mapping[str, float] | None, decide_keep: bool) -> tuple[torch.Tensor, dict[str, Any]]:
    """Clean forward of one batch: log-probs Tensor[b, t, vocab] (CPU) and the cached hook activations.

    With ``decide_keep`` (the baseline model, run first) positions whose activation norm exceeds
    ``max_norms[hook]`` are removed from ``keep`` in place, for every model and SAE after it.
    """
    logits, cache = model.run_with_cache(b, names_filter=hooks)
    if decide_keep:
        for hook, limit in (max_norms or {}).items():
            if hook in cache:
                keep &= cache[hook].float().norm(dim=-1).cpu() <= limit
    return F.log_softmax(logits.float(), dim=-1).cpu(), cache


def _spliced_logp(model: Any, b: torch.Tensor, hook: str, values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Log-probs Tensor[b, t, vocab] (CPU) with the activation at ``hook`` replaced by ``values`` where ``keep``."""
    logits = model.run_with_hooks(b, fwd_hooks=[(hook, _splice_hook(lambda a: values.expand_as(a), keep))])
    return F.log_softmax(logits.float(), dim=-1).cpu()


def _percentile_ci(samples: torch.Tensor) -> tuple[float, float] | None:
    """(2.5%, 97.5%) percentiles of Tensor[n_bootstrap] ignoring NaN; None when nothing is finite."""
    s = samples[torch.isfinite(samples)]
    if s.numel() == 0:
        return None
    q = torch.quantile(s, torch.tensor([0.025, 0.975], dtype=s.dtype))
    return float(q[0]), float(q[1])


def _window_bootstrap(cells: Mapping[tuple[str, str], _WindowSums], model_sums: Mapping[str, _ModelSums],
                      n_bootstrap: int, seed: int) -> dict[tuple[str, str], tuple[Any, Any]]:
    """Paired percentile bootstrap over held-out windows: ``{(sae, model): (EV CI, ΔCE CI)}``.

    One resampling of the windows (Tensor[n_bootstrap, n_windows] counts, seeded) serves every
    cell, so differences between cells are paired. EV is recomputed from the resampled sums with
    :func:`qsae_lens.metrics.explained_variance_from_sums`; ΔCE = (Σ spliced CE - Σ clean CE) / Σ scored.
    """
    n_windows = next(iter(model_sums.values())).n.shape[0]
    if n_bootstrap < 1 or n_windows < 2:
        return {key: (None, None) for key in cells}
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(n_windows, (n_bootstrap, n_windows), generator=gen)
    counts = torch.zeros(n_bootstrap, n_windows, dtype=torch.float64).scatter_add_(
        1, idx, torch.ones(n_bootstrap, n_windows, dtype=torch.float64))
    out = {}
    for (s_label, m_label), c in cells.items():
        ev = explained_variance_from_sums(counts @ c.n_pos, counts @ c.sum_x, counts @ c.sum_sq, counts @ c.ss_res)
        ms = model_sums[m_label]
        d_ce = (counts @ c.ce - counts @ ms.ce) / (counts @ ms.n).clamp_min(1)
        out[(s_label, m_label)] = (_percentile_ci(ev), _percentile_ci(d_ce))
    return out


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
    n_bootstrap: int = 1000,
    seed: int = 0,
    progress: bool = True,
) -> tuple[dict[str, ModelEval], dict[tuple[str, str], SpliceEval]]:
    """Evaluate every SAE spliced into every model on the same held-out tokens.

    ``models``: ``{label: HookedRootModule}`` (one per precision), including ``baseline``.
    ``saes``: ``{label: sae_lens.SAE}``, each spliced at ``sae.cfg.metadata.hook_name``.
    ``tokens``: LongTensor[n_windows, ctx] held-out windows (never seen in training).
    ``mean_activations``: ``{(model_label, hook_name): Tensor[d_in]}``, the training-set mean used
    for the mean-ablation baseline. Positions holding ``special_token_ids`` are neither spliced nor
    scored. ``max_norms``: ``{hook_name: norm}``; positions where the *baseline* model's activation is
    longer (attention sinks, :func:`qsae_lens.sweep.sinks.sink_norm_limit`) are treated like special
    tokens for every model. Each SAE runs once per batch: its reconstruction of the clean activations
    is both scored and spliced. ``n_bootstrap`` resamplings of the windows (seeded by ``seed``) give
    the paired 95% intervals of each cell's EV and ΔCE (None with fewer than 2 windows).

    Returns ``(model_evals, cells)``: ``model_evals[model]`` and ``cells[(sae, model)]``.
    """
    hooks = _check_transfer_inputs(models, saes, tokens, baseline, mean_activations)
    needed_hooks = sorted(set(hooks.values()))
    special = torch.tensor(sorted(set(special_token_ids)), dtype=torch.long)
    n_windows = tokens.shape[0]
    model_sums = {m: _ModelSums(n_windows) for m in models}
    ablation = {(m, h): torch.zeros(n_windows, dtype=torch.float64) for m in models for h in needed_hooks}
    cells = {(s, m): _WindowSums(n_windows, sae.cfg.d_in, sae.cfg.d_sae) for s, sae in saes.items() for m in models}
    order = [baseline, *[m for m in models if m != baseline]]
    bar = tqdm(total=-(-n_windows // batch_size) * len(models), desc="transfer matrix", disable=not progress)
    for start in range(0, n_windows, batch_size):
        batch = tokens[start:start + batch_size]
        rows = slice(start, start + batch.shape[0])
        keep = ~torch.isin(batch, special)  # [b, t] ordinary-text positions; narrowed by the baseline
        baseline_logp = scored = None
        for m_label in order:
            model = models[m_label]
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
            b = batch.to(device)
            logp, cache = _model_batch(model, b, batch, keep, needed_hooks, max_norms, baseline_logp is None)
            if baseline_logp is None:
                baseline_logp, scored = logp, keep[:, :-1] & keep[:, 1:]  # ordinary token from ordinary token
            ms = model_sums[m_label]
            ms.ce[rows] += _row_sums(next_token_ce(logp, batch), scored)
            ms.n[rows] += scored.sum(-1).double()
            ms.kl[rows] += _row_sums(kl_per_token(baseline_logp, logp), scored)
            keep_dev = keep.to(device)
            for hook in needed_hooks:
                mean = mean_activations[(m_label, hook)].to(device)
                abl = _spliced_logp(model, b, hook, mean, keep_dev)
                ablation[(m_label, hook)][rows] += _row_sums(next_token_ce(abl, batch), scored)
            for s_label, sae in saes.items():
                c = cells[(s_label, m_label)]
                x = cache[hooks[s_label]].float()
                x_hat = _sae_cell_update(c, sae, x, keep_dev, start)
                sp = _spliced_logp(model, b, hooks[s_label], x_hat, keep_dev)
                c.ce[rows] += _row_sums(next_token_ce(sp, batch), scored)
                c.kl[rows] += _row_sums(kl_per_token(logp, sp), scored)
            bar.update(1)
    bar.close()
    cis = _window_bootstrap(cells, model_sums, n_bootstrap, seed)
    return _assemble(model_sums, ablation, cells, hooks, baseline, cis)


def _assemble(model_sums: Mapping[str, _ModelSums], ablation: Mapping[tuple[str, str], torch.Tensor],
              cells: Mapping[tuple[str, str], _WindowSums], hooks: Mapping[str, str], baseline: str,
              cis: Mapping[tuple[str, str], tuple[Any, Any]]) -> tuple[dict[str, ModelEval], dict[tuple[str, str], SpliceEval]]:
    """Totals of the per-window sums -> the typed results."""
    def mean(total: torch.Tensor, n: torch.Tensor) -> float:
        return float(total.sum()) / max(float(n.sum()), 1.0)

    base = model_sums[baseline]
    model_evals = {
        m: ModelEval(model=m, ce_loss=mean(ms.ce, ms.n), ce_increase_vs_baseline=mean(ms.ce, ms.n) - mean(base.ce, base.n),
                     kl_vs_baseline=mean(ms.kl, ms.n), n_tokens=int(ms.n.sum()))
        for m, ms in model_sums.items()
    }
    results: dict[tuple[str, str], SpliceEval] = {}
    for (s_label, m_label), c in cells.items():
        ms = model_sums[m_label]
        ce_clean = model_evals[m_label].ce_loss
        ce_abl = mean(ablation[(m_label, hooks[s_label])], ms.n)
        ce_sp = mean(c.ce, ms.n)
        denom = ce_abl - ce_clean
        n_pos = float(c.n_pos.sum())
        ev = explained_variance_from_sums(n_pos, c.sum_x.sum(0), c.sum_sq.sum(), c.ss_res.sum())
        results[(s_label, m_label)] = SpliceEval(
            sae=s_label, model=m_label, hook_name=hooks[s_label],
            explained_variance=float(ev), mse=float(c.ss_res.sum()) / max(n_pos, 1.0),
            l0=float(c.l0.sum()) / max(n_pos, 1.0), dead_fraction=float((~c.fired).float().mean()),
            ce_clean=ce_clean, ce_spliced=ce_sp, ce_mean_ablation=ce_abl, ce_increase=ce_sp - ce_clean,
            kl=mean(c.kl, ms.n),
            ce_recovered_vs_mean_ablation=(ce_abl - ce_sp) / denom if abs(denom) > 1e-12 else float("nan"),
            n_tokens=int(ms.n.sum()), explained_variance_ci=cis[(s_label, m_label)][0],
            ce_increase_ci=cis[(s_label, m_label)][1],
        )
    return model_evals, results


def flatten_run_evals(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """SAELens ``run_evals`` output (nested dicts) -> ``{"group/metric": float}``.

    The one flattening used by the sweep's ``saelens_run_evals.json`` and ``qsae publish --evals``,
    so a sweep's file feeds a publish as is. Non-numeric leaves are dropped; bools become 0/1.
    """
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_run_evals(value, name + "/"))
        elif isinstance(value, (int, float)):
            flat[name] = float(value)
    return flat
