"""Round-to-nearest (RTN) integer quantization at any width: ``rtn-w{bits}[-g{group}][-asym]``.

The baseline every weight-quantization paper compares against, and the method of the closest study
(Duan 2026: INT8 down to INT4). Per group of ``group`` consecutive weights along the input
dimension of each decoder ``nn.Linear`` (default 128; the last group of a row is shorter when the
width is not a multiple, e.g. 576 = 4 x 128 + 64):

* symmetric (default): ``s = max|w| / (2^(b-1) - 1)``, ``q = clamp(round(w / s), -2^(b-1), 2^(b-1) - 1)``,
  ``w_hat = q * s``;
* asymmetric (``-asym``): ``s = (max w - min w) / (2^b - 1)``, ``z = round(-min w / s)``,
  ``q = clamp(round(w / s) + z, 0, 2^b - 1)``, ``w_hat = (q - z) * s``.

All in float32, ``round`` half to even. The weights are *fake-quantized*: ``w_hat`` is computed once
and the model runs in float32 on it (no integer kernel, activations not quantized): the metadata says
``fake_quant: true``. Written here rather than taken from a library because it is four lines and the
bit-for-bit test needs the formula exact (HQQ/quanto/torchao each add their own twists).
"""

from __future__ import annotations

import re
from typing import NamedTuple

import torch

from qsae_lens.precision.registry import (
    MethodFamily,
    MethodSpec,
    QuantContext,
    fake_quantize_linears,
    register_family,
)

DEFAULT_GROUP_SIZE = 128
MIN_BITS, MAX_BITS = 2, 8
_NAME = re.compile(r"^rtn-w(\d+)(?:-g(\d+))?(?:-(sym|asym))?$")


class GroupQuantized(NamedTuple):
    """Integer codes and per-group scales of one weight matrix (``n_groups = ceil(in / group)``)."""

    q: torch.Tensor
    """Tensor[out, in] int16: the integer codes (signed for symmetric, 0..2^b-1 for asymmetric)."""
    scale: torch.Tensor
    """Tensor[out, n_groups] float32: step size of each group."""
    zero: torch.Tensor | None
    """Tensor[out, n_groups] float32 integer-valued zero points (asymmetric), else None."""
    group_size: int

    def dequantize(self) -> torch.Tensor:
        """Tensor[out, in] float32: ``q * s`` (symmetric) or ``(q - z) * s`` (asymmetric)."""
        cols = self.q.shape[1]
        idx = torch.arange(cols, device=self.q.device) // self.group_size
        q = self.q.float()
        if self.zero is not None:
            q = q - self.zero[:, idx]
        return q * self.scale[:, idx]


def group_params(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and zero point) of each row of ``w``: ``Tensor[..., g]`` -> ``Tensor[..., 1]`` each.

    A group that is all zeros (or constant, asymmetric) gets scale 1 so nothing divides by zero.
    """
    if symmetric:
        s = w.abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 1)
        return torch.where(s == 0, torch.ones_like(s), s), None
    lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    s = (hi - lo) / (2**bits - 1)
    s = torch.where(s == 0, torch.ones_like(s), s)
    return s, torch.round(-lo / s)


def quantize_with(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Integer codes of ``w`` given scales broadcastable to it (the clamp of the formulas above)."""
    if zero is None:
        return torch.clamp(torch.round(w / scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)


def rtn_quantize(w: torch.Tensor, bits: int, group_size: int = DEFAULT_GROUP_SIZE, symmetric: bool = True) -> GroupQuantized:
    """RTN codes and scales of ``w: Tensor[out, in]`` in groups of ``group_size`` along ``in``.

    Memory: two float32 copies of ``w``. Vectorized over all full groups at once, plus one call
    for the shorter tail group.
    """
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"RTN bits must be in {MIN_BITS}..{MAX_BITS}, got {bits}")
    w = w.float()
    out, cols = w.shape
    full = cols // group_size * group_size
    qs, scales, zeros = [], [], []
    for part in (w[:, :full].reshape(out, -1, group_size), w[:, full:].reshape(out, 1, cols - full) if full < cols else None):
        if part is None:
            continue
        s, z = group_params(part, bits, symmetric)
        qs.append(quantize_with(part, s, z, bits).reshape(out, -1))
        scales.append(s.squeeze(-1))
        if z is not None:
            zeros.append(z.squeeze(-1))
    return GroupQuantized(
        q=torch.cat(qs, 1).to(torch.int16),
        scale=torch.cat(scales, 1),
        zero=torch.cat(zeros, 1) if zeros else None,
        group_size=group_size,
    )


def rtn_fake_quantize(w: torch.Tensor, bits: int, group_size: int = DEFAULT_GROUP_SIZE, symmetric: bool = True) -> torch.Tensor:
    """``Tensor[out, in]`` float32 ``w_hat``: what the RTN-quantized layer computes with."""
    return rtn_quantize(w, bits, group_size, symmetric).dequantize()


def rtn_spec(bits: int, group_size: int = DEFAULT_GROUP_SIZE, symmetric: bool = True) -> MethodSpec:
    """The spec of ``rtn-w{bits}[-g{group}][-asym]`` (canonical name omits the defaults)."""
    name = f"rtn-w{bits}" + ("" if group_size == DEFAULT_GROUP_SIZE else f"-g{group_size}") + ("" if symmetric else "-asym")
    return MethodSpec(
        name=name,
        family="rtn",
        method="rtn",
        bits=bits,
        quant_type=f"int{bits}-g{group_size}-{'sym' if symmetric else 'asym'}",
        group_size=group_size,
        symmetric=symmetric,
        fake_quant=True,
    )


class RTNFamily(MethodFamily):
    """``rtn-w{2..8}[-g{N}][-asym]``: fake-quantized round-to-nearest, runs on any device."""

    family = "rtn"
    examples = ("rtn-w{2..8}[-g{N}][-asym]",)

    def parse(self, key: str) -> MethodSpec | None:
        m = _NAME.match(key)
        if m is None:
            return None
        bits, group = int(m.group(1)), int(m.group(2) or DEFAULT_GROUP_SIZE)
        if not MIN_BITS <= bits <= MAX_BITS:
            raise ValueError(f"Precision {key!r}: RTN bits must be {MIN_BITS}..{MAX_BITS}, got {bits}.")
        if group < 1:
            raise ValueError(f"Precision {key!r}: the group size must be a positive integer.")
        return rtn_spec(bits, group, m.group(3) != "asym")

    def after_load(self, model: torch.nn.Module, spec: MethodSpec, ctx: QuantContext) -> dict[str, object]:
        bits, group, sym = int(spec.bits or 0), int(spec.group_size or DEFAULT_GROUP_SIZE), bool(spec.symmetric)
        fake_quantize_linears(model, lambda _n, w: rtn_fake_quantize(w, bits, group, sym), desc=spec.name)
        return {}


register_family(RTNFamily())
