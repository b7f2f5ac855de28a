"""GGUF block formats as llama.cpp stores them: ``gguf-q8_0``, ``gguf-q5_1``, ``gguf-q4_0``, ...

Each decoder ``nn.Linear`` weight ``Tensor[out, in]`` goes through the ``gguf`` package's own
``quants.quantize`` (the reference NumPy port of ggml's quantizers; blocks of 32 along ``in`` with
fp16 scales) and back through ``quants.dequantize``, so the model computes with exactly the values
a GGUF file of that type holds. What this does *not* model: llama.cpp's CPU kernels also quantize
the activations (to Q8_0/Q8_K) before the integer dot product, so a real llama.cpp run differs
slightly more from fp32 than these fake-quantized weights do.

Types: whatever the installed ``gguf`` can quantize. gguf 0.19 implements Q8_0, Q5_0, Q5_1, Q4_0,
Q4_1 and MXFP4, and can *dequantize* but not quantize the k-quants (Q4_K, Q6_K, ...) and i-quants:
``gguf-q4_k`` is refused with that reason (llama.cpp's C quantizer would be needed).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from qsae_lens.precision.registry import (
    MethodFamily,
    MethodSpec,
    QuantContext,
    fake_quantize_linears,
    register_family,
)

#: Bits per weight code, and per weight including the block scales, of the types offered.
_TYPES: dict[str, tuple[int, float]] = {
    "q8_0": (8, 8.5),
    "q5_1": (5, 6.0),
    "q5_0": (5, 5.5),
    "q4_1": (4, 5.0),
    "q4_0": (4, 4.5),
    "mxfp4": (4, 4.25),
}
_KQUANTS = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q8_k")


@functools.cache
def gguf_can_quantize(type_name: str) -> bool:
    """True when the installed ``gguf`` package implements quantization to ``type_name`` (probed once)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    qtype = GGMLQuantizationType[type_name.upper()]
    try:
        quantize(np.zeros((1, 256), dtype=np.float32), qtype)
    except NotImplementedError:
        return False
    return True


def gguf_fake_quantize(w: torch.Tensor, type_name: str) -> torch.Tensor:
    """``Tensor[out, in]`` float32: ``gguf.quants.dequantize(gguf.quants.quantize(w, type), type)``.

    ``in`` must be a multiple of the type's block size (32 for every type offered).
    """
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    qtype = GGMLQuantizationType[type_name.upper()]
    data = quantize(w.detach().cpu().float().numpy(), qtype)
    return torch.from_numpy(np.ascontiguousarray(dequantize(data, qtype), dtype=np.float32)).to(w.device)


class GGUFFamily(MethodFamily):
    """``gguf-{type}``: fake-quantized GGUF block formats through the ``gguf`` package."""

    family = "gguf"
    examples = tuple(f"gguf-{t}" for t in _TYPES)

    def parse(self, key: str) -> MethodSpec | None:
        if not key.startswith("gguf-"):
            return None
        t = key.removeprefix("gguf-")
        if t in _KQUANTS or (t not in _TYPES and t.startswith("iq")):
            raise ValueError(
                f"Precision {key!r}: the installed gguf package can read {t.upper()} but not quantize to it "
                f"(that needs llama.cpp's C quantizer). Use one of: {', '.join(self.examples)}."
            )
        if t not in _TYPES:
            raise ValueError(f"Unknown GGUF type in {key!r}. Valid: {', '.join(self.examples)}.")
        bits, bpw = _TYPES[t]
        return MethodSpec(
            name=key,
            family=self.family,
            method="gguf",
            bits=bits,
            quant_type=t.upper(),
            group_size=32,
            symmetric=t in ("q8_0", "q5_0", "q4_0", "mxfp4"),
            fake_quant=True,
            library="gguf",
            options=(("bits_per_weight", bpw),),
        )

    def check_runs_on(self, spec: MethodSpec, device: torch.device) -> None:
        if not gguf_can_quantize(spec.quant_type or ""):
            raise RuntimeError(f"The installed gguf package cannot quantize to {spec.quant_type}; upgrade gguf.")

    def after_load(self, model: torch.nn.Module, spec: MethodSpec, ctx: QuantContext) -> dict[str, Any]:
        t = spec.quant_type or ""
        fake_quantize_linears(model, lambda _n, w: gguf_fake_quantize(w, t), desc=spec.name)
        return {}


register_family(GGUFFamily())
