"""load_model: a hub id, a local HF folder or a GGUF file -> HookedQuantizedLM at any precision.

Every source becomes a local folder with ``config.json`` + safetensors first (hub ids through
``huggingface_hub.snapshot_download``, GGUF files through a cached dequantized conversion), so
every precision takes the same ``AutoModelForCausalLM.from_pretrained`` path: with a real
``BitsAndBytesConfig`` for bitsandbytes, or in float32 followed by the precision family's own
quantization of the decoder ``nn.Linear`` weights (see :mod:`qsae_lens.precision`). Validation (precision name, device, path, GGUF integrity, architecture)
happens before any weights are loaded.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from qsae_lens._io import atomic_write_json
from qsae_lens._io import file_sha256 as sha256_file
from qsae_lens.assets import cache_dir, gguf_to_hf_folder
from qsae_lens.models.architectures import adapter_for
from qsae_lens.precision import Precision, QuantContext, check_precision_runs_on, parse_precision

_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "tokenizer*"]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _looks_like_path(name: str) -> bool:
    return (
        name.startswith(("/", ".", "~"))
        or name.count("/") > 1
        or os.sep != "/" and os.sep in name
        or name.endswith((".gguf", ".safetensors", ".json"))
    )


def check_gguf(path: Path) -> None:
    """Raise a clear ``ValueError`` when a GGUF file is truncated or not a GGUF file at all.

    ``gguf.GGUFReader`` maps the header and the tensor table; a file cut short either fails there
    or has tensors whose data runs past the end of the file, which we check explicitly.
    """
    import gguf

    size = path.stat().st_size
    hint = f"Re-download or re-export it (file size {size:,} bytes)."
    try:
        reader = gguf.GGUFReader(path)
    except Exception as err:  # the reader raises ValueError/IndexError/struct errors on short files
        raise ValueError(f"GGUF file {path} is truncated or corrupt ({type(err).__name__}: {err}). {hint}") from err
    if not reader.tensors:
        raise ValueError(f"GGUF file {path} holds no tensors. {hint}")
    end = max(int(t.data_offset) + int(t.n_bytes) for t in reader.tensors)
    if end > size:
        raise ValueError(f"GGUF file {path} is truncated: its tensors need {end:,} bytes. {hint}")


def weights_sha256(files: list[Path]) -> str:
    """SHA-256 of the weight files (the file's own hash when there is one), cached by path/size/mtime.

    Hashing 100s of MB takes seconds, so results are kept in ``<cache>/weights_sha256.json`` and
    reused while the file's size and modification time are unchanged.
    """
    index_path = cache_dir() / "weights_sha256.json"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    digests, changed = [], False
    for f in sorted(files):
        st = f.stat()
        key = str(f.resolve())
        entry = index.get(key)
        if not entry or entry.get("size") != st.st_size or entry.get("mtime_ns") != st.st_mtime_ns:
            entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256_file(f)}
            index[key], changed = entry, True
        digests.append((f.name, entry["sha256"]))
    if changed:
        atomic_write_json(index_path, index, indent=1)
    if len(digests) == 1:
        return digests[0][1]
    import hashlib

    combined = hashlib.sha256("".join(f"{n}:{d}\n" for n, d in digests).encode())
    return combined.hexdigest()


def resolve_source(name_or_path: str | os.PathLike[str]) -> tuple[Path, list[Path], str]:
    """-> (local HF folder, weight files to hash, model_source string). Raises on a missing path."""
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(
                f"{path} is a file but not a .gguf file. Pass a Hugging Face folder (config.json + "
                "*.safetensors), a .gguf file, or a hub id."
            )
        check_gguf(path)
        digest = weights_sha256([path])
        folder = cache_dir() / "models" / f"gguf-{path.stem}-{digest[:16]}"
        if not (folder / "config.json").exists():
            gguf_to_hf_folder(path, folder, sha256=digest)  # written under a temp name and renamed
        return folder, [path], str(path.resolve())
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} has no config.json: it is not a Hugging Face model folder.")
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(
                f"{path} has no *.safetensors weights (qsae_lens loads safetensors only; convert "
                "pickled .bin weights with transformers' save_pretrained(safe_serialization=True))."
            )
        return path, files, str(path.resolve())
    if _looks_like_path(name):
        raise FileNotFoundError(
            f"Model path {name!r} does not exist. Pass an existing Hugging Face folder, a .gguf file, "
            "or a hub id such as 'HuggingFaceTB/SmolLM2-135M'."
        )
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(name, allow_patterns=_HUB_PATTERNS))
    except Exception as err:
        raise FileNotFoundError(
            f"{name!r} is not a local path, and fetching it from the Hugging Face hub failed "
            f"({type(err).__name__}: {err}). Check the id and your connection, or pass a local folder."
        ) from err
    return folder, sorted(folder.glob("*.safetensors")), name


class _DropInt8CastWarning(logging.Filter):
    """bitsandbytes logs "inputs will be cast ... to float16" on *every* int8 matmul (210 lines per
    SmolLM2 forward); the cast is LLM.int8's documented behaviour, so it is said once in the docs."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "will be cast from" not in record.getMessage()


_INT8_CAST_FILTER = _DropInt8CastWarning()


def _install_int8_cast_filter() -> None:
    """Add the filter to bitsandbytes' logger once per process (``addFilter`` ignores a filter object
    already present, so every int8 load reusing this one instance adds nothing)."""
    logging.getLogger("bitsandbytes.autograd._functions").addFilter(_INT8_CAST_FILTER)


def load_hf_model(
    folder: Path, precision: Precision, device: str, compute_dtype: torch.dtype | None, **hf_kwargs: Any
) -> torch.nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` at ``precision``, in eval mode (see :func:`load_hf_model_with_metadata`)."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    context = QuantContext(
        folder=folder,
        weights_sha256=weights_sha256(sorted(folder.glob("*.safetensors"))),
        device=device,
        tokenizer=AutoTokenizer.from_pretrained(folder),
    )
    return load_hf_model_with_metadata(folder, precision, device, compute_dtype, context, **hf_kwargs)[0]


def load_hf_model_with_metadata(
    folder: Path,
    precision: Precision,
    device: str,
    compute_dtype: torch.dtype | None,
    context: QuantContext,
    **hf_kwargs: Any,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """``AutoModelForCausalLM.from_pretrained`` with the precision family's loading arguments, in eval mode.

    bitsandbytes quantizes during ``from_pretrained``; the fake-quantized and calibrated families
    load float32 and then rewrite the decoder ``nn.Linear`` weights (``family.after_load``), whose
    extra metadata (calibration hash, ...) is returned beside the model.
    """
    from transformers import AutoModelForCausalLM

    family = precision.family
    kwargs: dict[str, Any] = {"use_safetensors": True}
    kwargs.update(family.hf_load_kwargs(precision.spec, device, compute_dtype))
    if precision.name == "int8":
        _install_int8_cast_filter()
    kwargs.update(hf_kwargs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*generation flags.*")
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    if family.moves_to_device(precision.spec):
        model = model.to(device)
    model = model.eval()
    return model, family.after_load(model, precision.spec, context)


def load_model(
    name_or_path: str | os.PathLike[str],
    precision: str | Precision = "fp32",
    device: str | torch.device | None = None,
    *,
    compute_dtype: torch.dtype | None = None,
    **hf_kwargs: Any,
) -> Any:
    """Load a causal LM at ``precision`` behind TransformerLens hook names.

    ``name_or_path``: a hub id, a local Hugging Face folder, or a ``.gguf`` file (dequantized once
    into a cached folder, then quantized like any other model). ``precision``: any registered name
    (``qsae_lens.precision.registered_names()``): fp32, fp16, bf16; int8, nf4, nf4-dq, fp4
    (bitsandbytes kernels); ``rtn-w{2..8}[-g{N}][-asym]``, ``gguf-{type}``, ``gptq-w4``, ``awq-w4``
    (fake-quantized weights, float32 compute); ``hqq-*``, ``quanto-*``, ``torchao-*`` (their own
    layers, optional extras). ``compute_dtype`` overrides the compute dtype (bitsandbytes default:
    float32 on CPU, bfloat16 on CUDA). Extra keyword arguments go to
    ``from_pretrained``. Returns a :class:`~qsae_lens.models.hooked.HookedQuantizedLM`.
    """
    from transformers import AutoConfig, AutoTokenizer

    from qsae_lens.models.hooked import HookedQuantizedLM

    prec = parse_precision(precision)
    dev = str(torch.device(device)) if device is not None else default_device()
    check_precision_runs_on(prec, dev)
    folder, weight_files, source = resolve_source(name_or_path)
    config = AutoConfig.from_pretrained(folder)
    adapter = adapter_for(config.model_type)

    metadata = prec.metadata(dev, compute_dtype)
    digest = weights_sha256(weight_files)
    metadata.update(model_source=source, weights_sha256=digest, device=dev)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    context = QuantContext(folder=folder, weights_sha256=digest, device=dev, tokenizer=tokenizer)
    hf_model, extra = load_hf_model_with_metadata(folder, prec, dev, compute_dtype, context, **hf_kwargs)
    metadata.update(extra)
    model_name = Path(source).name if Path(source).exists() else source
    return HookedQuantizedLM(
        hf_model,
        tokenizer,
        adapter,
        precision=prec,
        precision_metadata=metadata,
        model_name=model_name,
        source_folder=folder,
    )
