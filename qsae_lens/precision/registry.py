"""The open registry of quantization method families, and the :class:`Precision` that names one.

A *family* (one small module each: ``bnb.py``, ``rtn.py``, ``gguf.py``, ``calibrated.py``,
``native.py``) declares which names it understands (:meth:`MethodFamily.parse`), how a model gets
its weights at that precision (``from_pretrained`` keyword arguments, then an in-place step after
loading), where it runs, and what it records. :func:`parse_precision` asks every registered family
in turn; its error lists every family's names. Like the model adapters, a new family is one file
calling :func:`register_family`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch

#: Keys under which qsae_lens records, in an SAE's ``cfg.metadata`` (and in activation caches), how
#: the model that produced its activations was run. The single definition: training writes them,
#: compare and hub read them. Only ever add keys here (readers elsewhere depend on the first seven).
PRECISION_METADATA_KEYS: tuple[str, ...] = (
    "precision",
    "quant_type",
    "compute_dtype",
    "double_quant",
    "bitsandbytes_version",
    "model_source",
    "weights_sha256",
    "quant_method",
    "bits",
    "group_size",
    "symmetric",
    "fake_quant",
    "quant_library",
    "quant_library_version",
    "calibration",
    "calibration_sha256",
)

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"`` (JSON-safe; SAELens configs must hold plain values)."""
    return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def default_compute_dtype(device: str | torch.device) -> torch.dtype:
    """float32 on CPU (no bf16 instructions here: bf16 forwards measured 4-15x slower), bf16 on CUDA."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def library_version(distribution: str | None) -> str | None:
    """Installed version of a distribution (``"bitsandbytes"``, ``"gguf"``, ...), or None."""
    if distribution is None:
        return None
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def bitsandbytes_version() -> str | None:
    """Installed bitsandbytes version, or None when it is not installed."""
    return library_version("bitsandbytes")


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """Everything a name like ``"rtn-w4-g64-asym"`` resolves to. Plain values only (hashable)."""

    name: str
    """Canonical precision name (``"nf4"``, ``"rtn-w4-g64-asym"``, ``"gguf-q8_0"``)."""
    family: str
    """Registry family: ``float``, ``bitsandbytes``, ``rtn``, ``gguf``, ``gptq``, ``awq``, ``hqq``, ``quanto``, ``torchao``."""
    method: str
    """What was done to the weights: ``"none"``, ``"llm.int8"``, ``"nf4"``, ``"rtn"``, ``"gguf"``, ``"gptq"``, ..."""
    bits: float | None
    """Bits per weight code (32 for fp32, 4 for nf4/rtn-w4/gptq-w4; scales not counted)."""
    quant_type: str | None = None
    """The library's own name for the format (``"nf4"``, ``"llm.int8"``, ``"Q8_0"``), None for floats."""
    group_size: int | None = None
    """Weights per scale along the input dimension (None: per tensor/row or not applicable)."""
    symmetric: bool | None = None
    """Symmetric absmax (True) or asymmetric min-max with a zero point (False)."""
    double_quant: bool = False
    """bitsandbytes double quantization of the block scales (nf4-dq)."""
    fake_quant: bool = False
    """True when the quantized weights are dequantized once and computed with in float (RTN, GGUF, GPTQ, AWQ)."""
    library: str | None = None
    """Distribution whose code quantizes or runs the weights (its version is recorded)."""
    extra: str | None = None
    """The qsae_lens extra that installs ``library`` (named in the error when it is missing)."""
    float_dtype: str | None = None
    """For the float family: ``"float32"``/``"float16"``/``"bfloat16"``."""
    options: tuple[tuple[str, Any], ...] = ()
    """Family-specific settings, as sorted pairs (hashable)."""

    def option(self, key: str, default: Any = None) -> Any:
        """One of :attr:`options` by name."""
        return dict(self.options).get(key, default)


class QuantContext(NamedTuple):
    """What a family's :meth:`MethodFamily.after_load` may need besides the model itself."""

    folder: Path
    """Local Hugging Face folder the weights came from."""
    weights_sha256: str
    """Content hash of the source weights (keys caches of calibrated results)."""
    device: str
    tokenizer: Any
    """The model's tokenizer (calibrated methods tokenize their calibration windows with it)."""


class MethodFamily:
    """One family of precisions. Subclasses override what differs; the defaults describe a float model."""

    family: str = ""
    examples: tuple[str, ...] = ()
    """Names listed in :func:`parse_precision`'s error (patterns allowed, e.g. ``rtn-w{2..8}[-g{N}][-asym]``)."""

    def parse(self, key: str) -> MethodSpec | None:
        """The spec for a lower-cased, alias-resolved name, or None when the name is not this family's."""
        raise NotImplementedError

    def check_runs_on(self, spec: MethodSpec, device: torch.device) -> None:
        """Raise ``RuntimeError`` (what is missing, what to do) when ``spec`` cannot run on ``device``."""

    def compute_dtype(self, spec: MethodSpec, device: str | torch.device, override: torch.dtype | None) -> torch.dtype:
        """dtype activations flow in. Fake-quantized weights compute in float32 unless overridden, so
        the dequantized values are used exactly as computed."""
        return override if override is not None else torch.float32

    def weight_dtype(self, spec: MethodSpec) -> torch.dtype:
        """dtype of the parameters that stay float (embeddings, norms, LM head)."""
        return torch.float32

    def hf_load_kwargs(self, spec: MethodSpec, device: str, compute_dtype: torch.dtype | None) -> dict[str, Any]:
        """Keyword arguments for ``AutoModelForCausalLM.from_pretrained``."""
        return {"dtype": self.weight_dtype(spec)}

    def moves_to_device(self, spec: MethodSpec) -> bool:
        """True when the loader should ``.to(device)`` after loading (False when ``device_map`` placed it)."""
        return True

    def after_load(self, model: torch.nn.Module, spec: MethodSpec, ctx: QuantContext) -> dict[str, Any]:
        """Quantize the loaded float model in place (if this family works that way); returns extra metadata."""
        return {}


_FAMILIES: list[MethodFamily] = []
_ALIASES: dict[str, str] = {}


def register_family(family: MethodFamily, aliases: dict[str, str] | None = None) -> MethodFamily:
    """Add a family to the registry (later registrations are asked after earlier ones)."""
    if any(f.family == family.family for f in _FAMILIES):
        raise ValueError(f"a precision family named {family.family!r} is already registered")
    _FAMILIES.append(family)
    _ALIASES.update(aliases or {})
    return family


def families() -> tuple[MethodFamily, ...]:
    """Every registered family, in registration order."""
    return tuple(_FAMILIES)


def family_of(spec: MethodSpec) -> MethodFamily:
    """The registered family that produced ``spec``."""
    for fam in _FAMILIES:
        if fam.family == spec.family:
            return fam
    raise KeyError(spec.family)


def registered_names() -> tuple[str, ...]:
    """Every name/pattern the registered families accept (what the error lists)."""
    return tuple(name for fam in _FAMILIES for name in fam.examples)


def resolve(value: str) -> MethodSpec:
    """Name -> spec through every family; ``ValueError`` listing the registered names otherwise."""
    key = value.strip().lower()
    key = _ALIASES.get(key, key)
    for fam in _FAMILIES:
        spec = fam.parse(key)
        if spec is not None:
            return spec
    raise ValueError(f"Unknown precision {value!r}. Valid precisions: {', '.join(registered_names())}.")


@dataclasses.dataclass(frozen=True)
class Precision:
    """A precision a model can be loaded at, named as on the command line (``nf4``, ``rtn-w4``, ``gguf-q8_0``).

    Built with :func:`parse_precision` (accepts aliases and any case). ``spec`` holds what the
    name resolves to; the properties below read it. Equality and hashing go by the canonical name.
    """

    name: str
    spec: MethodSpec = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        spec = resolve(self.name)
        object.__setattr__(self, "name", spec.name)
        object.__setattr__(self, "spec", spec)

    def __str__(self) -> str:
        return self.name

    @property
    def family(self) -> MethodFamily:
        """The registered family that knows how to load this precision."""
        return family_of(self.spec)

    @property
    def is_quantized(self) -> bool:
        """True for every precision that changes the weights beyond a float cast."""
        return self.spec.family != "float"

    @property
    def is_bnb(self) -> bool:
        """True for the bitsandbytes precisions (int8, nf4, nf4-dq, fp4)."""
        return self.spec.family == "bitsandbytes"

    @property
    def is_4bit(self) -> bool:
        """True for 4-bit weight codes (nf4, fp4, rtn-w4, gptq-w4, ...)."""
        return self.spec.bits == 4

    @property
    def bits(self) -> float | None:
        """Bits per weight code (32/16 for floats)."""
        return self.spec.bits

    @property
    def quant_type(self) -> str | None:
        """``"llm.int8"``, ``"nf4"``, ``"fp4"``, ``"Q8_0"``, ``"rtn"``..., or None for float precisions."""
        return self.spec.quant_type

    @property
    def double_quant(self) -> bool:
        return self.spec.double_quant

    def weight_dtype(self) -> torch.dtype:
        """The dtype non-quantized parameters (embeddings, norms, lm_head) are stored in."""
        return self.family.weight_dtype(self.spec)

    def compute_dtype(self, device: str | torch.device = "cpu", override: torch.dtype | None = None) -> torch.dtype:
        """dtype activations flow in: the float dtype itself, the bnb compute dtype, or float32 for fake quant."""
        return self.family.compute_dtype(self.spec, device, override)

    def bnb_config(self, device: str | torch.device = "cpu", compute_dtype: torch.dtype | None = None) -> Any:
        """The ``transformers.BitsAndBytesConfig`` for this precision, or None when it is not bitsandbytes."""
        if not self.is_bnb:
            return None
        return self.family.bnb_config(self.spec, device, compute_dtype)  # type: ignore[attr-defined]

    def metadata(self, device: str | torch.device = "cpu", compute_dtype: torch.dtype | None = None) -> dict[str, Any]:
        """Plain-JSON description under :data:`PRECISION_METADATA_KEYS` (source/hash/calibration are
        filled in by the loader)."""
        s = self.spec
        lib_version = library_version(s.library)
        return {
            "precision": s.name,
            "quant_type": s.quant_type,
            "compute_dtype": dtype_name(self.compute_dtype(device, compute_dtype)),
            "double_quant": s.double_quant,
            "bitsandbytes_version": bitsandbytes_version() if self.is_bnb else None,
            "quant_method": s.method,
            "bits": s.bits,
            "group_size": s.group_size,
            "symmetric": s.symmetric,
            "fake_quant": s.fake_quant,
            "quant_library": s.library,
            "quant_library_version": lib_version,
            "calibration": None,
            "calibration_sha256": None,
        }


def parse_precision(value: str | Precision) -> Precision:
    """Parse ``"nf4"``, ``"NF4"``, ``"bfloat16"``, ``"rtn-w3-g64-asym"``, ``"gguf-q8_0"``... into a :class:`Precision`.

    Raises ``ValueError`` listing every registered name for anything else.
    """
    if isinstance(value, Precision):
        return value
    if not isinstance(value, str):
        raise TypeError(f"precision must be a string or Precision, got {type(value).__name__}")
    return Precision(value)


def check_precision_runs_on(precision: Precision, device: str | torch.device) -> None:
    """Raise a clear error when ``precision`` cannot run on ``device``, before any loading starts."""
    dev = torch.device(device)
    precision.family.check_runs_on(precision.spec, dev)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was requested but CUDA is not available on this machine; use device='cpu'.")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise RuntimeError("device='mps' was requested but MPS is not available on this machine; use device='cpu'.")


def decoder_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """Every ``nn.Linear`` inside the decoder blocks (what bitsandbytes quantizes), by module name.

    The blocks are the model's ``nn.ModuleList`` (``model.layers`` for Llama/Qwen2/Gemma 3);
    embeddings and the LM head sit outside it and stay float, as with bitsandbytes' default skips.
    """
    out: dict[str, torch.nn.Linear] = {}
    for list_name, mod_list in model.named_modules():
        if not isinstance(mod_list, torch.nn.ModuleList):
            continue
        for name, module in mod_list.named_modules():
            if isinstance(module, torch.nn.Linear):
                out[f"{list_name}.{name}"] = module
    return out


def fake_quantize_linears(
    model: torch.nn.Module, weight_fn: Any, desc: str = "quantizing"
) -> dict[str, torch.nn.Linear]:
    """Replace every decoder ``nn.Linear`` weight ``Tensor[out, in]`` by ``weight_fn(name, float32 weight)``.

    The result is cast back to the layer's dtype (float32 for the fake-quantized families, so the
    dequantized values are kept exactly). Returns the layers touched.
    """
    from tqdm.auto import tqdm

    linears = decoder_linears(model)
    with torch.no_grad(), single_thread():
        for name, layer in tqdm(linears.items(), desc=desc, leave=False, disable=len(linears) < 50):
            w_hat = weight_fn(name, layer.weight.detach().float())
            layer.weight.data.copy_(w_hat.to(layer.weight.dtype))
    return linears


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run small element-wise tensor work on one intra-op thread, then restore the setting.

    Measured on the 2-core test machine under load: RTN of one ``[1536, 576]`` weight took 0.33 s
    with 2 OpenMP threads (each of its ~15 tiny parallel regions waits for a descheduled worker)
    against ~10 ms with one; the whole model's 210 layers went from ~75 s to ~2 s.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
