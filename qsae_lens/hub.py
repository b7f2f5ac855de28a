"""Publish SAEs to the Hugging Face hub with a precision-aware model card, and load them back.

Publishing stages everything locally first (one folder per ``sae_id`` holding SAELens's file set,
plus a ``README.md`` model card), then uploads the staged folders with SAELens's own
``upload_saes_to_huggingface``, so a published repo is a plain SAELens repo:
``SAE.from_pretrained("org/name", sae_id)`` resolves it (SAELens treats a release name that is not in
its ``pretrained_saes.yaml`` and contains a ``/`` as a hub repo id, and ``sae_id`` as the folder).

The hub token comes from huggingface_hub's usual sources (the ``token`` argument, ``HF_TOKEN``, the
stored token of ``hf auth login``). It is never printed or logged: errors raised from the network
part are re-raised as :class:`HubPublishError` with the token scrubbed from their message and with
no exception chained to them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sae_lens import SAE

from qsae_lens._io import atomic_dir, atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

# The two files every SAELens SAE folder holds (sae_lens.constants): copied here so validating a
# folder does not pay for importing sae_lens; tests check they match SAELens's.
SAE_CFG_FILENAME = "cfg.json"
SAE_WEIGHTS_FILENAME = "sae_weights.safetensors"
CARD_FILENAME = "README.md"
DEFAULT_COMMIT_MESSAGE = "Upload SAEs with qsae_lens"
PREFLIGHT_TIMEOUT_S = 10.0
MISSING = "—"

_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_SAE_ID_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+=@-]*$")


class HubPublishError(RuntimeError):
    """Publishing to the hub failed; the message never contains the token."""


# --------------------------------------------------------------------------- validation


def validate_repo_id(repo_id: str) -> str:
    """Check ``repo_id`` is ``org/name`` as the hub spells it; return it unchanged."""
    if (
        not isinstance(repo_id, str)
        or not _REPO_ID_RE.fullmatch(repo_id)
        or ".." in repo_id
        or "--" in repo_id
    ):
        raise ValueError(
            f"Invalid hub repo id {repo_id!r}: expected 'org/name' (letters, digits, '-', '_', '.'; "
            "no '..' or '--'), e.g. 'my-org/smollm2-saes'."
        )
    from huggingface_hub.utils import HFValidationError
    from huggingface_hub.utils import validate_repo_id as hf_validate_repo_id

    try:
        hf_validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"Invalid hub repo id {repo_id!r}: {err}") from None
    return repo_id


def validate_sae_id(sae_id: str) -> str:
    """Check ``sae_id`` is a single safe folder name (it becomes a folder in the repo)."""
    if (
        not isinstance(sae_id, str)
        or not _SAE_ID_RE.fullmatch(sae_id)
        or ".." in sae_id
        or sae_id == CARD_FILENAME
    ):
        raise ValueError(
            f"Invalid sae_id {sae_id!r}: it names one folder in the repo, so it must be a single name of "
            "letters, digits and '._+=@-' without path separators or '..' (e.g. 'blocks.3.hook_resid_post-nf4')."
        )
    return sae_id


def _validate_sae_folder(path: Path, sae_id: str) -> dict[str, Any]:
    """Return the folder's parsed cfg.json, or raise saying what is missing."""
    if not path.is_dir():
        raise FileNotFoundError(
            f"SAE {sae_id!r}: {path} is not a folder. Pass an SAE or a folder written by sae.save_model()."
        )
    for name in (SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME):
        if not (path / name).is_file():
            raise FileNotFoundError(
                f"SAE {sae_id!r}: {path} has no {name}; an SAE folder holds {SAE_CFG_FILENAME} and "
                f"{SAE_WEIGHTS_FILENAME} (write one with sae.save_model(path))."
            )
    try:
        cfg = json.loads((path / SAE_CFG_FILENAME).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"SAE {sae_id!r}: {path / SAE_CFG_FILENAME} is not valid JSON ({err}).") from None
    if not isinstance(cfg, dict) or "architecture" not in cfg:
        raise ValueError(
            f"SAE {sae_id!r}: {path / SAE_CFG_FILENAME} is not a SAELens config (no 'architecture')."
        )
    return cfg


def _refuse_links_out(path: Path, sae_id: str) -> None:
    """Refuse any file in the SAE folder that resolves outside it (a symlink out would have its
    target's content copied into the upload)."""
    root = path.resolve()
    for entry in path.rglob("*"):
        target = entry.resolve()
        if target != root and root not in target.parents:
            raise ValueError(
                f"SAE {sae_id!r}: {entry} is a link to {target}, outside the SAE folder; publishing copies "
                "only files inside it. Replace the link with the file itself."
            )


def check_sae_weights(path: str | Path, cfg: Mapping[str, Any], sae_id: str = "SAE") -> None:
    """Load every tensor of the folder's weights and check it before anything is staged.

    The safetensors file must load whole (a truncated file fails here), every floating tensor must
    be finite, and ``W_enc``/``W_dec``/``b_enc``/``b_dec`` (where present) must have the shapes
    cfg.json's ``d_in``/``d_sae`` imply; ``W_dec`` must be present. Reads one tensor at a time, so
    memory stays at the largest tensor. Also reads ``sparsity.safetensors`` when there is one.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    d_in, d_sae = cfg.get("d_in"), cfg.get("d_sae")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (d_in, d_sae)):
        raise ValueError(
            f"SAE {sae_id!r}: {path / SAE_CFG_FILENAME} must give positive integer d_in and d_sae, "
            f"got d_in={d_in!r}, d_sae={d_sae!r}."
        )
    expected = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,)}
    for name in (SAE_WEIGHTS_FILENAME, "sparsity.safetensors"):
        file = path / name
        if not file.is_file():
            continue
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                keys = list(f.keys())
                for key in keys:
                    tensor = f.get_tensor(key)
                    if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
                        raise ValueError(
                            f"SAE {sae_id!r}: {file} tensor {key!r} holds NaN or Inf values; refusing to "
                            "publish a broken SAE (retrain it or load the right checkpoint)."
                        )
                    if name == SAE_WEIGHTS_FILENAME and key in expected and tuple(tensor.shape) != expected[key]:
                        raise ValueError(
                            f"SAE {sae_id!r}: {file} tensor {key!r} has shape {tuple(tensor.shape)}, but cfg.json "
                            f"(d_in={d_in}, d_sae={d_sae}) implies {expected[key]}: the weights and config disagree."
                        )
        except (SafetensorError, OSError, RuntimeError) as err:
            raise ValueError(
                f"SAE {sae_id!r}: {file} cannot be read as safetensors ({type(err).__name__}: {err}); "
                "it is truncated or not a safetensors file."
            ) from None
        if name == SAE_WEIGHTS_FILENAME and "W_dec" not in keys:
            raise ValueError(f"SAE {sae_id!r}: {file} has no W_dec tensor (found {sorted(keys)}).")


def _looks_local(value: str) -> bool:
    return os.path.isabs(value) or value.startswith(("~", "./", "../")) or (
        os.sep in value and Path(value).expanduser().exists()
    )


def portable_cfg(cfg: Mapping[str, Any], base_model: str | None = None) -> dict[str, Any]:
    """cfg.json as it is published: no local paths in its provenance.

    ``metadata.model_source`` and ``metadata.model_name``, when they name a local path, become the
    hub id ``base_model`` when given, else the folder's (or file's) basename; ``weights_sha256``,
    kept alongside, identifies the weights exactly. Any other absolute path among the metadata's
    string values becomes its basename. Everything else is unchanged.
    """
    out = json.loads(json.dumps(cfg))
    meta = out.get("metadata")
    if not isinstance(meta, dict):
        return out
    for key, value in list(meta.items()):
        if not isinstance(value, str) or not _looks_local(value):
            continue
        name = Path(value.rstrip("/")).name
        meta[key] = base_model if base_model and key in ("model_source", "model_name") else name
    return out


def discover_sae_folders(folder: str | Path) -> dict[str, Path]:
    """``{sae_id: path}`` for FOLDER holding one SAE folder (cfg.json inside) or several sub-folders.

    A single SAE folder is published under its own name; sub-folders under theirs. A sub-folder
    without cfg.json is an error rather than silently skipped, so nothing is left out by accident.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder.")
    if (folder / SAE_CFG_FILENAME).exists():
        return {validate_sae_id(folder.resolve().name): folder}
    subs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subs:
        raise FileNotFoundError(
            f"{folder} has no {SAE_CFG_FILENAME} and no sub-folders: pass an SAE folder (with {SAE_CFG_FILENAME}) "
            "or a folder of SAE folders."
        )
    missing = [p.name for p in subs if not (p / SAE_CFG_FILENAME).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{folder}: sub-folder(s) {missing} have no {SAE_CFG_FILENAME}; every sub-folder must be an SAE "
            "folder written by sae.save_model() (move other folders out)."
        )
    root = folder.resolve()
    outside = [p.name for p in subs if root not in p.resolve().parents]
    if outside:
        raise ValueError(
            f"{folder}: sub-folder(s) {outside} are links to folders outside it; publishing copies only what "
            "the folder holds. Copy those SAE folders in, or publish them by their own path."
        )
    return {validate_sae_id(p.name): p for p in subs}


# --------------------------------------------------------------------------- model card


def _import_architectures() -> None:
    """Register qsae_lens's own SAE architectures with SAELens, if that module is available."""
    try:
        import qsae_lens.training  # noqa: F401
    except ImportError:
        logger.debug(
            "qsae_lens.training not importable; only SAELens's built-in architectures are registered"
        )


def _flatten(mapping: Mapping[str, Any] | None) -> dict[str, Any]:
    """Eval metrics (SAELens ``run_evals`` nested groups, the sweep's flattened ``group/metric`` file,
    or a flat dict) -> ``{metric: number}`` keyed by the full ``group/metric`` name and by the bare
    metric name (inner keys winning), through the sweep's own flattening."""
    out: dict[str, Any] = {}
    for key, value in _flatten_run_evals(mapping or {}).items():
        out[key] = value
        out[key.rsplit("/", 1)[-1]] = value
    return out


def _flatten_run_evals(metrics: Mapping[str, Any]) -> dict[str, float]:
    from qsae_lens.evals import flatten_run_evals  # the sweep's own flattening of run_evals output

    return flatten_run_evals(metrics)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value).replace("|", "\\|")


def _sae_row(sae_id: str, cfg: Mapping[str, Any], evals: Mapping[str, Any] | None) -> dict[str, str]:
    meta = dict(cfg.get("metadata") or {})
    found = {**_flatten(meta.get("evals")), **_flatten({k: v for k, v in meta.items() if k != "evals"})}
    found.update(_flatten(evals))
    sparsity = (
        f"k = {cfg['k']}"
        if cfg.get("k") is not None
        else f"L1 = {_fmt(cfg.get('l1_coefficient', found.get('l1_coefficient')))}"
    )
    if sparsity == f"L1 = {MISSING}":
        sparsity = MISSING
    return {
        "architecture": _fmt(cfg.get("architecture")),
        "hook": _fmt(meta.get("hook_name")),
        "d_in": _fmt(cfg.get("d_in")),
        "d_sae": _fmt(cfg.get("d_sae")),
        "k or L1 coefficient": sparsity,
        "precision": _fmt(meta.get("precision")),
        "quant type": _fmt(meta.get("quant_type")),
        "compute dtype": _fmt(meta.get("compute_dtype")),
        "double quant": _fmt(meta.get("double_quant")),
        "L0": _fmt(found.get("l0")),
        "explained variance": _fmt(found.get("explained_variance")),
        "CE loss recovered": _fmt(found.get("ce_loss_score")),
    }


def _comparison_dicts(comparison: Any) -> list[dict[str, Any]]:
    """A ComparisonReport, its ``to_dict()``, or a sweep report holding several -> list of report dicts."""
    if comparison is None:
        return []
    if hasattr(comparison, "to_dict") and callable(comparison.to_dict):
        comparison = comparison.to_dict()
    if isinstance(comparison, Mapping) and isinstance(comparison.get("metrics"), Mapping):
        return [dict(comparison)]
    if isinstance(comparison, Mapping):
        for key in ("comparisons", "reports"):
            inner = comparison.get(key)
            if isinstance(inner, Mapping):
                inner = list(inner.values())
            if isinstance(inner, list):
                return [d for item in inner for d in _comparison_dicts(item)]
    if isinstance(comparison, list):
        return [d for item in comparison for d in _comparison_dicts(item)]
    raise ValueError(
        "comparison must be a ComparisonReport, its to_dict() ({'a', 'b', 'metrics': {name: {'value', "
        "'ci_low', 'ci_high', 'null', 'p_value'}}}), or a sweep report with a 'comparisons' list of those; "
        f"got {type(comparison).__name__}."
    )


def _side_name(side: Any) -> str:
    if isinstance(side, Mapping):
        parts = [str(side[k]) for k in ("name", "sae_id", "precision") if side.get(k) is not None]
        return " ".join(dict.fromkeys(parts)) or _fmt(side.get("source"))
    return _fmt(side)


def _null_text(null: Any) -> str:
    if isinstance(null, Mapping):  # e.g. {"value"|"mean": ..., "ci_low": ..., "ci_high": ...}
        centre = null.get("value", null.get("mean"))
        if null.get("ci_low") is not None and null.get("ci_high") is not None:
            return f"{_fmt(centre)} [{_fmt(null['ci_low'])}, {_fmt(null['ci_high'])}]"
        return _fmt(centre)
    return _fmt(null)


def _comparison_section(report: Mapping[str, Any]) -> str:
    title = f"{_side_name(report.get('a'))} vs {_side_name(report.get('b'))}"
    lines = [
        f"### {title}",
        "",
        "| metric | value | 95% CI | null baseline | p-value | p (Holm) |",
        "|---|---|---|---|---|---|",
    ]
    for name, metric in report["metrics"].items():
        if not isinstance(metric, Mapping):
            metric = {"value": metric}
        ci = (
            f"[{_fmt(metric.get('ci_low'))}, {_fmt(metric.get('ci_high'))}]"
            if metric.get("ci_low") is not None or metric.get("ci_high") is not None
            else MISSING
        )
        lines.append(
            f"| {_fmt(name)} | {_fmt(metric.get('value'))} | {ci} | {_null_text(metric.get('null'))} | "
            f"{_fmt(metric.get('p_value'), 3)} | {_fmt(metric.get('p_value_holm'), 3)} |"
        )
    warnings = [str(w) for w in report.get("warnings") or []]
    if warnings:
        lines += ["", "Warnings:", *(f"- {w}" for w in warnings)]
    return "\n".join(lines)


def build_model_card(
    repo_id: str,
    cfgs: Mapping[str, Mapping[str, Any]],
    *,
    evals: Mapping[str, Mapping[str, Any]] | None = None,
    comparison: Any = None,
    base_model: str | None = None,
) -> str:
    """The README.md text: YAML front matter that ``huggingface_hub.ModelCard`` parses, then tables.

    ``cfgs`` maps sae_id -> the SAE's ``cfg.json`` dict; precision and evals come from its ``metadata``
    (keys in DEVELOPERS.md) and from ``evals[sae_id]`` (SAELens ``run_evals`` output or a flat dict
    with ``l0``, ``explained_variance``, ``ce_loss_score``).
    """
    from huggingface_hub import ModelCardData

    from qsae_lens.training.common import SAE_PROVENANCE_KEYS

    keys = ", ".join(f"`{k}`" for k in SAE_PROVENANCE_KEYS)
    precisions = sorted({str(c.get("metadata", {}).get("precision")) for c in cfgs.values()} - {"None"})
    if base_model is None:  # only a hub id is a valid base_model; local paths are not
        names = {c.get("metadata", {}).get("model_name") for c in cfgs.values()}
        if len(names) == 1:
            (name,) = names
            if isinstance(name, str) and _REPO_ID_RE.fullmatch(name) and not Path(name).exists():
                base_model = name
    data = ModelCardData(
        library_name="saelens",
        tags=["qsae-lens", "saelens", "sparse-autoencoder", *(f"precision-{p}" for p in precisions)],
        base_model=base_model,
    )
    rows = {sae_id: _sae_row(sae_id, cfg, (evals or {}).get(sae_id)) for sae_id, cfg in cfgs.items()}
    parts = [
        f"---\n{data.to_yaml()}\n---",
        f"# {repo_id}: SAEs across precisions",
        "Sparse autoencoders trained with [SAELens](https://github.com/decoderesearch/SAELens) on activations "
        "of a model run at the precision listed per SAE, published with qsae_lens. Each SAE's `cfg.json` "
        f"carries its precision description in `metadata` ({keys}).",
        f"Base model: `{base_model}`" if base_model else "",
        "## SAEs",
    ]
    for sae_id, row in rows.items():
        table = ["| field | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in row.items())]
        parts.append(f"### `{sae_id}`\n\n" + "\n".join(table))
    reports = _comparison_dicts(comparison)
    if reports:
        parts.append(
            "## How the features compare across precisions\n\n"
            "Headline metrics with 95% confidence intervals and the value the same metric takes under a "
            "null baseline (what chance alignment would give); a metric means something only where it "
            "clears its null."
        )
        parts.extend(_comparison_section(r) for r in reports)
    parts.append(
        "## Load\n\n```python\nfrom sae_lens import SAE\n\n"
        f'sae = SAE.from_pretrained("{repo_id}", "<sae_id>")\n\n'
        "# or, with qsae_lens (registers its own architectures, honours HF_HUB_OFFLINE=1):\n"
        "from qsae_lens.hub import load_sae\n\n"
        f'sae = load_sae("{repo_id}", "<sae_id>")\nprint(sae.cfg.metadata.precision)\n```'
    )
    return "\n\n".join(p for p in parts if p) + "\n"


# --------------------------------------------------------------------------- staging


def _stage_into(
    target: Path,
    saes: Mapping[str, Any],
    repo_id: str,
    *,
    evals: Mapping[str, Mapping[str, Any]] | None,
    comparison: Any,
    base_model: str | None,
) -> None:
    """Write the exact upload folder into ``target`` (which exists and is empty)."""
    from sae_lens import SAE
    from sae_lens.constants import RUNNER_CFG_FILENAME, SPARSITY_FILENAME

    # The files SAELens's upload_saes_to_huggingface uploads from an SAE folder (its allow_patterns).
    sae_files = (SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, SPARSITY_FILENAME, RUNNER_CFG_FILENAME)
    cfgs: dict[str, dict[str, Any]] = {}
    for sae_id, ref in saes.items():
        dest = target / sae_id
        if isinstance(ref, SAE):
            try:
                ref.save_model(dest)
            except TypeError as err:  # json.dump of a non-JSON metadata value (torch.dtype, bnb config, ...)
                raise ValueError(
                    f"SAE {sae_id!r}: its cfg does not serialize to JSON ({err}); keep cfg.metadata to plain "
                    "JSON values (e.g. compute_dtype='float32', not torch.float32)."
                ) from None
        else:
            src = Path(ref)
            dest.mkdir()
            for name in sae_files:
                if (src / name).is_file():  # copies, never links: the source stays untouched
                    shutil.copyfile(src / name, dest / name)
        cfg = _validate_sae_folder(dest, sae_id)
        check_sae_weights(dest, cfg, sae_id)  # what is staged is what was checked
        cfgs[sae_id] = portable_cfg(cfg, base_model)
        atomic_write_json(dest / SAE_CFG_FILENAME, cfgs[sae_id])
    card = build_model_card(repo_id, cfgs, evals=evals, comparison=comparison, base_model=base_model)
    atomic_write_text(target / CARD_FILENAME, card)


def stage_saes(
    saes: Mapping[str, Any],
    repo_id: str,
    stage_dir: str | Path,
    *,
    evals: Mapping[str, Mapping[str, Any]] | None = None,
    comparison: Any = None,
    base_model: str | None = None,
) -> Path:
    """Write the folder :func:`publish_saes` would upload into ``stage_dir`` (absent or empty), atomically.

    Everything is written into a temporary sibling folder that is renamed onto ``stage_dir`` only once
    complete, so a failure leaves no half-staged folder behind.
    """
    stage_dir = Path(stage_dir)
    if stage_dir.exists() and (not stage_dir.is_dir() or any(stage_dir.iterdir())):
        raise FileExistsError(
            f"stage_dir {stage_dir} already exists and is not empty; remove it or choose another."
        )
    with atomic_dir(stage_dir, replace=stage_dir.exists()) as tmp:  # replaces only an empty folder
        _stage_into(tmp, saes, repo_id, evals=evals, comparison=comparison, base_model=base_model)
    return stage_dir


def _check_inputs(saes: Mapping[str, Any], repo_id: str) -> None:
    from sae_lens import SAE

    validate_repo_id(repo_id)
    if not isinstance(saes, Mapping) or not saes:
        raise ValueError("saes must be a non-empty mapping {sae_id: SAE | path to an SAE folder}.")
    for sae_id, ref in saes.items():
        validate_sae_id(sae_id)
        if isinstance(ref, SAE):
            continue
        if not isinstance(ref, (str, os.PathLike)):
            raise TypeError(f"SAE {sae_id!r}: expected an SAE or a folder path, got {type(ref).__name__}.")
        cfg = _validate_sae_folder(Path(ref), sae_id)
        _refuse_links_out(Path(ref), sae_id)
        check_sae_weights(Path(ref), cfg, sae_id)


# --------------------------------------------------------------------------- token hygiene


def _is_offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(constants.is_offline_mode()) or env.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "<redacted>") if token else text


@contextlib.contextmanager
def _token_in_env(token: str) -> Iterator[None]:
    """Expose ``token`` as HF_TOKEN for SAELens's uploader, which builds ``HfApi()`` without a token."""
    old = os.environ.get("HF_TOKEN")
    os.environ["HF_TOKEN"] = token
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HF_TOKEN", None)
        else:
            os.environ["HF_TOKEN"] = old


@contextlib.contextmanager
def _redacting_log_records(token: str) -> Iterator[None]:
    """Scrub ``token`` from every log record created meanwhile, whatever logger or thread makes it.

    Written by hand because no library does it: huggingface_hub redacts the Authorization header in its
    own debug logs, but the HTTP stack below it (httpcore) logs raw response headers at DEBUG level,
    so a server or proxy that echoed the header back would otherwise put the token in the logs.
    """
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: leave it for logging's own error handling
            return record
        if token in message:
            record.msg, record.args = message.replace(token, "<redacted>"), None
        return record

    logging.setLogRecordFactory(factory)
    try:
        yield
    finally:
        logging.setLogRecordFactory(previous)


def _run_scrubbed(what: str, token: str | None, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call ``fn``; on failure raise HubPublishError with the token scrubbed and no chained exception.

    The original exception is dropped (raised outside the ``except`` block) because its message,
    arguments or request objects could hold the token.
    """
    message = None
    try:
        return fn(*args, **kwargs)
    except Exception as err:  # re-raised below without the token
        message = _scrub(f"{what} failed: {type(err).__name__}: {err}", token)
    raise HubPublishError(message)


# --------------------------------------------------------------------------- publish / load


def publish_saes(
    saes: Mapping[str, SAE | str | os.PathLike],
    repo_id: str,
    *,
    revision: str = "main",
    private: bool = False,
    comparison: Any = None,
    evals: Mapping[str, Mapping[str, Any]] | None = None,
    base_model: str | None = None,
    stage_only: bool = False,
    stage_dir: str | Path | None = None,
    token: str | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
) -> Path | str:
    """Publish ``{sae_id: SAE | folder}`` to ``repo_id`` as SAELens SAEs plus a precision-aware model card.

    Everything is staged locally first (``stage_dir`` if given, else a temporary folder); with
    ``stage_only=True`` nothing is uploaded and the staged folder is returned (a temporary one
    when ``stage_dir`` is None). Otherwise the hub is checked with a short timeout before the first
    upload (so no network means a clear :class:`HubPublishError` and nothing half-uploaded), the repo
    (and branch ``revision``) is created if needed, the SAE folders are uploaded with SAELens's
    ``upload_saes_to_huggingface`` (one commit per SAE), then README.md with ``commit_message``.
    ``private`` applies when the repo is created. Returns the repo's URL at ``revision``.

    Source folders are only read, never modified. ``comparison`` is a ``ComparisonReport``, its
    ``to_dict()``, or a sweep report; ``evals`` maps sae_id -> eval metrics for the card.
    """
    _check_inputs(saes, repo_id)
    _comparison_dicts(comparison)  # validate its shape before any work
    if not stage_only and _is_offline():
        raise HubPublishError(
            "HF_HUB_OFFLINE is set: publishing needs the network. Unset HF_HUB_OFFLINE, or use "
            "stage_only=True (CLI: --dry-run) to write the folder that would be uploaded."
        )
    kwargs = {"evals": evals, "comparison": comparison, "base_model": base_model}
    if stage_only:
        if stage_dir is None:
            stage_dir = Path(tempfile.mkdtemp(prefix="qsae-publish-"))
        staged = stage_saes(saes, repo_id, stage_dir, **kwargs)
        logger.info("staged %d SAE(s) for %s in %s (nothing uploaded)", len(saes), repo_id, staged)
        return staged

    with contextlib.ExitStack() as stack:
        if stage_dir is None:
            staged = stage_saes(
                saes, repo_id, Path(stack.enter_context(tempfile.TemporaryDirectory())) / "stage", **kwargs
            )
        else:
            staged = stage_saes(saes, repo_id, stage_dir, **kwargs)
        kept = f"; the staged folder is {staged}" if stage_dir is not None else ""
        return _upload_staged(staged, list(saes), repo_id, revision, private, token, commit_message, kept)


def _upload_staged(
    staged: Path,
    sae_ids: list[str],
    repo_id: str,
    revision: str,
    private: bool,
    token: str | None,
    commit_message: str,
    kept: str = "",
) -> str:
    from huggingface_hub import get_token

    token = token or _run_scrubbed("reading the stored hub token", None, get_token)
    if not token:
        raise HubPublishError(
            "No Hugging Face token found: pass token=..., set HF_TOKEN, or run `hf auth login`."
        )
    with _redacting_log_records(token):
        return _upload_with_token(staged, sae_ids, repo_id, revision, private, token, commit_message, kept)


def _upload_with_token(
    staged: Path,
    sae_ids: list[str],
    repo_id: str,
    revision: str,
    private: bool,
    token: str,
    commit_message: str,
    kept: str,
) -> str:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
    from sae_lens import upload_saes_to_huggingface

    api = HfApi(token=token)

    # Preflight with a short timeout: fail here, before anything is created or uploaded.
    message = None
    try:
        api.repo_info(repo_id, timeout=PREFLIGHT_TIMEOUT_S)
    except RepositoryNotFoundError:
        pass  # created below
    except HfHubHTTPError as err:  # the hub answered, with an error (bad token, no access, outage)
        message = _scrub(
            f"The Hugging Face hub at {api.endpoint} refused the request ({type(err).__name__}: {err}). "
            f"Nothing was uploaded{kept}. Check the token's write access to {repo_id}, then retry.",
            token,
        )
    except Exception as err:  # no answer at all; re-raised below without the token
        message = _scrub(
            f"Cannot reach the Hugging Face hub at {api.endpoint} ({type(err).__name__}: {err}). Nothing was "
            f"uploaded{kept}. Check the network (or HF_ENDPOINT), then retry.",
            token,
        )
    if message is not None:
        raise HubPublishError(message)

    _run_scrubbed(f"creating repo {repo_id}", token, api.create_repo, repo_id, private=private, exist_ok=True)
    if revision != "main":
        _run_scrubbed(
            f"creating branch {revision}", token, api.create_branch, repo_id, branch=revision, exist_ok=True
        )
    logger.info("uploading %d SAE(s) to %s@%s", len(sae_ids), repo_id, revision)
    with _token_in_env(token):
        _run_scrubbed(
            f"uploading SAEs to {repo_id}",
            token,
            upload_saes_to_huggingface,
            {sae_id: staged / sae_id for sae_id in sae_ids},
            repo_id,
            hf_revision=revision,
            show_progress=False,
            add_default_readme=False,  # our card replaces SAELens's default one
        )
    _run_scrubbed(
        f"uploading {CARD_FILENAME} to {repo_id}",
        token,
        api.upload_file,
        path_or_fileobj=str(staged / CARD_FILENAME),
        path_in_repo=CARD_FILENAME,
        repo_id=repo_id,
        revision=revision,
        commit_message=commit_message,
    )
    return f"{api.endpoint}/{repo_id}/tree/{revision}"


def load_sae(repo_id: str, sae_id: str, *, revision: str | None = None, device: str = "cpu") -> SAE:
    """Load ``sae_id`` from hub repo ``repo_id`` with its precision metadata in ``sae.cfg.metadata``.

    Resolves through ``huggingface_hub.hf_hub_download``, so it uses the local hub cache and honours
    ``HF_HUB_OFFLINE=1``; qsae_lens's own architectures are registered first. Unlike
    ``SAE.from_pretrained`` it keeps the dtype saved in cfg.json and accepts a ``revision``.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError
    from sae_lens import SAE

    validate_repo_id(repo_id)
    validate_sae_id(sae_id)
    _import_architectures()
    paths = {}
    for name in (SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME):
        try:
            paths[name] = hf_hub_download(repo_id, f"{sae_id}/{name}", revision=revision)
        except LocalEntryNotFoundError:
            where = "HF_HUB_OFFLINE is set and it is" if _is_offline() else "the hub is unreachable and it is"
            raise FileNotFoundError(
                f"Cannot load {repo_id}/{sae_id}: {where} not in the local hub cache. Download it once online "
                "(or unset HF_HUB_OFFLINE)."
            ) from None
        except EntryNotFoundError:  # after LocalEntryNotFoundError, its subclass
            raise FileNotFoundError(
                f"{repo_id}@{revision or 'main'} has no SAE {sae_id!r} ({sae_id}/{name} not found)."
            ) from None
        except RepositoryNotFoundError:
            raise FileNotFoundError(
                f"Hub repo {repo_id} not found (or private and no valid token)."
            ) from None
    folder = Path(paths[SAE_CFG_FILENAME]).parent
    return SAE.load_from_disk(folder, device=device)


# --------------------------------------------------------------------------- CLI


def add_publish_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``qsae publish`` (the token is never an option: use HF_TOKEN or `hf auth login`)."""
    parser.add_argument("folder", type=Path, help="an SAE folder (with cfg.json) or a folder of SAE folders")
    parser.add_argument("repo_id", help="hub repo id, org/name")
    parser.add_argument(
        "--dry-run", action="store_true", help="stage the exact upload folder and upload nothing"
    )
    parser.add_argument(
        "--stage-dir", type=Path, default=None, help="where to stage (absent or empty folder)"
    )
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--revision", default="main", help="branch to upload to (created if missing)")
    parser.add_argument("--comparison", type=Path, default=None, help="ComparisonReport or sweep report JSON")
    parser.add_argument("--evals", type=Path, default=None, help="JSON {sae_id: eval metrics} for the card")
    parser.add_argument("--base-model", default=None, help="hub id of the model the SAEs were trained on")
    parser.add_argument("--commit-message", default=DEFAULT_COMMIT_MESSAGE)


def _read_json(path: Path | None, what: str) -> Any:
    if path is None:
        return None
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"--{what} {path}: cannot read JSON ({err}).") from None


def evals_for_saes(raw: Any, sae_ids: list[str]) -> dict[str, dict[str, float]]:
    """``--evals`` JSON -> ``{sae_id: flat metrics}`` for the card.

    Accepts ``{sae_id: metrics}`` and the sweep's ``saelens_run_evals/run_evals.json``
    (``{cell label: metrics}``, a label such as ``nf4/L16/s0`` matching the sae_id ``nf4-L16-s0``);
    metrics may be SAELens's nested ``run_evals`` output or already flat, and go through the
    sweep's own flattening. Entries for SAEs not being published are ignored; none matching is an error.
    """
    if not isinstance(raw, Mapping) or not all(isinstance(v, Mapping) for v in raw.values()):
        raise ValueError("--evals must be a JSON object {sae_id or sweep cell label: {metric: value}}.")
    out: dict[str, dict[str, float]] = {}
    for key, metrics in raw.items():
        for candidate in (str(key), str(key).replace("/", "-")):
            if candidate in sae_ids:
                out[candidate] = _flatten_run_evals(metrics)
    if raw and not out:
        raise ValueError(
            f"--evals: none of its entries ({sorted(raw)[:5]}...) names an SAE being published ({sae_ids}); "
            "key it by sae_id (a sweep label 'nf4/L16/s0' matches the sae_id 'nf4-L16-s0')."
        )
    return out


def run_publish_command(args: argparse.Namespace) -> int:
    """Run ``qsae publish``. Bad input (folders, weights, JSON files, repo id): one line on stderr and
    exit status 2; a failure talking to the hub: one line (never the token) and exit status 1."""
    try:
        saes = discover_sae_folders(args.folder)
        evals = _read_json(args.evals, "evals")
        result = publish_saes(
            saes,
            args.repo_id,
            revision=args.revision,
            private=args.private,
            comparison=_read_json(args.comparison, "comparison"),
            evals=None if evals is None else evals_for_saes(evals, list(saes)),
            base_model=args.base_model,
            stage_only=args.dry_run,
            stage_dir=args.stage_dir,
            commit_message=args.commit_message,
        )
    except HubPublishError as err:
        print(f"qsae publish: error: {err}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, TypeError) as err:
        print(f"qsae publish: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    verb = "staged (dry run, nothing uploaded) in" if args.dry_run else "published to"
    print(f"{len(saes)} SAE(s) {verb} {result}")
    return 0
