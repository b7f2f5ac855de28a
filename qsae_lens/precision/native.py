"""PyTorch-native quantization libraries, each behind an optional extra: ``quanto-{int8,int4}``,
``torchao-int8wo`` (and ``torchao-int4wo``, ``hqq-{bits}``, registered to say why they do not run here).

Unlike RTN/GGUF/GPTQ/AWQ these keep the library's own quantized layers in the model (quanto's
``QLinear`` with packed int weights, torchao's ``Int8Tensor`` weight subclass), so the forward is
the library's real kernel path. They quantize the same modules as bitsandbytes: the ``nn.Linear``
layers inside the decoder blocks (the model's ``nn.ModuleList``); embeddings and LM head stay float.

Measured on this machine (torch 2.13 CPU, transformers 5.25; docs/precisions.md):

* optimum-quanto 0.2.7: int8 and int4 weight-only run on CPU (``quantize`` + ``freeze``).
* torchao 0.18: ``Int8WeightOnlyConfig`` runs on CPU; ``Int4WeightOnlyConfig`` left the weights
  unquantized on CPU (its int4 layouts need CUDA/XPU kernels), so ``torchao-int4wo`` needs CUDA.
* hqq 0.2.8: transformers 5.25 refuses ``HqqConfig`` ("not available yet"), and ``HQQLinear``'s
  CPU forward raised ``TypeError`` (dequantized weight None) in our probe: ``hqq-*`` is refused.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from qsae_lens.precision.registry import (
    MethodFamily,
    MethodSpec,
    QuantContext,
    decoder_linears,
    library_version,
    register_family,
)


def _require(spec: MethodSpec, module: str) -> None:
    """Import check with the error naming the extra."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise RuntimeError(
            f"Precision {spec.name!r} needs {spec.library}, which is not installed. "
            f"Install it with `pip install 'qsae_lens[{spec.extra}]'`."
        )


class QuantoFamily(MethodFamily):
    """``quanto-int8`` / ``quanto-int4``: optimum-quanto weight-only quantization (CPU and CUDA)."""

    family = "quanto"
    examples = ("quanto-int8", "quanto-int4")

    def parse(self, key: str) -> MethodSpec | None:
        if key not in self.examples:
            return None
        bits = int(key.removeprefix("quanto-int"))
        return MethodSpec(
            name=key, family=self.family, method="quanto", bits=bits, quant_type=f"qint{bits}",
            group_size=None if bits == 8 else 128, symmetric=True, library="optimum-quanto", extra="quanto",
        )

    def check_runs_on(self, spec: MethodSpec, device: torch.device) -> None:
        _require(spec, "optimum.quanto")

    def after_load(self, model: torch.nn.Module, spec: MethodSpec, ctx: QuantContext) -> dict[str, Any]:
        from optimum.quanto import freeze, qint4, qint8, quantize

        blocks = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
        for block_list in blocks:
            quantize(block_list, weights=qint8 if spec.bits == 8 else qint4)
            freeze(block_list)
        return {}


class TorchAOFamily(MethodFamily):
    """``torchao-int8wo`` (CPU and CUDA) and ``torchao-int4wo`` (CUDA only)."""

    family = "torchao"
    examples = ("torchao-int8wo", "torchao-int4wo")

    def parse(self, key: str) -> MethodSpec | None:
        if key not in self.examples:
            return None
        bits = 8 if key == "torchao-int8wo" else 4
        return MethodSpec(
            name=key, family=self.family, method="torchao", bits=bits, quant_type=key.removeprefix("torchao-"),
            group_size=None if bits == 8 else 128, symmetric=True, library="torchao", extra="torchao",
        )

    def check_runs_on(self, spec: MethodSpec, device: torch.device) -> None:
        # the device first: installing torchao would not make int4 run on a CPU
        if spec.bits == 4 and device.type != "cuda":
            raise RuntimeError(
                f"Precision {spec.name!r}: torchao's int4 weight-only layouts need CUDA; on CPU torchao 0.18 "
                "leaves the weights unquantized. Use torchao-int8wo, rtn-w4 or nf4 on CPU."
            )
        _require(spec, "torchao")

    def after_load(self, model: torch.nn.Module, spec: MethodSpec, ctx: QuantContext) -> dict[str, Any]:
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

        targets = {id(m) for m in decoder_linears(model).values()}
        config = Int8WeightOnlyConfig() if spec.bits == 8 else Int4WeightOnlyConfig(group_size=128)
        quantize_(model, config, filter_fn=lambda m, _fqn: id(m) in targets)
        return {}


class HQQFamily(MethodFamily):
    """``hqq-{2,3,4,8}``: registered so the name resolves and says why it does not run here."""

    family = "hqq"
    examples = ("hqq-{2,3,4,8}",)

    def parse(self, key: str) -> MethodSpec | None:
        m = re.match(r"^hqq-(\d+)$", key)
        if m is None:
            return None
        bits = int(m.group(1))
        if bits not in (2, 3, 4, 8):
            raise ValueError(f"Precision {key!r}: HQQ bits must be one of 2, 3, 4, 8.")
        return MethodSpec(
            name=key, family=self.family, method="hqq", bits=bits, quant_type=f"hqq-{bits}", group_size=64,
            symmetric=False, library="hqq", extra="hqq",
        )

    def check_runs_on(self, spec: MethodSpec, device: torch.device) -> None:
        _require(spec, "hqq")
        raise RuntimeError(
            f"Precision {spec.name!r} does not run with the installed stack: transformers "
            f"{library_version('transformers')} refuses HqqConfig ('not available yet') and hqq "
            f"{library_version('hqq')}'s HQQLinear CPU forward fails. Use rtn-w{int(spec.bits or 4)}-g64-asym "
            "(the same grid without HQQ's optimised zero points) instead."
        )


register_family(QuantoFamily())
register_family(TorchAOFamily())
register_family(HQQFamily())
