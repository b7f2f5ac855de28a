"""Probing tasks that need no hub: labels from Python's own ``tokenize`` and from Shakespeare's speech headings.

Token-level tasks (corpus ``"stdlib"``): every model token inside one Python token gets that
token's class from the standard library's :mod:`tokenize` (the reference tokenizer of the language,
so the labels are exact): model tokens are mapped onto ``tokenize`` spans by character offsets
(the fast tokenizer's ``offset_mapping``); a model token that straddles two classes is left out.

* ``py_token_class`` — 6 classes: keyword, identifier, operator, number, string, comment.
* ``py_in_string`` — inside a string literal (docstrings included) or not.
* ``py_keyword`` — a NAME token that is a keyword (``keyword.iskeyword``) vs an identifier.

Sentence-level task (corpus ``"shakespeare"``):

* ``shakespeare_king`` — is the speaker of a speech a king (heading ``KING ...``)? One row per
  speech, the mean residual over the speech's first 23 tokens (the heading itself is not shown).

Types for the control task are the model token ids (token tasks) or the speaker (speech task);
groups are documents (source files, plays). Classes are balanced exactly by subsampling, so chance is 1/C.
Optional: :func:`sae_probes_task` reads a binary dataset of the ``sae-probes`` wheel (extra ``probes``).
"""

from __future__ import annotations

import io
import keyword
import re
import tokenize
from typing import Any, Literal, NamedTuple

import numpy as np

TOKEN_CLASSES = ("keyword", "identifier", "operator", "number", "string", "comment")
BUILTIN_TASKS = ("py_token_class", "py_in_string", "py_keyword", "shakespeare_king")
SEQUENCE_ROWS = 300
SEQUENCE_CONTEXT = 24


class TaskData(NamedTuple):
    """A probing task laid out over model windows; ``n`` rows, each one example."""

    name: str
    level: Literal["token", "sequence"]
    """"token": a row is one position of a window; "sequence": a row is a whole window (mean over positions >= 1)."""
    class_names: tuple[str, ...]
    windows: list[list[int]]
    """Token ids of each window, each starting with BOS (the attention sink, never a row)."""
    window_index: np.ndarray
    """int64[n]: the window of each row."""
    position: np.ndarray
    """int64[n]: the position of each row in its window (-1 for sequence rows)."""
    labels: np.ndarray
    """int64[n]: class index into ``class_names``."""
    types: np.ndarray
    """[n]: word type of each row for the control task (token id or speaker name)."""
    groups: np.ndarray
    """int64[n]: document of each row (grouped cv folds never split one)."""

    def __repr__(self) -> str:
        counts = np.bincount(self.labels, minlength=len(self.class_names)).tolist()
        return (f"TaskData({self.name!r}, {self.level}, n={len(self.labels)}, classes={dict(zip(self.class_names, counts))}, "
                f"windows={len(self.windows)}, documents={len(np.unique(self.groups))})")


def python_char_classes(source: str) -> np.ndarray:
    """Class index (into :data:`TOKEN_CLASSES`) of every character of Python ``source``, int8[len];
    -1 for whitespace, newlines, indentation and anything outside the six classes."""
    starts = np.concatenate([[0], np.cumsum([len(line) for line in source.splitlines(keepends=True)])])
    out = np.full(len(source), -1, dtype=np.int8)
    kinds = {tokenize.NUMBER: 3, tokenize.STRING: 4, tokenize.COMMENT: 5, tokenize.OP: 2}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NAME:
            cls = 0 if keyword.iskeyword(tok.string) else 1
        elif tok.type in kinds:
            cls = kinds[tok.type]
        else:
            continue
        a = starts[tok.start[0] - 1] + tok.start[1]
        b = starts[tok.end[0] - 1] + tok.end[1]
        out[a:b] = cls
    return out


def token_classes(char_classes: np.ndarray, offsets: np.ndarray, n_classes: int = len(TOKEN_CLASSES)) -> np.ndarray:
    """Class of each model token from the classes of its characters, int64[t] (-1 if mixed or none).

    ``offsets``: int[t, 2] character spans (the tokenizer's offset mapping). A token takes class c
    when c is the only class among its labelled characters (whitespace is unlabelled). Counted with
    per-class cumulative sums: no loop over tokens.
    """
    onehot = char_classes[:, None] == np.arange(n_classes)[None, :]  # [chars, C]
    cum = np.concatenate([np.zeros((1, n_classes), np.int64), np.cumsum(onehot, 0)])
    counts = cum[offsets[:, 1]] - cum[offsets[:, 0]]  # [t, C]
    present = counts > 0
    return np.where(present.sum(1) == 1, present.argmax(1), -1).astype(np.int64)


def _balanced(labels: np.ndarray, n_max: int, rng: np.random.Generator, n_classes: int) -> np.ndarray:
    """Row indices with the same number of rows in every class (at most ``n_max // n_classes``)."""
    per = max(1, min(n_max // n_classes, int(np.bincount(labels, minlength=n_classes).min())))
    keep = [rng.permutation(np.flatnonzero(labels == c))[:per] for c in range(n_classes)]
    return np.sort(np.concatenate(keep))


def _python_task(name: str, tokenizer: Any, n_examples: int, context: int, max_docs: int, seed: int) -> TaskData:
    from qsae_lens.corpus import corpus_texts

    texts = corpus_texts("stdlib")
    rng = np.random.default_rng(seed)
    windows: list[list[int]] = []
    rows: list[np.ndarray] = []  # per window: [positions, classes, token ids]
    doc_of: list[int] = []
    for doc in rng.permutation(len(texts)):
        if len(windows) >= max_docs:
            break
        text = texts[doc]
        try:
            chars = python_char_classes(text)
        except (tokenize.TokenError, IndentationError, SyntaxError):
            continue
        # a window from a random line of the file (the top is mostly licence comments and docstrings)
        line_starts = np.flatnonzero(np.frombuffer(text.encode("utf-32-le"), np.uint32) == 10) + 1
        start = int(rng.choice(line_starts[: max(1, len(line_starts) - 40)])) if len(line_starts) > 1 else 0
        piece = text[start: start + 8 * context]
        enc = tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True)
        ids, offs = enc["input_ids"][: context - 1], np.asarray(enc["offset_mapping"][: context - 1], np.int64)
        if len(ids) < context - 1:
            continue
        cls = token_classes(chars[start: start + len(piece)], offs)
        windows.append([tokenizer.bos_token_id, *ids])
        rows.append(np.stack([np.arange(1, len(ids) + 1), cls, np.asarray(ids)]))
        doc_of.append(int(doc))
    allrows = np.concatenate([np.vstack([r, np.full(r.shape[1], w)]) for w, r in enumerate(rows)], axis=1)
    pos, cls, tok, win = allrows
    if name == "py_token_class":
        keep, labels, names = cls >= 0, cls, TOKEN_CLASSES
    elif name == "py_in_string":
        keep, labels, names = cls >= 0, (cls == 4).astype(np.int64), ("other", "string")
    elif name == "py_keyword":
        keep, labels, names = (cls == 0) | (cls == 1), (cls == 0).astype(np.int64), ("identifier", "keyword")
    else:  # pragma: no cover - guarded by build_task
        raise ValueError(name)
    idx = np.flatnonzero(keep)
    idx = idx[_balanced(labels[idx], n_examples, rng, len(names))]
    return TaskData(name, "token", tuple(names), windows, win[idx], pos[idx], labels[idx], tok[idx],
                    np.asarray(doc_of, np.int64)[win[idx]])


_SPEECH = re.compile(r"^([A-Z][A-Z' ,\-]+)\.?\n((?:.+\n)+)", re.M)


def _shakespeare_task(tokenizer: Any, n_examples: int, context: int, seed: int) -> TaskData:
    from qsae_lens.corpus import corpus_texts

    speeches: list[tuple[str, str, int]] = []
    for play, text in enumerate(corpus_texts("shakespeare")):
        for m in _SPEECH.finditer(text):
            speaker = m.group(1).strip()
            body = " ".join(m.group(2).split())
            if re.match(r"(ACT|SCENE|EPILOGUE|PROLOGUE)\b", speaker) or len(body.split()) < 8:
                continue
            speeches.append((speaker, body, play))
    labels = np.asarray([s.startswith("KING") for s, _, _ in speeches], np.int64)
    rng = np.random.default_rng(seed)
    idx = _balanced(labels, n_examples, rng, 2)
    windows = [[tokenizer.bos_token_id, *tokenizer(speeches[i][1], add_special_tokens=False)["input_ids"][: context - 1]]
               for i in idx]
    return TaskData("shakespeare_king", "sequence", ("not king", "king"), windows, np.arange(len(idx)),
                    np.full(len(idx), -1), labels[idx], np.asarray([speeches[i][0] for i in idx], object),
                    np.asarray([speeches[i][2] for i in idx], np.int64))


def build_task(name: str, tokenizer: Any, *, n_examples: int = 1200, context: int = 64,
               max_docs: int = 80, seed: int = 0) -> TaskData:
    """Build a built-in task (:data:`BUILTIN_TASKS`) or ``sae_probes:<dataset>`` for ``tokenizer``.

    ``n_examples``: most rows kept (classes balanced by subsampling). ``context``: window length
    with BOS. ``max_docs``: stdlib files read (one window each) for the token tasks. Sentence-level
    tasks keep at most :data:`SEQUENCE_ROWS` rows of at most :data:`SEQUENCE_CONTEXT` tokens: every
    row is a forward pass of its own, the cost that dominates on CPU.
    """
    if name.startswith("sae_probes:"):
        return sae_probes_task(name.split(":", 1)[1], tokenizer, n_examples=n_examples, context=context, seed=seed)
    if name in ("py_token_class", "py_in_string", "py_keyword"):
        return _python_task(name, tokenizer, n_examples, context, max_docs, seed)
    if name == "shakespeare_king":
        return _shakespeare_task(tokenizer, min(n_examples, SEQUENCE_ROWS), min(context, SEQUENCE_CONTEXT), seed)
    raise ValueError(f"Unknown probing task {name!r}: choose from {list(BUILTIN_TASKS)} or 'sae_probes:<dataset>'.")


def sae_probes_task(dataset: str, tokenizer: Any, *, n_examples: int = 1200, context: int = 64,
                    seed: int = 0, data_dir: Any = None) -> TaskData:
    """A binary dataset shipped inside the ``sae-probes`` wheel (extra ``probes``), one row per prompt,
    last-token aggregation as in sae-probes. Each prompt is its own group and type.

    ``dataset``: the file stem, e.g. ``"5_hist_fig_ismale"``, or its tag without the number
    (``"hist_fig_ismale"``). The wheel keeps them as ``sae_probes/data/cleaned_data/<n>_<tag>.csv.zst``
    with columns ``prompt, prompt_len, target``; ``data_dir`` overrides that folder.
    """
    import csv
    import io
    from pathlib import Path

    try:
        import zstandard
        if data_dir is None:
            from importlib.resources import files

            data_dir = Path(str(files("sae_probes"))) / "data" / "cleaned_data"
    except ModuleNotFoundError as err:
        raise ImportError("sae-probes datasets need the 'probes' extra: pip install 'qsae-lens[probes]'.") from err
    data_dir = Path(data_dir)
    found = sorted(p for p in data_dir.glob("*.csv.zst")
                   if p.name[: -len(".csv.zst")] == dataset or p.name[: -len(".csv.zst")].split("_", 1)[-1] == dataset)
    if not found:
        raise ValueError(f"No sae-probes dataset {dataset!r} in {data_dir} (names look like '5_hist_fig_ismale').")
    with found[0].open("rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as z:
        records = [(r["prompt"], r["target"]) for r in csv.DictReader(io.TextIOWrapper(z, encoding="utf-8"))]
    classes = sorted({t for _, t in records})
    if len(classes) != 2:
        raise ValueError(f"sae-probes dataset {dataset!r} has {len(classes)} classes; only binary ones are supported.")
    labels = np.asarray([classes.index(t) for _, t in records], np.int64)
    idx = _balanced(labels, n_examples, np.random.default_rng(seed), 2)
    windows = [[tokenizer.bos_token_id, *tokenizer(records[i][0], add_special_tokens=False)["input_ids"][: context - 1]]
               for i in idx]
    pos = np.asarray([len(w) - 1 for w in windows], np.int64)
    return TaskData(f"sae_probes:{found[0].name[: -len('.csv.zst')]}", "token", tuple(classes), windows,
                    np.arange(len(idx)), pos, labels[idx], np.arange(len(idx)), np.arange(len(idx)))
