"""Build the feature atlas: one frozen SAE read at every precision, rendered side by side.

For the reference model and each quantized model, :func:`qsae_lens.survival.examples.top_examples`
runs once over the same token windows (the frozen SAE encodes that model's activations); then the
windows holding the shown examples are re-run (only those) to get every token's activation in each
context, and :func:`write_feature_pages` writes the site.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from qsae_lens.dashboards.pages import Example, LatentPage, PrecisionView, write_feature_pages
from qsae_lens.survival.examples import (
    FeatureExamples,
    context_windows,
    logit_lens,
    quantile_examples,
    top_examples,
    unembedding,
)

__all__ = ["AtlasResult", "build_atlas", "choose_latents"]


class AtlasResult(NamedTuple):
    """Where the atlas went and what it shows."""

    path: Path
    """Folder holding ``index.html``."""
    latents: list[int]
    """Latents with a page."""
    examples: dict[str, FeatureExamples]
    """Precision -> the frozen SAE's examples on that precision's model (all latents)."""


def choose_latents(freq: Tensor, n: int, reports: Mapping[str, Any] | None = None) -> list[int]:
    """Up to ``n`` latents worth a page: alive latents spread over statuses and frequencies.

    With survival reports, latents are taken round-robin from each status (so died and blurred
    ones show, not only the common survivors); within a status, most frequent first.
    """
    alive = (freq > 0).nonzero().flatten()
    order = alive[freq[alive].argsort(descending=True)].tolist()
    if not reports:
        return sorted(order[:n])
    status = next(iter(reports.values())).status
    groups: dict[str, list[int]] = {}
    for i in order:
        groups.setdefault(status[i], []).append(i)
    picked: list[int] = []
    while len(picked) < min(n, len(order)):
        for g in list(groups):
            if groups[g]:
                picked.append(groups[g].pop(0))
            if len(picked) >= n:
                break
        if not any(groups.values()):
            break
    return sorted(picked)


def _tok_strings(tokenizer: Any, ids: Sequence[int], cache: dict[int, str]) -> list[str]:
    for i in set(ids) - cache.keys():
        cache[i] = tokenizer.decode([i])
    return [cache[i] for i in ids]


def _examples(items: list[tuple[float, int]], tokens: Tensor, codes: dict[int, Tensor], j: int, tokenizer: Any,
              tok_cache: dict[int, str]) -> list[Example]:
    """Examples (value, flat row) rendered with their context and the latent's code on every token of it."""
    ctx = tokens.shape[1]
    out = []
    for (v, r), (w, a, b) in zip(items, context_windows(tokens, [r for _, r in items])):
        out.append(Example(_tok_strings(tokenizer, tokens[w, a:b].tolist(), tok_cache), codes[w][a:b, j].tolist(),
                           r % ctx - a, v))
    return out


@torch.no_grad()
def _context_codes(sae: Any, model: Any, tokens: Tensor, windows: list[int], latents: list[int], hook_name: str,
                   batch_size: int) -> dict[int, Tensor]:
    """window -> Tensor[ctx, m]: the frozen SAE's codes of ``latents`` over that whole window."""
    from qsae_lens.activations import stop_at_layer_for

    stop = stop_at_layer_for([hook_name])
    out: dict[int, Tensor] = {}
    lat = torch.tensor(latents)
    for s in range(0, len(windows), batch_size):
        ws = windows[s:s + batch_size]
        _, cache = model.run_with_cache(tokens[ws], names_filter=[hook_name], stop_at_layer=stop)
        a = cache[hook_name]
        codes = sae.encode(a.reshape(-1, a.shape[-1]).float()).reshape(a.shape[0], a.shape[1], -1)[:, :, lat]
        out.update({w: codes[j].cpu() for j, w in enumerate(ws)})
    return out


def build_atlas(
    sae: Any,
    models: Mapping[str, Any],
    tokens: Tensor,
    hook_name: str,
    out_dir: str | os.PathLike[str],
    *,
    reference: str,
    latents: Sequence[int] | None = None,
    n_latents: int = 48,
    k: int = 10,
    n_quantiles: int = 5,
    reports: Mapping[str, Any] | None = None,
    own_saes: Mapping[str, Any] | None = None,
    labels: Mapping[int, str] | None = None,
    batch_size: int = 8,
    note: str = "",
    progress: bool = False,
) -> AtlasResult:
    """Write the atlas of the frozen ``sae`` (trained on ``reference``) over ``models`` (precision -> model).

    ``tokens: Tensor[n_windows, ctx]``; ``reports``: precision -> SurvivalReport of this SAE (statuses
    and correlations shown); ``own_saes``: precision -> that precision's own SAE (its best-matching
    latent by decoder cosine is shown); ``labels``: latent -> explanation.
    """
    if reference not in models:
        raise ValueError(f"reference precision {reference!r} is not among the models {sorted(models)}")
    order = [reference] + [p for p in models if p != reference]
    examples = {p: top_examples(sae, models[p], tokens, hook_name=hook_name, k=k, batch_size=batch_size,
                                progress=progress) for p in order}
    chosen = list(latents) if latents is not None else choose_latents(examples[reference].frequency, n_latents, reports)
    W_dec = sae.W_dec.detach().float()
    tokenizer = models[reference].tokenizer
    tok_cache: dict[int, str] = {}
    matches: dict[str, tuple[Tensor, Tensor]] = {}
    if own_saes:
        from qsae_lens.compare.alignment import best_match

        for p, own in own_saes.items():
            bm = best_match(W_dec[chosen], own.W_dec.detach().float())
            matches[p] = (bm.index, bm.cosine)

    per_prec: dict[str, dict[int, PrecisionView]] = {}
    for p in order:
        ex = examples[p]
        W_U, gain = unembedding(models[p])
        lens = logit_lens(W_dec[chosen], W_U, gain, n=8)
        shown: dict[int, tuple[list[tuple[float, int]], list[tuple[float, int]]]] = {}
        for i in chosen:
            top = [(float(v), int(r)) for v, r in zip(ex.top_values[i].tolist(), ex.top_rows[i].tolist()) if r >= 0]
            shown[i] = (top, quantile_examples(ex, i, n_quantiles))
        ctx = tokens.shape[1]
        windows = sorted({r // ctx for t, q in shown.values() for _, r in t + q})
        codes = _context_codes(sae, models[p], tokens, windows, chosen, hook_name, batch_size)
        views = {}
        for j, i in enumerate(chosen):
            def mk(items: list[tuple[float, int]], j: int = j, codes: dict[int, Tensor] = codes) -> list[Example]:
                return _examples(items, tokens, codes, j, tokenizer, tok_cache)

            rep = reports.get(p) if reports and p != reference else None
            m = (int(matches[p][0][j]), float(matches[p][1][j])) if p in matches else None
            views[i] = PrecisionView(
                precision=p, top=mk(shown[i][0]), quantiles=mk(shown[i][1]),
                hist_edges=ex.hist_edges.tolist(), hist_counts=ex.hist_counts[i].tolist(),
                frequency=float(ex.frequency[i]),
                promoted=list(zip(_tok_strings(tokenizer, lens.top_ids[j].tolist(), tok_cache), lens.top_values[j].tolist())),
                suppressed=list(zip(_tok_strings(tokenizer, lens.bottom_ids[j].tolist(), tok_cache), lens.bottom_values[j].tolist())),
                status=rep.status[i] if rep is not None else None,
                pearson=float(rep.pearson[i]) if rep is not None else None,
                jaccard=float(rep.firing_jaccard[i]) if rep is not None else None,
                matched=m)
        per_prec[p] = views
    pages = [LatentPage(i, [per_prec[p][i] for p in order], (labels or {}).get(i)) for i in chosen]
    write_feature_pages(out_dir, pages, note=note or f"frozen {reference} SAE at {hook_name}")
    return AtlasResult(Path(out_dir), chosen, examples)
