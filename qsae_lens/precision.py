"""Numeric precisions a model can be loaded at, and what each one means for bitsandbytes.

A :class:`Precision` is the single source of truth for "how were these weights run": it
builds the ``BitsAndBytesConfig`` that transformers needs, chooses the compute dtype by
device (float32 on CPU, where bf16 kernels are 4-15x slower without bf16 instructions;
bfloat16 on CUDA), and describes itself as plain-JSON metadata that travels with every
activation cache, SAE checkpoint and report.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
from typing import Any, Literal

import torch

PrecisionName = Literal["fp32", "fp16", "bf16", "int8", "nf4", "nf4-dq", "fp4"]

_FLOAT_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}
_QUANT_TYPES: dict[str, str] = {"int8": "llm.int8", "nf4": "nf4", "nf4-dq": "nf4", "fp4": "fp4"}
_ALIASES: dict[str, str] = {
    "float32": "fp32",
    "float": "fp32",
    "float16": "fp16",
    "half": "fp16",
    "bfloat16": "bf16",
    "8bit": "int8",
    "llm.int8": "int8",
    "nf4_dq": "nf4-dq",
    "nf4-double-quant": "nf4-dq",
}
PRECISION_NAMES: tuple[str, ...] = tuple(_FLOAT_DTYPES) + tuple(_QUANT_TYPES)

#: Keys under which qsae_lens records, in an SAE's ``cfg.metadata`` (and in activation caches), how
#: the model that produced its activations was run. The single definition: training writes them,
#: compare and hub read them.
PRECISION_METADATA_KEYS: tuple[str, ...] = (
    "precision",
    "quant_type",
    "compute_dtype",
    "double_quant",
    "bitsandbytes_version",
    "model_source",
    "weights_sha256",
)

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"`` (JSON-safe; SAELens configs must hold plain values)."""
    return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def default_compute_dtype(device: str | torch.device) -> torch.dtype:
    """float32 on CPU (no bf16 instructions here: bf16 forwards measured 4-15x slower), bf16 on CUDA."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


@dataclasses.dataclass(frozen=True)
class Precision:
    """One of ``fp32, fp16, bf16, int8, nf4, nf4-dq, fp4``.

    ``nf4-dq`` is NF4 with bitsandbytes' double quantization of the block scales.
    Build one with :func:`parse_precision` (accepts strings and aliases).
    """

    name: PrecisionName

    def __post_init__(self) -> None:
        if self.name not in PRECISION_NAMES:
            raise ValueError(
                f"Unknown precision {self.name!r}. Valid precisions: {', '.join(PRECISION_NAMES)}."
            )

    def __str__(self) -> str:
        return self.name

    @property
    def is_quantized(self) -> bool:
        """True for the bitsandbytes precisions (int8, nf4, nf4-dq, fp4)."""
        return self.name in _QUANT_TYPES

    @property
    def is_4bit(self) -> bool:
        return self.name in ("nf4", "nf4-dq", "fp4")

    @property
    def quant_type(self) -> str | None:
        """``"llm.int8"``, ``"nf4"``, ``"fp4"`` or None for float precisions."""
        return _QUANT_TYPES.get(self.name)

    @property
    def double_quant(self) -> bool:
        return self.name == "nf4-dq"

    def weight_dtype(self) -> torch.dtype:
        """The dtype non-quantized parameters (embeddings, norms, lm_head) are stored in."""
        return _FLOAT_DTYPES.get(self.name, torch.float32)

    def compute_dtype(self, device: str | torch.device = "cpu", override: torch.dtype | None = None) -> torch.dtype:
        """dtype activations flow in: the float dtype itself, or for 4-bit the bnb compute dtype."""
        if self.name in _FLOAT_DTYPES:
            return _FLOAT_DTYPES[self.name]
        if override is not None:
            return override
        return default_compute_dtype(device)

    def bnb_config(self, device: str | torch.device = "cpu", compute_dtype: torch.dtype | None = None) -> Any:
        """The ``transformers.BitsAndBytesConfig`` for this precision, or None for float precisions."""
        if not self.is_quantized:
            return None
        from transformers import BitsAndBytesConfig

        if self.name == "int8":
            return BitsAndBytesConfig(load_in_8bit=True)
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.quant_type,
            bnb_4bit_compute_dtype=self.compute_dtype(device, compute_dtype),
            bnb_4bit_use_double_quant=self.double_quant,
        )

    def metadata(self, device: str | torch.device = "cpu", compute_dtype: torch.dtype | None = None) -> dict[str, Any]:
        """Plain-JSON description: precision, quant_type, compute_dtype, double_quant, bitsandbytes_version."""
        return {
            "precision": self.name,
            "quant_type": self.quant_type,
            "compute_dtype": dtype_name(self.compute_dtype(device, compute_dtype)),
            "double_quant": self.double_quant,
            "bitsandbytes_version": bitsandbytes_version() if self.is_quantized else None,
        }


def parse_precision(value: str | Precision) -> Precision:
    """Parse ``"nf4"``, ``"NF4"``, ``"bfloat16"``, ... into a :class:`Precision`.

    Raises ``ValueError`` listing the valid names for anything else.
    """
    if isinstance(value, Precision):
        return value
    if not isinstance(value, str):
        raise TypeError(f"precision must be a string or Precision, got {type(value).__name__}")
    key = value.strip().lower()
    key = _ALIASES.get(key, key)
    return Precision(key)  # type: ignore[arg-type]  # validated in __post_init__


def bitsandbytes_version() -> str | None:
    """Installed bitsandbytes version, or None when it is not installed."""
    try:
        return importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        return None


def check_precision_runs_on(precision: Precision, device: str | torch.device) -> None:
    """Raise a clear error when ``precision`` cannot run on ``device``, before any loading starts.

    bitsandbytes >= 0.45 runs int8/nf4/fp4 on CPU and CUDA; it does not run on MPS, and fp16 matmuls
    are not supported by every CPU build of torch.
    """
    dev = torch.device(device)
    if precision.is_quantized:
        if bitsandbytes_version() is None:
            raise RuntimeError(
                f"Precision {precision.name!r} needs bitsandbytes, which is not installed. "
                "Install it with `pip install 'bitsandbytes>=0.50'`, or pick fp32/fp16/bf16."
            )
        if dev.type not in ("cpu", "cuda"):
            raise RuntimeError(
                f"Precision {precision.name!r} runs through bitsandbytes, which supports CPU and CUDA "
                f"devices, not {dev.type!r}. Use device='cpu' or 'cuda', or a float precision."
            )
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was requested but CUDA is not available on this machine; use device='cpu'.")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise RuntimeError("device='mps' was requested but MPS is not available on this machine; use device='cpu'.")
