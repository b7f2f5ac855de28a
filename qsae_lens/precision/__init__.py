"""Numeric precisions a model can be loaded at: an open registry of quantization method families.

* ``bnb.py``: fp32 / fp16 / bf16, and bitsandbytes int8 / nf4 / nf4-dq / fp4 (real kernels);
* ``rtn.py``: round-to-nearest ``rtn-w{2..8}[-g{N}][-asym]`` (fake-quantized weights);
* ``gguf.py``: GGUF block formats ``gguf-q8_0``, ``gguf-q4_0``, ... through the ``gguf`` package;
* ``calibrated.py``: GPTQ and AWQ (``gptq-w4``, ``awq-w4``) on calibration windows from the corpus;
* ``native.py``: HQQ, optimum-quanto and torchao where their CPU paths run (optional extras).

A :class:`Precision` is the single source of truth for "how were these weights run": it knows its
family (how to load), its compute dtype, and describes itself as plain-JSON metadata under
:data:`PRECISION_METADATA_KEYS` that travels with every activation cache, SAE checkpoint and report.
See docs/precisions.md for every method's measured cost on the default model.
"""

from __future__ import annotations

# Registration order is the order parse_precision asks (and lists) the families in.
from qsae_lens.precision import bnb as _bnb  # noqa: E402,F401  (registers float + bitsandbytes)
from qsae_lens.precision import calibrated as _calibrated  # noqa: E402,F401
from qsae_lens.precision import gguf as _gguf  # noqa: E402,F401
from qsae_lens.precision import native as _native  # noqa: E402,F401
from qsae_lens.precision import rtn as _rtn  # noqa: E402,F401
from qsae_lens.precision.registry import (
    PRECISION_METADATA_KEYS,
    MethodFamily,
    MethodSpec,
    Precision,
    QuantContext,
    bitsandbytes_version,
    check_precision_runs_on,
    decoder_linears,
    default_compute_dtype,
    dtype_name,
    families,
    family_of,
    library_version,
    parse_precision,
    register_family,
    registered_names,
)

#: The fixed names of the float and bitsandbytes precisions (the registry accepts many more).
PRECISION_NAMES: tuple[str, ...] = ("fp32", "fp16", "bf16", "int8", "nf4", "nf4-dq", "fp4")
PrecisionName = str

__all__ = [
    "PRECISION_METADATA_KEYS",
    "PRECISION_NAMES",
    "MethodFamily",
    "MethodSpec",
    "Precision",
    "PrecisionName",
    "QuantContext",
    "bitsandbytes_version",
    "check_precision_runs_on",
    "decoder_linears",
    "default_compute_dtype",
    "dtype_name",
    "families",
    "family_of",
    "library_version",
    "parse_precision",
    "register_family",
    "registered_names",
]
