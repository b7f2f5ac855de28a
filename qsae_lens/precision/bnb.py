"""Float precisions (fp32, fp16, bf16) and the bitsandbytes ones (int8, nf4, nf4-dq, fp4), as before the registry.

bitsandbytes quantizes at load time through transformers' ``BitsAndBytesConfig`` and runs its own
kernels: LLM.int8 (which also quantizes activations row-wise, keeping outlier columns in fp16) and
4-bit NF4/FP4 with a 64-weight block scale (``nf4-dq``: the block scales themselves quantized).
"""

from __future__ import annotations

from typing import Any

import torch

from qsae_lens.precision.registry import (
    MethodFamily,
    MethodSpec,
    bitsandbytes_version,
    default_compute_dtype,
    register_family,
)

_FLOAT_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_FLOAT_BITS = {"fp32": 32, "fp16": 16, "bf16": 16}
_QUANT_TYPES: dict[str, str] = {"int8": "llm.int8", "nf4": "nf4", "nf4-dq": "nf4", "fp4": "fp4"}
#: bitsandbytes' 4-bit block size (weights per absmax scale) and LLM.int8's per-row scale.
_BNB_GROUP = {"int8": None, "nf4": 64, "nf4-dq": 64, "fp4": 64}


class FloatFamily(MethodFamily):
    """fp32 / fp16 / bf16: the weights cast, nothing quantized."""

    family = "float"
    examples = tuple(_FLOAT_DTYPES)

    def parse(self, key: str) -> MethodSpec | None:
        if key not in _FLOAT_DTYPES:
            return None
        return MethodSpec(name=key, family=self.family, method="none", bits=_FLOAT_BITS[key], float_dtype=str(_FLOAT_DTYPES[key]).removeprefix("torch."))

    def compute_dtype(self, spec: MethodSpec, device: str | torch.device, override: torch.dtype | None) -> torch.dtype:
        return _FLOAT_DTYPES[spec.name]

    def weight_dtype(self, spec: MethodSpec) -> torch.dtype:
        return _FLOAT_DTYPES[spec.name]


class BitsAndBytesFamily(MethodFamily):
    """int8 (LLM.int8), nf4, nf4-dq, fp4 through bitsandbytes' kernels (CPU and CUDA)."""

    family = "bitsandbytes"
    examples = tuple(_QUANT_TYPES)

    def parse(self, key: str) -> MethodSpec | None:
        if key not in _QUANT_TYPES:
            return None
        return MethodSpec(
            name=key,
            family=self.family,
            method=_QUANT_TYPES[key],
            bits=8 if key == "int8" else 4,
            quant_type=_QUANT_TYPES[key],
            group_size=_BNB_GROUP[key],
            symmetric=True,
            double_quant=key == "nf4-dq",
            library="bitsandbytes",
        )

    def check_runs_on(self, spec: MethodSpec, device: torch.device) -> None:
        if bitsandbytes_version() is None:
            raise RuntimeError(
                f"Precision {spec.name!r} needs bitsandbytes, which is not installed. "
                "Install it with `pip install 'bitsandbytes>=0.50'`, or pick fp32/fp16/bf16."
            )
        if device.type not in ("cpu", "cuda"):
            raise RuntimeError(
                f"Precision {spec.name!r} runs through bitsandbytes, which supports CPU and CUDA "
                f"devices, not {device.type!r}. Use device='cpu' or 'cuda', or a float precision."
            )

    def compute_dtype(self, spec: MethodSpec, device: str | torch.device, override: torch.dtype | None) -> torch.dtype:
        return override if override is not None else default_compute_dtype(device)

    def bnb_config(self, spec: MethodSpec, device: str | torch.device, compute_dtype: torch.dtype | None) -> Any:
        """The ``transformers.BitsAndBytesConfig`` for ``spec``."""
        from transformers import BitsAndBytesConfig

        if spec.name == "int8":
            return BitsAndBytesConfig(load_in_8bit=True)
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=spec.quant_type,
            bnb_4bit_compute_dtype=self.compute_dtype(spec, device, compute_dtype),
            bnb_4bit_use_double_quant=spec.double_quant,
        )

    def hf_load_kwargs(self, spec: MethodSpec, device: str, compute_dtype: torch.dtype | None) -> dict[str, Any]:
        return {
            "quantization_config": self.bnb_config(spec, device, compute_dtype),
            "device_map": device,
            # non-quantized parameters (embeddings, norms) in the compute dtype the kernels use
            "dtype": self.compute_dtype(spec, device, compute_dtype),
        }

    def moves_to_device(self, spec: MethodSpec) -> bool:
        return False


register_family(
    FloatFamily(),
    aliases={"float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"},
)
register_family(
    BitsAndBytesFamily(),
    aliases={"8bit": "int8", "llm.int8": "int8", "nf4_dq": "nf4-dq", "nf4-double-quant": "nf4-dq"},
)
