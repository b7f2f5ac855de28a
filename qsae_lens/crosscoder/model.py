"""The crosscoder: one sparse dictionary that reads and reconstructs S sources at the same tokens.

A crosscoder (Lindsey et al. 2024) encodes the concatenated activations of S sources (here: the
baseline model and a quantized model at one hook, same tokens) into one latent vector and decodes it
with one decoder per source, so every latent ``i`` has a decoder direction per source
``W_dec[i, s]``. The norms of those directions say which sources use the latent
(:mod:`qsae_lens.crosscoder.diff`).

Written by hand because neither SAELens (6.54) nor sparsify has a crosscoder, and the research code
(ckkissane/crosscoder-model-diff-replication, science-of-finetuning/dictionary_learning) pins old
nnsight/torch stacks. The habits follow those codes: BatchTopK selection on decoder-norm-weighted
activations with a threshold at inference, encoder initialised as the decoder's transpose.

Units: the module works internally in *normalised* units, each source divided by its mean training
norm (``input_scale[s]``), so both sources weigh the same in the loss whatever their scale. The
public ``encode``/``decode``/``forward`` take and return activations in the sources' own units.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qsae_lens._io import atomic_dir, atomic_write_json

WEIGHTS_FILENAME = "crosscoder.safetensors"
CFG_FILENAME = "cfg.json"
Sparsity = Literal["batchtopk", "l1"]


@dataclass
class CrossCoderConfig:
    """Shape and sparsity rule of a crosscoder (saved as ``cfg.json``)."""

    n_sources: int
    d_in: int
    d_sae: int
    k: int = 32
    """BatchTopK: active latents per token on average (``k * batch`` picked per batch)."""
    sparsity: Sparsity = "batchtopk"
    """``"batchtopk"`` (Minder et al. 2025's recommendation) or ``"l1"`` (Lindsey et al. 2024:
    penalty ``l1_coefficient * sum_i f_i * sum_s ||W_dec[i, s]||``)."""
    l1_coefficient: float = 1.0
    init_seed: int = 0
    source_names: list[str] = field(default_factory=list)
    """Human names of the sources, e.g. ``["fp32", "nf4"]`` (source 0 is the reference)."""
    metadata: dict[str, object] = field(default_factory=dict)
    """Plain-JSON provenance (hook, model, caches, precision metadata...)."""

    def __post_init__(self) -> None:
        if self.n_sources < 1 or self.d_in < 1 or self.d_sae < 1:
            raise ValueError(f"n_sources, d_in and d_sae must be positive, got {self.n_sources}, {self.d_in}, {self.d_sae}")
        if self.sparsity not in ("batchtopk", "l1"):
            raise ValueError(f"sparsity must be 'batchtopk' or 'l1', got {self.sparsity!r}")
        if self.sparsity == "batchtopk" and not 0 < self.k <= self.d_sae:
            raise ValueError(f"k must be in [1, d_sae={self.d_sae}], got {self.k}")
        if self.source_names and len(self.source_names) != self.n_sources:
            raise ValueError(f"source_names has {len(self.source_names)} names for {self.n_sources} sources")
        if not self.source_names:
            self.source_names = [f"source{s}" for s in range(self.n_sources)]


class CrossCoder(nn.Module):
    """S-source crosscoder.

    Parameters (normalised units):
        W_enc: Tensor[n_sources, d_in, d_sae], b_enc: Tensor[d_sae],
        W_dec: Tensor[d_sae, n_sources, d_in], b_dec: Tensor[n_sources, d_in].
    Buffers:
        input_scale: Tensor[n_sources], each source's mean training norm (raw = normalised * scale).
        threshold: Tensor[] , BatchTopK's inference threshold on ``pre_act * decoder_norm_sum``.
    """

    def __init__(self, cfg: CrossCoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        s, d, m = cfg.n_sources, cfg.d_in, cfg.d_sae
        gen = torch.Generator().manual_seed(cfg.init_seed)
        # each latent starts with a random unit direction per source, scaled so that sum over
        # sources of the norms is 1 (the L1 penalty then starts at the same strength for every S)
        w_dec = torch.randn(m, s, d, generator=gen, dtype=torch.float64)
        w_dec = w_dec / w_dec.norm(dim=-1, keepdim=True) / s
        self.W_dec = nn.Parameter(w_dec.float())
        self.W_enc = nn.Parameter(w_dec.permute(1, 2, 0).float().contiguous() * s)
        self.b_enc = nn.Parameter(torch.zeros(m))
        self.b_dec = nn.Parameter(torch.zeros(s, d))
        self.register_buffer("input_scale", torch.ones(s))
        self.register_buffer("threshold", torch.tensor(0.0))

    # ------------------------------------------------------------------ units
    def _check(self, x: Tensor) -> None:
        if x.ndim != 3 or x.shape[1:] != (self.cfg.n_sources, self.cfg.d_in):
            raise ValueError(f"expected activations Tensor[n, {self.cfg.n_sources}, {self.cfg.d_in}] "
                             f"(n tokens, sources, d_in), got shape {tuple(x.shape)}")

    def normalise(self, x: Tensor) -> Tensor:
        """Tensor[n, S, d] raw -> normalised units (each source divided by its mean training norm)."""
        return x / self.input_scale[:, None]

    def decoder_norms(self) -> Tensor:
        """Tensor[d_sae, S]: norm of each latent's decoder direction per source, in *raw* units."""
        return self.W_dec.norm(dim=-1) * self.input_scale

    # ------------------------------------------------------------------ encode / decode
    def pre_acts(self, xn: Tensor) -> Tensor:
        """Tensor[n, d_sae]: ReLU encoder output from normalised inputs Tensor[n, S, d]."""
        # one (n, S·d) @ (S·d, d_sae) matmul: W_enc is contiguous, so the reshape is free
        s, d, m = self.W_enc.shape
        return torch.relu((xn - self.b_dec).reshape(-1, s * d) @ self.W_enc.reshape(s * d, m) + self.b_enc)

    def selection_scores(self, pre: Tensor) -> Tensor:
        """Tensor[n, d_sae]: pre-activations weighted by the sum over sources of decoder norms (what
        BatchTopK ranks and the inference threshold cuts: invariant to moving scale into the decoder)."""
        return pre * self.W_dec.norm(dim=-1).sum(-1)

    def encode(self, x: Tensor) -> Tensor:
        """Tensor[n, d_sae] latent activations of raw Tensor[n, S, d] inputs (inference rule:
        BatchTopK keeps latents whose score exceeds the learned threshold; L1 keeps the ReLU)."""
        self._check(x)
        pre = self.pre_acts(self.normalise(x))
        if self.cfg.sparsity == "batchtopk":
            pre = pre * (self.selection_scores(pre) > self.threshold)
        return pre

    def decode(self, f: Tensor, source: int | None = None) -> Tensor:
        """Reconstruction in raw units: Tensor[n, S, d] for all sources, or Tensor[n, d] for ``source``."""
        if source is None:
            out = torch.einsum("nm,msd->nsd", f, self.W_dec) + self.b_dec
            return out * self.input_scale[:, None]
        return (f @ self.W_dec[:, source] + self.b_dec[source]) * self.input_scale[source]

    def forward(self, x: Tensor) -> Tensor:
        """Raw Tensor[n, S, d] -> reconstruction Tensor[n, S, d] (inference rule)."""
        return self.decode(self.encode(x))

    def batch_topk(self, pre: Tensor, k: int | None = None) -> tuple[Tensor, Tensor]:
        """Training rule: keep the ``k * n`` largest scores over the whole batch.

        Returns (Tensor[n, d_sae] sparse activations, Tensor[] the smallest kept score, which
        feeds the inference threshold)."""
        k = self.cfg.k if k is None else k
        scores = self.selection_scores(pre).flatten()
        n_keep = min(k * pre.shape[0], scores.numel())
        top = torch.topk(scores, n_keep, sorted=False)
        mask = torch.zeros_like(scores, dtype=torch.bool)
        mask[top.indices] = True
        kept = top.values
        min_kept = kept[kept > 0].min() if bool((kept > 0).any()) else kept.new_tensor(0.0)
        return pre * mask.view_as(pre), min_kept.detach()

    def batch_topk_sparse(self, pre: Tensor, k: int | None = None) -> tuple[SparseCodes, Tensor]:
        """Training rule of :meth:`batch_topk`, returned sparse: the ``k * n`` kept activations as
        :class:`SparseCodes` (token-major order, values still attached to ``pre``'s graph) and the
        smallest kept positive score (Tensor[]). Kept entries whose ReLU output is 0 are dropped
        (they contribute nothing). Memory: the flat top-``k·n`` indices, no dense mask."""
        k = self.cfg.k if k is None else k
        n, m = pre.shape
        scores = self.selection_scores(pre).flatten()
        n_keep = min(k * n, scores.numel())
        top = torch.topk(scores.detach(), n_keep, sorted=False)
        keep = top.values > 0
        flat = torch.sort(top.indices[keep]).values  # token-major: what embedding_bag's offsets need
        min_kept = top.values[keep].min() if bool(keep.any()) else top.values.new_tensor(0.0)
        tokens = torch.div(flat, m, rounding_mode="floor")
        codes = SparseCodes(values=pre.flatten()[flat], latents=flat - tokens * m,
                            offsets=_offsets(tokens, n), n_tokens=n)
        return codes, min_kept.detach()

    def decode_sparse(self, codes: SparseCodes) -> Tensor:
        """Σ_i f_i · W_dec[i] over the kept latents only, no ``b_dec``: Tensor[n, S, d] (normalised units).

        One ``embedding_bag`` over ``W_dec`` viewed as Tensor[d_sae, S·d] gathers the active rows
        of each token's bag: O(nnz·S·d) instead of the dense O(n·d_sae·S·d) matmul, and its backward
        scatters into the active rows only. The fast twin of :meth:`decode_dense_reference`
        (tests check they agree in values and gradients)."""
        s, d = self.cfg.n_sources, self.cfg.d_in
        return decode_bags(codes, self.W_dec.reshape(self.cfg.d_sae, s * d)).reshape(-1, s, d)

    def decode_dense_reference(self, codes: SparseCodes) -> Tensor:
        """Reference twin of :meth:`decode_sparse`: scatter the codes into Tensor[n, d_sae] and
        decode with the dense einsum. Tensor[n, S, d], normalised units, no ``b_dec``."""
        return torch.einsum("nm,msd->nsd", codes.to_dense(self.cfg.d_sae), self.W_dec)

    # ------------------------------------------------------------------ save / load
    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Save as ``crosscoder.safetensors`` + ``cfg.json`` into ``folder``, atomically (whole folder)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        with atomic_dir(folder, replace=True) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, tmp / WEIGHTS_FILENAME)
            atomic_write_json(tmp / CFG_FILENAME, asdict(self.cfg))
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike[str], device: str = "cpu") -> CrossCoder:
        """Load a crosscoder saved by :meth:`save` (safetensors only; no pickle)."""
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / CFG_FILENAME).exists() or not (folder / WEIGHTS_FILENAME).exists():
            raise FileNotFoundError(f"{folder} is not a crosscoder folder (needs {CFG_FILENAME} and {WEIGHTS_FILENAME}); "
                                    "train one with qsae_lens.crosscoder.train_crosscoder or `qsae crosscode`.")
        cfg = CrossCoderConfig(**json.loads((folder / CFG_FILENAME).read_text()))
        model = cls(cfg)
        model.load_state_dict(load_file(folder / WEIGHTS_FILENAME, device=device))
        return model.to(device).eval()

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"sources={c.source_names}, d_in={c.d_in}, d_sae={c.d_sae}, sparsity={c.sparsity}, "
                + (f"k={c.k}" if c.sparsity == "batchtopk" else f"l1_coefficient={c.l1_coefficient}"))


class SparseCodes(NamedTuple):
    """Sparse latent activations of ``n_tokens`` tokens, one variable-size bag per token (the
    layout ``torch.nn.functional.embedding_bag`` reads)."""

    values: Tensor
    """Tensor[nnz]: activations, token-major (all of token 0's, then token 1's, ...)."""
    latents: Tensor
    """Tensor[nnz] long: the latent index of each value."""
    offsets: Tensor
    """Tensor[n_tokens] long: where each token's bag starts in ``values`` (empty bags allowed)."""
    n_tokens: int
    """Number of tokens (bags)."""

    def tokens(self) -> Tensor:
        """Tensor[nnz] long: the token index of each value."""
        counts = torch.diff(self.offsets, append=self.offsets.new_tensor([self.values.numel()]))
        return torch.repeat_interleave(torch.arange(self.n_tokens, device=self.values.device), counts)

    def to_dense(self, d_sae: int) -> Tensor:
        """Tensor[n_tokens, d_sae] with the values scattered in (differentiable in ``values``)."""
        flat = self.tokens() * d_sae + self.latents
        out = self.values.new_zeros(self.n_tokens * d_sae).index_put((flat,), self.values, accumulate=True)
        return out.view(self.n_tokens, d_sae)

    @classmethod
    def from_topk(cls, values: Tensor, indices: Tensor) -> SparseCodes:
        """Codes from a fixed-size top-k: values, indices Tensor[n, k] (e.g. the aux-k selection)."""
        n, k = values.shape
        return cls(values.reshape(-1), indices.reshape(-1), torch.arange(n, device=values.device) * k, n)


def _offsets(tokens: Tensor, n: int) -> Tensor:
    """Tensor[n] start of each token's bag, from the sorted Tensor[nnz] token index of each entry."""
    counts = torch.bincount(tokens, minlength=n)
    return torch.cumsum(counts, 0) - counts


def decode_bags(codes: SparseCodes, weight: Tensor) -> Tensor:
    """Tensor[n_tokens, width] = Σ over each token's bag of ``value · weight[latent]``; weight
    Tensor[d_sae, width].

    The variable-bag form of ``OpenAITopKTrainingSAE.decode_sparse`` (which decodes a fixed k per
    token from its own ``W_dec``; BatchTopK gives each token a different count, so the bags need
    offsets): the same ``embedding_bag`` with ``per_sample_weights``, gradients to both ``weight``
    and ``values``.
    """
    return F.embedding_bag(codes.latents, weight, codes.offsets, mode="sum",
                           per_sample_weights=codes.values.to(weight.dtype))


def stack_sources(sources: list[Tensor] | tuple[Tensor, ...]) -> Tensor:
    """Tensor[n, S, d] from S aligned Tensor[n, d] (same tokens, same order), checked."""
    if len(sources) < 1:
        raise ValueError("need at least one source Tensor[n, d]")
    shapes = {tuple(s.shape) for s in sources}
    if len(shapes) != 1 or sources[0].ndim != 2:
        raise ValueError(f"sources must be aligned Tensor[n, d] of one shape (same tokens in the same order), got {sorted(shapes)}")
    return torch.stack(list(sources), dim=1)
