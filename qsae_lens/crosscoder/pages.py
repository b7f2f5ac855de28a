"""Feature-browser pages for a crosscoder's exclusive latents (the ones quantization creates or destroys).

A crosscoder has **one** code per token, ``f_j(t)``, read from both sources at once; what differs
between sources is how much the latent writes into each source's reconstruction. Each source's
column therefore shows the latent's *contribution* to that source, ``f_j(t) · ||W_dec[j, s]||`` in
the source's raw units (Tensor[n] per latent): a baseline-only latent is bright in the baseline
column and near zero in the quantized one. Top and quantile examples, histograms and firing
frequency come from :class:`qsae_lens.survival.examples.ExampleAccumulator` (one streaming pass,
memory independent of the number of tokens), and the site from
:func:`qsae_lens.dashboards.write_feature_pages`; each page also lists the latent's relative norm,
decoder cosine and Latent Scaling ratios and flag.

Works from cached activations alone (no model run): ``positions`` maps each activation row to its
flat position ``window * ctx + pos`` in ``token_ids: Tensor[n_windows, ctx]``, so contexts are the
cached tokens around each example.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from qsae_lens.crosscoder.diff import DEAD, SHARED, LatentDiff
from qsae_lens.crosscoder.model import CrossCoder, stack_sources

__all__ = ["CrosscoderPages", "exclusive_latent_pages"]


class CrosscoderPages(NamedTuple):
    """What :func:`exclusive_latent_pages` wrote."""

    path: Path
    """Folder holding ``index.html`` and one ``latent_XXXXXX.html`` per latent."""
    latents: list[int]
    """Latents with a page (exclusive ones first by how exclusive, capped at ``max_latents``)."""
    top_rows: Tensor
    """Tensor[len(latents), k] int64: flat token positions of each latent's top examples (-1 padding)."""


def _status(label: int, names: Sequence[str]) -> str:
    return "dead" if label == DEAD else "shared" if label == SHARED else f"only {names[label]}"


def exclusive_latent_pages(
    model: CrossCoder,
    sources: Sequence[Tensor],
    diff: LatentDiff,
    token_ids: Tensor,
    positions: Tensor,
    tokenizer: Any,
    out_dir: str | os.PathLike[str],
    *,
    latents: Sequence[int] | None = None,
    max_latents: int = 64,
    n_lopsided: int = 0,
    k: int = 10,
    n_quantiles: int = 5,
    block: int = 4096,
    note: str = "",
) -> CrosscoderPages:
    """Write browser pages for the exclusive latents of a two-source crosscoder.

    Why: "which features does quantization create or destroy" is only half answered by a count;
    the pages show what each created/destroyed latent fires on, side by side for both sources.

    ``sources``: the aligned activations ``[Tensor[n, d], Tensor[n, d]]`` that ``diff`` was computed
    on; ``token_ids: Tensor[n_windows, ctx]`` the cached token windows; ``positions: Tensor[n]``
    int64 the flat position of each activation row in ``token_ids``; ``tokenizer`` decodes the token
    strings. ``latents`` overrides the choice (default: exclusive latents, the most exclusive first,
    at most ``max_latents``, plus the ``n_lopsided`` shared live latents whose relative norm is
    farthest from 0.5: the near-exclusive ones, so a run with no exclusive latent still shows its
    closest candidates; the index's "exclusive to" column tells them apart). Memory: one ``Tensor[block, d_sae]`` of codes at a time, plus
    ``Tensor[n_positions, len(latents)]`` of per-position contributions for the context shading.
    """
    from qsae_lens.dashboards.pages import Example, LatentPage, PrecisionView, write_feature_pages
    from qsae_lens.survival.examples import ExampleAccumulator, context_windows, quantile_examples

    x_all = stack_sources(list(sources)).float()
    n, n_src, _ = x_all.shape
    if positions.shape != (n,):
        raise ValueError(f"positions must be Tensor[{n}] (one flat token position per activation row), "
                         f"got {tuple(positions.shape)}")
    n_win, ctx = token_ids.shape
    if n and int(positions.max()) >= n_win * ctx:
        raise ValueError(f"positions reach {int(positions.max())} but token_ids has only {n_win * ctx} positions")
    names = model.cfg.source_names
    if latents is None:
        excl = (diff.exclusive_to >= 0).nonzero().flatten()
        extremity = (diff.relative_norm[excl] - 0.5).abs()  # the most exclusive first
        latents = excl[extremity.argsort(descending=True)][:max_latents].tolist()
        if n_lopsided > 0:
            shared = (diff.exclusive_to == SHARED).nonzero().flatten()
            off = (diff.relative_norm[shared].detach() - 0.5).abs().nan_to_num(-1.0)
            latents += shared[off.argsort(descending=True)][:n_lopsided].tolist()
    chosen = torch.tensor(sorted(int(j) for j in latents), dtype=torch.long)
    norms = model.decoder_norms().detach()  # Tensor[d_sae, S] raw units

    if len(chosen) == 0:  # nothing exclusive: an index that says so
        path = write_feature_pages(out_dir, [], title=f"Crosscoder exclusive latents: {' vs '.join(names)}",
                                   note=f"No exclusive latent at cut {diff.threshold:.3f}. {note}".strip())
        return CrosscoderPages(path, [], torch.zeros(0, k, dtype=torch.long))
    accs = [ExampleAccumulator(len(chosen), k=k, n_samples=4 * n_quantiles, seed=s) for s in range(n_src)]
    contrib = torch.zeros(n_src, n_win * ctx, len(chosen))  # per-position contributions, for context shading
    with torch.no_grad():
        for s0 in range(0, n, block):
            f = model.encode(x_all[s0:s0 + block])[:, chosen]  # Tensor[b, m]
            for s in range(n_src):
                c = f * norms[chosen, s]
                accs[s].update(c, s0)  # rows are activation rows here; mapped to positions below
                contrib[s, positions[s0:s0 + block]] = c
    ex = [a.result() for a in accs]

    tok_cache: dict[int, str] = {}
    flat_tokens = token_ids.reshape(-1).tolist()

    def tok(i: int) -> str:
        if i not in tok_cache:
            tok_cache[i] = tokenizer.decode([i])
        return tok_cache[i]

    def examples(items: list[tuple[float, int]], s: int, j: int) -> list[Example]:
        pos = [int(positions[r]) for _, r in items]
        out = []
        for (v, _), p, (w, a, b) in zip(items, pos, context_windows(token_ids, pos)):
            out.append(Example([tok(t) for t in flat_tokens[w * ctx + a:w * ctx + b]],
                               contrib[s, w * ctx + a:w * ctx + b, j].tolist(), p - w * ctx - a, v))
        return out

    pages = []
    top_rows = torch.full((len(chosen), k), -1, dtype=torch.long)
    for j, latent in enumerate(chosen.tolist()):
        views = []
        for s in range(n_src):
            e = ex[s]
            top = [(float(v), int(r)) for v, r in zip(e.top_values[j].tolist(), e.top_rows[j].tolist()) if r >= 0]
            if s == 0 and top:
                top_rows[j, :len(top)] = positions[torch.tensor([r for _, r in top])]
            views.append(PrecisionView(
                precision=names[s], top=examples(top, s, j), quantiles=examples(quantile_examples(e, j, n_quantiles), s, j),
                hist_edges=e.hist_edges.tolist(), hist_counts=e.hist_counts[j].tolist(),
                frequency=float(e.frequency[j]), promoted=[], suppressed=[],
                status=None if s == 0 else _status(int(diff.exclusive_to[latent]), names)))
        extra: dict[str, Any] = {
            "exclusive to": _status(int(diff.exclusive_to[latent]), names),
            "relative norm": float(diff.relative_norm[latent].detach()),
            "decoder cosine": float(diff.decoder_cosine[latent].detach()),
            **{f"decoder norm {names[s]}": float(norms[latent, s]) for s in range(n_src)},
            "Latent Scaling error ratio": float(diff.beta_ratio[latent, 0].detach()),
            "Latent Scaling reconstruction ratio": float(diff.beta_ratio[latent, 1].detach()),
            "Latent Scaling artefact": "yes" if bool(diff.artefact[latent]) else "no",
            "firing rate": float(diff.firing_rate[latent]),
        }
        pages.append(LatentPage(latent, views, extra=extra))
    base = (f"Crosscoder latents of {' vs '.join(names)}: each column shows the latent's contribution "
            "f·||decoder|| to that source (one code per token, read from both sources). Relative norm "
            f"||d_1||/(||d_0||+||d_1||): 0 = only {names[0]}, 1 = only {names[-1]}; cut {diff.threshold:.3f}.")
    path = write_feature_pages(out_dir, pages, title=f"Crosscoder exclusive latents: {' vs '.join(names)}",
                               note=f"{base} {note}".strip())
    return CrosscoderPages(path, chosen.tolist(), top_rows)
