"""Frozen-SAE feature survival: one SAE encodes the reference and the quantized activations of the same tokens.

Protocol (Duan 2026; ``../shared/reference/methods.md``): the SAE trained on the reference model
(``fp32``) is *frozen* and reads the activations of the same tokens taken from the reference and
from the quantized model. Seed-to-seed training noise plays no part: every difference comes from
the activations. Per latent ``i`` with codes ``a_i(t)`` (reference) and ``b_i(t)`` (quantized):

- ``pearson``: Pearson correlation of ``a_i`` and ``b_i`` over all tokens;
- ``firing_jaccard``: |{a>0} ∩ {b>0}| / |{a>0} ∪ {b>0}|;
- ``firing_precision``: |{a>0} ∩ {b>0}| / |{b>0}| and ``firing_recall``: |{a>0} ∩ {b>0}| / |{a>0}|
  (the quantized firing judged against the reference firing);
- ``magnitude_ratio``: Σ b / Σ a over co-firing tokens (1 = same size);
- ``topk_overlap``: fraction of the reference's top-k tokens that are also among the quantized top-k.

Statuses (defaults in :class:`SurvivalThresholds`; an "alive" latent fires on at least
``min_fires`` tokens):

- ``dead``: alive in neither model; ``born``: alive only in the quantized model;
- ``died``: alive in the reference, and the quantized firing recovers less than ``died_max_recall``
  of the reference firing (it stopped firing, or fires elsewhere);
- ``survived``: alive in the reference, ``pearson >= survived_min_pearson`` and
  ``firing_jaccard >= survived_min_jaccard``;
- ``blurred``: alive in the reference, neither died nor survived (still there, but changed).

Fractions of ``survived``/``blurred``/``died`` are over latents alive in the reference (the
"active features" of Duan 2026); ``born``/``dead`` over all ``d_sae``. Their 95% CIs come from a
bootstrap over ``n_windows`` contiguous token windows (the token stream cut into equal parts):
per-window sufficient statistics are kept (``Tensor[n_windows, d_sae, 10]`` float64), a replicate
reweights the windows by a multinomial draw and classifies again, so the CI is exact for every
metric the statuses use (``topk_overlap`` is not re-drawn: it is a full-data descriptor); the
percentile interval is shifted by the replicates' estimated bias (see ``feature_survival``).

Memory: codes are computed ``block`` rows at a time with ``block * d_sae <= 2**25`` by default
(128 MiB float32 per code block; ~8 such temporaries at peak), plus the per-window statistics
(``n_windows * d_sae * 80`` bytes: 84 MiB at 16 windows x 65,536 latents) and two running top-k
tables (``d_sae * k * 12`` bytes each). 1M tokens x 65k latents fit in ~1.5 GiB.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from qsae_lens._io import atomic_dir, atomic_write_json
from qsae_lens.survival.streaming import RunningTopK

__all__ = [
    "STATUSES",
    "SurvivalThresholds",
    "Fraction",
    "SurvivalReport",
    "feature_survival",
    "transposed_survival",
    "encode_fn",
    "threshold_curve",
]

STATUSES: tuple[str, ...] = ("survived", "blurred", "died", "born", "dead")
"""Every latent gets exactly one of these (see the module docstring)."""

_N_STATS = 10  # sa, sb, saa, sbb, sab, ca, cb, cab, sa_both, sb_both


@dataclass(frozen=True)
class SurvivalThresholds:
    """The documented defaults deciding a latent's status (ours, not Duan's: they published none)."""

    min_fires: int = 5
    """A latent is alive in a model when it fires (code > 0) on at least this many tokens."""
    died_max_recall: float = 0.2
    """Alive in the reference but the quantized firing covers < 20% of its firing tokens: died."""
    survived_min_pearson: float = 0.8
    """Survived needs a Pearson correlation of at least this ..."""
    survived_min_jaccard: float = 0.5
    """... and a firing Jaccard of at least this."""


class Fraction(NamedTuple):
    """A fraction with its bootstrap 95% interval."""

    value: float
    lo: float
    hi: float

    def __repr__(self) -> str:
        return f"{self.value:.3f} [{self.lo:.3f}, {self.hi:.3f}]"


def encode_fn(sae: Any) -> Callable[[Tensor], Tensor]:
    """``x: Tensor[b, d_in] -> codes: Tensor[b, d_sae]`` for a SAELens SAE (``.encode``) or a plain callable."""
    if hasattr(sae, "encode"):
        return sae.encode
    if callable(sae):
        return sae
    raise TypeError(f"expected an SAE with .encode(x) or a callable, got {type(sae).__name__}")


def _d_sae(sae: Any, encode: Callable[[Tensor], Tensor], d_in: int, dtype: torch.dtype,
           device: torch.device) -> int:
    cfg = getattr(sae, "cfg", None)
    if cfg is not None and getattr(cfg, "d_sae", None):
        return int(cfg.d_sae)
    with torch.no_grad():
        return int(encode(torch.zeros(1, d_in, dtype=dtype, device=device)).shape[1])


def _sae_param(sae: Any) -> tuple[torch.dtype, torch.device]:
    if isinstance(sae, torch.nn.Module):
        p = next(sae.parameters(), None)
        if p is not None:
            return p.dtype, p.device
    return torch.float32, torch.device("cpu")


def _metrics(stats: Tensor, n: float) -> dict[str, Tensor]:
    """Per-latent metrics from summed sufficient statistics ``stats: Tensor[d_sae, 10]`` float64 over ``n`` tokens."""
    sa, sb, saa, sbb, sab, ca, cb, cab, sa_both, sb_both = stats.unbind(1)
    cov = sab / n - (sa / n) * (sb / n)
    var_a = (saa / n - (sa / n) ** 2).clamp_min(0)
    var_b = (sbb / n - (sb / n) ** 2).clamp_min(0)
    denom = (var_a * var_b).sqrt()
    nan = torch.full_like(sa, math.nan)
    pearson = torch.where(denom > 0, cov / denom.clamp_min(1e-300), nan).clamp(-1, 1)
    union = ca + cb - cab
    return {
        "pearson": pearson,
        "firing_jaccard": torch.where(union > 0, cab / union.clamp_min(1), nan),
        "firing_precision": torch.where(cb > 0, cab / cb.clamp_min(1), nan),
        "firing_recall": torch.where(ca > 0, cab / ca.clamp_min(1), nan),
        "magnitude_ratio": torch.where(sa_both > 0, sb_both / sa_both.clamp_min(1e-300), nan),
        "count_ref": ca,
        "count_q": cb,
    }


def _classify(m: dict[str, Tensor], thr: SurvivalThresholds) -> Tensor:
    """Status code per latent (index into :data:`STATUSES`) from :func:`_metrics`'s output: Tensor[d_sae] int64."""
    alive_r = m["count_ref"] >= thr.min_fires
    alive_q = m["count_q"] >= thr.min_fires
    died = alive_r & ~(m["firing_recall"].nan_to_num(0.0) >= thr.died_max_recall)
    survived = (alive_r & ~died & (m["pearson"].nan_to_num(-1.0) >= thr.survived_min_pearson)
                & (m["firing_jaccard"].nan_to_num(0.0) >= thr.survived_min_jaccard))
    code = torch.full(alive_r.shape, STATUSES.index("blurred"), dtype=torch.long)
    code[survived] = STATUSES.index("survived")
    code[died] = STATUSES.index("died")
    code[~alive_r & alive_q] = STATUSES.index("born")
    code[~alive_r & ~alive_q] = STATUSES.index("dead")
    return code


def _fractions(code: Tensor) -> Tensor:
    """Tensor[5] float64: survived/blurred/died over reference-alive latents, born/dead over all."""
    counts = torch.bincount(code, minlength=len(STATUSES)).double()
    alive = counts[:3].sum()
    out = counts / max(code.numel(), 1)
    out[:3] = counts[:3] / alive if alive > 0 else math.nan
    return out


def threshold_curve(pearson: Tensor, jaccard: Tensor, alive_ref: Tensor, grid: Sequence[float], *,
                    min_jaccard: float = 0.5) -> list[float]:
    """Survived fraction of reference-alive latents at each Pearson threshold in ``grid`` (Jaccard fixed).

    ``pearson``, ``jaccard``: Tensor[d_sae]; ``alive_ref``: Tensor[d_sae] bool. So that no single
    threshold decides the conclusion, reports show this whole curve.
    """
    n = int(alive_ref.sum())
    if n == 0:
        return [math.nan] * len(grid)
    p = pearson.nan_to_num(-1.0)[alive_ref]
    j = jaccard.nan_to_num(0.0)[alive_ref]
    t = torch.as_tensor(list(grid), dtype=p.dtype)
    ok = (p[None, :] >= t[:, None]) & (j[None, :] >= min_jaccard)
    return (ok.sum(1).double() / n).tolist()


@dataclass
class SurvivalReport:
    """Per-latent survival of one frozen SAE between reference and quantized activations of the same tokens."""

    pearson: Tensor
    """Tensor[d_sae] float64: Pearson r of reference vs quantized codes (NaN where either is constant)."""
    firing_jaccard: Tensor
    """Tensor[d_sae] float64: Jaccard of the firing sets (NaN where neither fires)."""
    firing_precision: Tensor
    """Tensor[d_sae] float64: share of quantized firings that are reference firings."""
    firing_recall: Tensor
    """Tensor[d_sae] float64: share of reference firings the quantized model keeps."""
    magnitude_ratio: Tensor
    """Tensor[d_sae] float64: Σb / Σa over co-firing tokens."""
    topk_overlap: Tensor
    """Tensor[d_sae] float64: overlap of the top-k token sets (NaN where the reference never fires)."""
    freq_ref: Tensor
    """Tensor[d_sae] float64: firing frequency in the reference."""
    freq_q: Tensor
    """Tensor[d_sae] float64: firing frequency in the quantized model."""
    mean_ref: Tensor
    """Tensor[d_sae] float64: mean reference activation over its firing tokens (0 where it never fires)."""
    status: list[str]
    """d_sae strings from :data:`STATUSES`."""
    fractions: dict[str, Fraction]
    """Status -> fraction with bootstrap 95% CI over token windows (see the module docstring)."""
    curve_thresholds: list[float]
    """Pearson thresholds of :attr:`curve`."""
    curve: list[float]
    """Survived fraction (of reference-alive latents) at each Pearson threshold."""
    thresholds: SurvivalThresholds
    n_tokens: int
    n_windows: int
    n_bootstrap: int
    label: str = ""
    """Free text, e.g. ``"fp32 SAE L16 frozen on nf4"``."""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def d_sae(self) -> int:
        return len(self.status)

    def counts(self) -> dict[str, int]:
        """Status -> number of latents."""
        return {s: self.status.count(s) for s in STATUSES}

    def __repr__(self) -> str:
        fr = ", ".join(f"{k}={v!r}" for k, v in self.fractions.items())
        return (f"SurvivalReport({self.label or 'frozen SAE'}: d_sae={self.d_sae}, n_tokens={self.n_tokens}, "
                f"{fr})")

    _TENSORS = ("pearson", "firing_jaccard", "firing_precision", "firing_recall", "magnitude_ratio",
                "topk_overlap", "freq_ref", "freq_q", "mean_ref")

    def to_dict(self, per_latent: bool = False) -> dict[str, Any]:
        """Plain JSON: summary (fractions with CIs, counts, curve, thresholds) and optionally per-latent lists."""
        out: dict[str, Any] = {
            "label": self.label, "d_sae": self.d_sae, "n_tokens": self.n_tokens, "n_windows": self.n_windows,
            "n_bootstrap": self.n_bootstrap, "thresholds": asdict(self.thresholds),
            "fractions": {k: {f: None if x != x else x for f, x in v._asdict().items()}  # NaN -> null (plain JSON)
                          for k, v in self.fractions.items()},
            "counts": self.counts(),
            "curve": {"pearson_threshold": self.curve_thresholds,
                      "survived_fraction": [None if x != x else x for x in self.curve]},
            "extra": self.extra,
        }
        if per_latent:
            out["per_latent"] = {name: [None if math.isnan(x) else x for x in getattr(self, name).tolist()]
                                 for name in self._TENSORS}
            out["per_latent"]["status"] = self.status
        return out

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write ``survival.json`` (summary + statuses) and ``survival.safetensors`` (per-latent tensors), atomically."""
        from safetensors.torch import save_file

        folder = Path(folder)
        with atomic_dir(folder, replace=True) as tmp:
            save_file({n: getattr(self, n).contiguous() for n in self._TENSORS}, str(tmp / "survival.safetensors"))
            atomic_write_json(tmp / "survival.json", {**self.to_dict(), "status": self.status})
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> SurvivalReport:
        """Inverse of :meth:`save`."""
        from safetensors.torch import load_file

        folder = Path(folder)
        meta = json.loads((folder / "survival.json").read_text())
        t = load_file(str(folder / "survival.safetensors"))
        return cls(**{n: t[n] for n in cls._TENSORS}, status=meta["status"],
                   fractions={k: Fraction(**{f: math.nan if x is None else x for f, x in v.items()})
                              for k, v in meta["fractions"].items()},
                   curve_thresholds=meta["curve"]["pearson_threshold"], curve=[math.nan if x is None else x for x in meta["curve"]["survived_fraction"]],
                   thresholds=SurvivalThresholds(**meta["thresholds"]), n_tokens=meta["n_tokens"],
                   n_windows=meta["n_windows"], n_bootstrap=meta["n_bootstrap"], label=meta["label"],
                   extra=meta.get("extra", {}))


@torch.no_grad()
def feature_survival(
    sae: Any,
    acts_ref: Tensor,
    acts_q: Tensor,
    *,
    thresholds: SurvivalThresholds | None = None,
    topk: int = 20,
    n_windows: int = 16,
    n_bootstrap: int = 200,
    block: int | None = None,
    curve_grid: Sequence[float] | None = None,
    seed: int = 0,
    label: str = "",
    progress: bool = False,
) -> SurvivalReport:
    """Survival of every latent of a frozen ``sae`` between ``acts_ref`` and ``acts_q`` (same tokens, same order).

    ``acts_ref``, ``acts_q``: Tensor[n, d_in] (rows aligned: row t of both is the same token).
    Streams ``block`` rows at a time; see the module docstring for the metrics, statuses, CI and memory.
    """
    if acts_ref.shape != acts_q.shape or acts_ref.ndim != 2:
        raise ValueError(f"acts_ref and acts_q must be Tensor[n, d_in] of one shape, got "
                         f"{tuple(acts_ref.shape)} and {tuple(acts_q.shape)}: pass activations of the same tokens")
    n, d_in = acts_ref.shape
    n_windows = max(1, min(int(n_windows), n))
    if n == 0:
        raise ValueError("no activations given (n = 0 rows)")
    thr = thresholds or SurvivalThresholds()
    encode = encode_fn(sae)
    dtype, device = _sae_param(sae)
    d_sae = _d_sae(sae, encode, d_in, dtype, device)
    block = int(block or max(64, 2**25 // d_sae))

    stats = torch.zeros((n_windows, d_sae, _N_STATS), dtype=torch.float64)
    window_n = torch.zeros(n_windows, dtype=torch.float64)
    top_r = RunningTopK(d_sae, topk)
    top_q = RunningTopK(d_sae, topk)
    bounds = [round(w * n / n_windows) for w in range(n_windows + 1)]
    bar = tqdm(total=n, desc=f"survival {label}".strip(), unit="tok", disable=not progress)
    for w in range(n_windows):
        for s in range(bounds[w], bounds[w + 1], block):
            e = min(s + block, bounds[w + 1])
            a = encode(acts_ref[s:e].to(device=device, dtype=dtype)).float().cpu()
            b = encode(acts_q[s:e].to(device=device, dtype=dtype)).float().cpu()
            fa, fb = a > 0, b > 0
            both = fa & fb
            blk = torch.stack([a.sum(0), b.sum(0), (a * a).sum(0), (b * b).sum(0), (a * b).sum(0),
                               fa.sum(0).float(), fb.sum(0).float(), both.sum(0).float(),
                               (a * both).sum(0), (b * both).sum(0)], dim=1)
            stats[w] += blk.double()
            window_n[w] += e - s
            top_r.update(a, s, keep=fa)
            top_q.update(b, s, keep=fb)
            bar.update(e - s)
    bar.close()

    total = stats.sum(0)
    m = _metrics(total, float(n))
    code = _classify(m, thr)
    # bootstrap over windows: multinomial weights, reclassify (a loop over replicates, not latents)
    gen = torch.Generator().manual_seed(seed)
    reps = []
    for _ in range(n_bootstrap):
        wts = torch.multinomial(torch.ones(n_windows), n_windows, replacement=True, generator=gen)
        wts = torch.bincount(wts, minlength=n_windows).double()
        mb = _metrics(torch.einsum("w,wls->ls", wts, stats), float((wts * window_n).sum()))
        reps.append(_fractions(_classify(mb, thr)))
    point = _fractions(code)
    if reps:
        rep = torch.stack(reps)
        # Classifying by thresholds makes the replicate fractions biased: a replicate with duplicated
        # windows has fewer distinct tokens, so rare latents correlate worse and fall below the
        # survival threshold more often (measured on the default sweep: int8 survived 0.996 against a
        # plain percentile interval [0.974, 0.994] that excluded it). So the percentile interval is
        # shifted by the bootstrap's estimate of that bias (mean of the replicates - the estimate;
        # Efron & Tibshirani 1993, ch. 10), then clipped to [0, 1].
        bias = torch.nanmean(rep, dim=0) - point
        lo = (torch.nanquantile(rep, 0.025, dim=0) - bias).clamp(0.0, 1.0)
        hi = (torch.nanquantile(rep, 0.975, dim=0) - bias).clamp(0.0, 1.0)
    else:
        lo = hi = torch.full_like(point, math.nan)
    fractions = {s: Fraction(float(point[i]), float(lo[i]), float(hi[i])) for i, s in enumerate(STATUSES)}

    valid_r = top_r.index >= 0
    hit = (top_r.index[:, :, None] == top_q.index[:, None, :]).any(-1) & valid_r
    overlap = torch.where(valid_r.any(1), hit.sum(1).double() / valid_r.sum(1).clamp_min(1).double(),
                          torch.full((d_sae,), math.nan, dtype=torch.float64))
    grid = list(curve_grid) if curve_grid is not None else [round(0.05 * i, 2) for i in range(21)]
    alive_r = m["count_ref"] >= thr.min_fires
    return SurvivalReport(
        pearson=m["pearson"], firing_jaccard=m["firing_jaccard"], firing_precision=m["firing_precision"],
        firing_recall=m["firing_recall"], magnitude_ratio=m["magnitude_ratio"], topk_overlap=overlap,
        freq_ref=m["count_ref"] / n, freq_q=m["count_q"] / n,
        mean_ref=torch.where(m["count_ref"] > 0, total[:, 0] / m["count_ref"].clamp_min(1), torch.zeros(d_sae, dtype=torch.float64)),
        status=[STATUSES[i] for i in code.tolist()], fractions=fractions,
        curve_thresholds=grid,
        curve=threshold_curve(m["pearson"], m["firing_jaccard"], alive_r, grid, min_jaccard=thr.survived_min_jaccard),
        thresholds=thr, n_tokens=n, n_windows=n_windows, n_bootstrap=n_bootstrap, label=label,
    )


def transposed_survival(sae_q: Any, acts_ref: Tensor, acts_q: Tensor, **kwargs: Any) -> SurvivalReport:
    """The transposed view: the *quantized* model's own SAE frozen on the reference activations.

    Its home activations (``acts_q``) play the reference role, so "died" means a feature of the
    quantized model's dictionary that the full-precision activations do not express.
    """
    return feature_survival(sae_q, acts_q, acts_ref, **kwargs)
