"""qsae_lens.hub: staging round-trips, model card, loading from a real hub cache, no-network publishing.

Everything runs in this one process (``import sae_lens`` is slow); huggingface_hub reads some settings
(``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``, ``HF_ENDPOINT``, ``HF_DEBUG``) into ``huggingface_hub.constants``
at import, so the tests patch those constants as well as the environment variables.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import socket
import traceback
from pathlib import Path

import pytest
import torch

FAKE_TOKEN = "hf_qsaeFAKEtoken0123456789abcdefXYZ"
PRECISION_KEYS = ("precision", "quant_type", "compute_dtype", "double_quant", "bitsandbytes_version")


def _metadata(precision: str, quant_type: str | None, double_quant: bool = False) -> dict:
    return {
        "precision": precision,
        "quant_type": quant_type,
        "compute_dtype": "float32",
        "double_quant": double_quant,
        "bitsandbytes_version": "0.50.0" if quant_type else None,
        "model_source": "local:SmolLM2-135M-Instruct",
        "weights_sha256": "0" * 64,
        "init_seed": 0,
        "hook_name": "blocks.3.hook_resid_post",
        "model_name": "HuggingFaceTB/SmolLM2-135M-Instruct",
    }


def _randomize(sae, seed: int) -> None:
    """Non-trivial weights (SAELens initialises b_enc/b_dec to zero) so round-trips test every tensor."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


@pytest.fixture(scope="module")
def saes():
    from sae_lens import StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig

    topk = TopKSAE(TopKSAEConfig(d_in=16, d_sae=64, k=4))
    standard = StandardSAE(StandardSAEConfig(d_in=16, d_sae=32))
    for i, (sae, meta) in enumerate([(topk, _metadata("nf4", "nf4")), (standard, _metadata("fp32", None))]):
        _randomize(sae, i)
        for key, value in meta.items():
            sae.cfg.metadata[key] = value
    standard.cfg.metadata["l1_coefficient"] = 5.0
    return {"resid3-nf4": topk, "resid3-fp32": standard}


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(32, 16, generator=torch.Generator().manual_seed(7))


def _tree_hash(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


COMPARISON = {
    "schema_version": 1,
    "a": {"sae_id": "resid3-fp32", "precision": "fp32"},
    "b": {"sae_id": "resid3-nf4", "precision": "nf4"},
    "metrics": {
        "matched_cosine": {
            "value": 0.8123,
            "ci_low": 0.79,
            "ci_high": 0.83,
            "null": 0.1377,
            "p_value": 0.0005,
        },
        "cka": {"value": 0.91, "ci_low": None, "ci_high": None, "null": None, "p_value": None},
    },
}


def _card_table(text: str, sae_id: str) -> dict[str, str]:
    block = text.split(f"### `{sae_id}`", 1)[1].split("###", 1)[0]
    return dict(re.findall(r"^\| ([^|]+?) \| ([^|]+?) \|$", block, flags=re.M)[1:])  # skip the header row


def test_staged_folder_round_trips_and_card_parses(saes, x, tmp_path):
    from huggingface_hub import ModelCard
    from sae_lens import SAE

    from qsae_lens.hub import publish_saes

    # one SAE passed as an object, one as a folder written by SAELens itself
    src = tmp_path / "src" / "fp32"
    saes["resid3-fp32"].save_model(src)
    before = _tree_hash(src)
    stage = tmp_path / "stage"
    out = publish_saes(
        {"resid3-nf4": saes["resid3-nf4"], "resid3-fp32": src},
        "my-org/smollm2-saes",
        stage_only=True,
        stage_dir=stage,
        comparison=COMPARISON,
        evals={
            "resid3-nf4": {"sparsity": {"l0": 4.0}, "reconstruction_quality": {"explained_variance": 0.75}}
        },
    )
    assert out == stage
    assert _tree_hash(src) == before
    # exactly SAELens's file set per SAE, plus the card; no temp leftovers beside it
    assert sorted(_tree_hash(stage)) == [
        "README.md",
        "resid3-fp32/cfg.json",
        "resid3-fp32/sae_weights.safetensors",
        "resid3-nf4/cfg.json",
        "resid3-nf4/sae_weights.safetensors",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "stage"]
    # hub.py's light copies of SAELens's file names are SAELens's own
    from sae_lens import constants

    from qsae_lens import hub

    assert (hub.SAE_CFG_FILENAME, hub.SAE_WEIGHTS_FILENAME) == (
        constants.SAE_CFG_FILENAME,
        constants.SAE_WEIGHTS_FILENAME,
    )

    for sae_id, original in saes.items():
        loaded = SAE.load_from_disk(stage / sae_id)
        assert type(loaded) is type(original)
        z = original.encode(x)
        assert torch.equal(loaded.encode(x), z)
        assert torch.equal(loaded.decode(z), original.decode(z))
        for key in PRECISION_KEYS:
            assert loaded.cfg.metadata[key] == original.cfg.metadata[key]

    card = ModelCard.load(stage / "README.md")
    assert card.data.library_name == "saelens"
    assert {"qsae-lens", "precision-nf4", "precision-fp32"} <= set(card.data.tags)
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"

    nf4 = _card_table(card.text, "resid3-nf4")
    assert nf4["architecture"] == "topk" and nf4["d_sae"] == "64" and nf4["k or L1 coefficient"] == "k = 4"
    assert (nf4["precision"], nf4["quant type"], nf4["compute dtype"]) == ("nf4", "nf4", "float32")
    assert (nf4["L0"], nf4["explained variance"], nf4["CE loss recovered"]) == ("4", "0.75", "—")
    fp32 = _card_table(card.text, "resid3-fp32")
    assert fp32["architecture"] == "standard" and fp32["k or L1 coefficient"] == "L1 = 5"
    assert (fp32["quant type"], fp32["L0"]) == ("—", "—")
    # the comparison's headline metric with its CI and null, and "—" where the report has none
    assert "| matched_cosine | 0.8123 | [0.79, 0.83] | 0.1377 | 0.0005 | — |" in card.text
    assert "| cka | 0.91 | — | — | — | — |" in card.text
    # the card names every metadata key DEVELOPERS.md reserves for precision provenance
    for key in (*PRECISION_KEYS, "model_source", "weights_sha256", "init_seed"):
        assert f"`{key}`" in card.text


def _lay_out_hub_cache(cache: Path, repo_id: str, staged: Path, commit: str) -> None:
    """Write ``staged`` into ``cache`` as huggingface_hub's downloads lay a repo out:
    ``models--org--name/blobs/<hash>``, ``refs/main`` (the commit), ``snapshots/<commit>/<path>`` as
    relative symlinks to the blobs (sha256 for LFS files like safetensors, git blob sha1 otherwise)."""
    from huggingface_hub.file_download import repo_folder_name
    from huggingface_hub.utils.sha import git_hash

    repo = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for file in sorted(p for p in staged.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = hashlib.sha256(data).hexdigest() if file.suffix == ".safetensors" else git_hash(data)
        (repo / "blobs" / blob).write_bytes(data)
        link = repo / "snapshots" / commit / file.relative_to(staged)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(repo / "blobs" / blob, link.parent))


def test_load_from_hub_cache_offline(saes, x, tmp_path, monkeypatch):
    from huggingface_hub import constants, scan_cache_dir
    from sae_lens import SAE

    from qsae_lens.hub import load_sae, publish_saes

    repo_id, commit = "my-org/smollm2-saes", "0123456789abcdef0123456789abcdef01234567"
    staged = publish_saes(saes, repo_id, stage_only=True, stage_dir=tmp_path / "stage")
    cache = tmp_path / "hub"
    _lay_out_hub_cache(cache, repo_id, staged, commit)
    # huggingface_hub's own cache scanner agrees the layout is a valid cached repo
    info = scan_cache_dir(cache)
    assert not info.warnings
    ((cached_repo,),) = [info.repos]
    assert cached_repo.repo_id == repo_id
    ((revision,),) = [cached_repo.revisions]
    assert revision.commit_hash == commit and revision.refs == frozenset({"main"})
    assert revision.nb_files == 5

    for name, value in {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_TOKEN": FAKE_TOKEN}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))

    for sae_id, original in saes.items():
        z = original.encode(x)
        from_sae_lens = SAE.from_pretrained(repo_id, sae_id)  # plain SAELens resolution of a hub id
        ours = load_sae(repo_id, sae_id)
        pinned = load_sae(repo_id, sae_id, revision=commit)
        for loaded in (from_sae_lens, ours, pinned):
            assert type(loaded) is type(original)
            assert torch.equal(loaded.encode(x), z)
            assert torch.equal(loaded.decode(z), original.decode(z))
        for key in PRECISION_KEYS:
            assert ours.cfg.metadata[key] == original.cfg.metadata[key]
        assert ours.cfg.metadata["precision"] == sae_id.split("-")[-1]

    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        load_sae(repo_id, "resid3-int8")
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        load_sae("other-org/absent", "resid3-nf4")


def _closed_port() -> int:
    with socket.socket() as s:  # a port nothing listens on: connecting is refused at once
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_publish_without_network_fails_cleanly_and_never_shows_token(
    saes, tmp_path, monkeypatch, capfd, caplog
):
    from huggingface_hub import constants

    from qsae_lens.cli import main
    from qsae_lens.hub import HubPublishError, publish_saes

    endpoint = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_DEBUG", True)  # huggingface_hub's most verbose request logging
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    caplog.set_level(logging.DEBUG)

    src = tmp_path / "saes"
    for sae_id, sae in saes.items():
        sae.save_model(src / sae_id)
    before = _tree_hash(src)

    with pytest.raises(HubPublishError, match="Cannot reach the Hugging Face hub") as excinfo:
        publish_saes({k: src / k for k in saes}, "my-org/smollm2-saes", token=FAKE_TOKEN)
    err = excinfo.value
    assert "Nothing was uploaded" in str(err) and endpoint in str(err)
    assert err.__cause__ is None and err.__context__ is None  # nothing chained that could carry the token
    shown = "".join(traceback.format_exception(err))

    # the same through the CLI, with the token coming from HF_TOKEN
    assert main(["publish", str(src), "my-org/smollm2-saes"]) == 1
    out, errout = capfd.readouterr()
    assert "Cannot reach the Hugging Face hub" in errout
    for text in (str(err), repr(err), shown, out, errout, caplog.text):
        assert FAKE_TOKEN not in text
    assert caplog.records  # the DEBUG logs were captured, so their absence of the token means something
    assert _tree_hash(src) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saes"]

    # HF_HUB_OFFLINE=1: refused at once, saying so
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubPublishError, match="HF_HUB_OFFLINE"):
        publish_saes({k: src / k for k in saes}, "my-org/smollm2-saes", token=FAKE_TOKEN)
    assert _tree_hash(src) == before


def test_bad_inputs_fail_clearly_without_half_staged_folders(saes, tmp_path):
    from qsae_lens.hub import discover_sae_folders, publish_saes

    good = tmp_path / "good"
    saes["resid3-nf4"].save_model(good)
    no_cfg = tmp_path / "no_cfg"
    shutil.copytree(good, no_cfg)
    (no_cfg / "cfg.json").unlink()
    stage = tmp_path / "stage"

    def publish(refs, repo_id="my-org/saes"):
        return publish_saes(refs, repo_id, stage_only=True, stage_dir=stage)

    with pytest.raises(FileNotFoundError, match="cfg.json"):
        publish({"a": good, "b": no_cfg})
    for repo_id in ("no-slash", "a/b/c", "../etc", "org/", "org/na me"):
        with pytest.raises(ValueError, match="org/name"):
            publish({"a": good}, repo_id)
    for sae_id in ("a/b", "..", "../up", "a\\b", "", "README.md"):
        with pytest.raises(ValueError, match="sae_id"):
            publish({sae_id: good})
    # a failure in the middle of staging (the second SAE cannot be saved) leaves nothing behind
    from sae_lens import TopKSAE, TopKSAEConfig

    bad = TopKSAE(TopKSAEConfig(d_in=16, d_sae=64, k=4))
    bad.cfg.metadata["compute_dtype"] = torch.float32  # not JSON: what DEVELOPERS.md warns about
    with pytest.raises(ValueError, match="plain JSON"):
        publish({"a": good, "b": bad})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good", "no_cfg"]

    stage.mkdir()
    (stage / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        publish({"a": good})
    assert [p.name for p in stage.iterdir()] == ["keep.txt"]

    parent = tmp_path / "several"
    shutil.copytree(good, parent / "x-nf4")
    (parent / "notes").mkdir()
    with pytest.raises(FileNotFoundError, match=r"\['notes'\].*cfg.json"):
        discover_sae_folders(parent)


def test_cli_dry_run_stages_folder_of_saes(saes, tmp_path, capsys):
    from huggingface_hub import ModelCard

    from qsae_lens.cli import main

    folder = tmp_path / "run"
    for sae_id, sae in saes.items():
        sae.save_model(folder / sae_id)
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"comparisons": [COMPARISON]}))  # a sweep report holding comparisons
    stage = tmp_path / "staged"
    rc = main(
        [
            "publish",
            str(folder),
            "my-org/saes",
            "--dry-run",
            "--stage-dir",
            str(stage),
            "--comparison",
            str(report),
        ]
    )
    assert rc == 0
    assert "nothing uploaded" in capsys.readouterr().out
    assert sorted(p.name for p in stage.iterdir()) == ["README.md", "resid3-fp32", "resid3-nf4"]
    card = ModelCard.load(stage / "README.md")
    assert "### resid3-fp32 fp32 vs resid3-nf4 nf4" in card.text
    assert "| matched_cosine | 0.8123 |" in card.text


def test_hub_error_that_echoes_the_token_is_scrubbed(saes, tmp_path, monkeypatch, capfd, caplog):
    """A local endpoint that rejects every request and echoes the Authorization header back (the worst a
    server or proxy could do): the real huggingface_hub error path runs, the token is scrubbed, and
    nothing reaches an upload endpoint."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from huggingface_hub import constants

    from qsae_lens.hub import HubPublishError, publish_saes

    seen: list[tuple[str, str]] = []

    class Echo401(BaseHTTPRequestHandler):
        def _reply(self) -> None:
            seen.append((self.command, self.path))
            auth = self.headers.get("authorization", "")
            body = json.dumps({"error": f"Invalid credentials in {auth}"}).encode()
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.send_header("X-Error-Message", f"Invalid credentials in {auth}")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_HEAD = do_PUT = _reply

        def log_message(self, *args) -> None:  # keep the test output quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Echo401)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(constants, "HF_DEBUG", True)
        caplog.set_level(logging.DEBUG)
        with pytest.raises(HubPublishError) as excinfo:
            publish_saes(saes, "my-org/smollm2-saes", token=FAKE_TOKEN)
    finally:
        server.shutdown()
        thread.join()
    err = excinfo.value
    assert "refused the request" in str(err) and "Nothing was uploaded" in str(err)
    assert "<redacted>" in str(err)  # the server did echo it; we removed it
    out, errout = capfd.readouterr()
    for text in (str(err), repr(err), "".join(traceback.format_exception(err)), out, errout, caplog.text):
        assert FAKE_TOKEN not in text
    assert seen and all("/commit/" not in path and "/preupload/" not in path for _, path in seen)


def test_card_from_a_comparison_report_object():
    """The card reads the report object that qsae_lens.compare writes, through its to_dict()."""
    report_mod = pytest.importorskip("qsae_lens.compare.report")
    from qsae_lens.hub import build_model_card

    report = report_mod.ComparisonReport.from_dict(COMPARISON)
    report.warnings.append("SAEs read different hooks")
    cfg = {"architecture": "topk", "d_in": 16, "d_sae": 64, "k": 4, "metadata": _metadata("int8", "llm.int8")}
    card = build_model_card("my-org/saes", {"resid3-int8": cfg}, comparison=report)
    assert "### resid3-fp32 fp32 vs resid3-nf4 nf4" in card
    assert "| matched_cosine | 0.8123 | [0.79, 0.83] | 0.1377 | 0.0005 |" in card
    assert "- SAEs read different hooks" in card


# --------------------------------------------------------------------------- weights checked before staging


def _corrupt(kind: str, folder: Path, outside: Path) -> None:
    from safetensors.torch import load_file, save_file

    weights = folder / "sae_weights.safetensors"
    if kind == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif kind == "nan":
        tensors = load_file(str(weights))
        tensors["W_dec"][3, 5] = float("nan")
        save_file(tensors, str(weights))
    elif kind == "wrong d_in":
        cfg = json.loads((folder / "cfg.json").read_text())
        cfg["d_in"] = 24
        (folder / "cfg.json").write_text(json.dumps(cfg))
    elif kind == "symlink out":
        outside.write_bytes(weights.read_bytes())  # valid weights: only the link itself is wrong
        weights.unlink()
        weights.symlink_to(outside)
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("truncated", "cannot be read as safetensors"),
        ("nan", "'W_dec' holds NaN or Inf"),
        ("wrong d_in", r"'W_dec' has shape \(64, 16\).*d_in=24"),
        ("symlink out", "outside the SAE folder"),
    ],
)
def test_publish_refuses_broken_weights_and_links_out_before_staging(saes, tmp_path, capsys, kind, message):
    from qsae_lens.cli import main
    from qsae_lens.hub import publish_saes

    good, broken = tmp_path / "src" / "good", tmp_path / "src" / "broken"
    saes["resid3-nf4"].save_model(good)
    saes["resid3-nf4"].save_model(broken)
    _corrupt(kind, broken, tmp_path / "elsewhere.safetensors")
    stage = tmp_path / "stage"
    with pytest.raises(ValueError, match=message):
        publish_saes({"a": good, "b": broken}, "my-org/saes", stage_only=True, stage_dir=stage)
    rc = main(["publish", str(tmp_path / "src"), "my-org/saes", "--dry-run", "--stage-dir", str(stage)])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert re.search(message, err), err
    assert not stage.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_sub_folder_linked_from_outside_is_refused(saes, tmp_path):
    from qsae_lens.hub import discover_sae_folders

    saes["resid3-nf4"].save_model(tmp_path / "elsewhere" / "sae")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "linked").symlink_to(tmp_path / "elsewhere" / "sae")
    with pytest.raises(ValueError, match=r"\['linked'\] are links to folders outside it"):
        discover_sae_folders(tmp_path / "run")


def test_published_cfg_has_no_local_paths_and_keeps_the_weights_digest(saes, tmp_path):
    from sae_lens import SAE

    from qsae_lens.hub import publish_saes

    src = tmp_path / "sae"
    saes["resid3-nf4"].save_model(src)
    cfg = json.loads((src / "cfg.json").read_text())
    local_model = tmp_path / "models" / "SmolLM2-135M-Instruct"
    local_model.mkdir(parents=True)
    cfg["metadata"].update(model_source=str(local_model), model_name=str(local_model), dataset_path="/data/corpus.txt")
    (src / "cfg.json").write_text(json.dumps(cfg))

    def staged_cfg(stage: Path, **kw) -> dict:
        publish_saes({"s": src}, "my-org/saes", stage_only=True, stage_dir=stage, **kw)
        return json.loads((stage / "s" / "cfg.json").read_text())

    def strings(obj):
        if isinstance(obj, dict):
            return [s for v in obj.values() for s in strings(v)]
        if isinstance(obj, list):
            return [s for v in obj for s in strings(v)]
        return [obj] if isinstance(obj, str) else []

    plain = staged_cfg(tmp_path / "st1")
    assert not [v for v in strings(plain) if v.startswith("/") or str(tmp_path) in v]
    meta = plain["metadata"]
    assert meta["model_source"] == meta["model_name"] == "SmolLM2-135M-Instruct"
    assert meta["dataset_path"] == "corpus.txt" and meta["weights_sha256"] == "0" * 64
    hub = staged_cfg(tmp_path / "st2", base_model="HuggingFaceTB/SmolLM2-135M-Instruct")
    assert hub["metadata"]["model_source"] == hub["metadata"]["model_name"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert SAE.load_from_disk(tmp_path / "st2" / "s").cfg.metadata.precision == "nf4"  # still a SAELens folder


def test_publish_evals_accepts_the_sweeps_run_evals_file(saes, tmp_path):
    from huggingface_hub import ModelCard

    from qsae_lens.cli import main

    folder = tmp_path / "run"
    saes["resid3-nf4"].save_model(folder / "nf4-L3-s0")
    saes["resid3-fp32"].save_model(folder / "fp32-L3-s0")
    # the sweep's saelens_run_evals/run_evals.json: cell label -> flattened SAELens run_evals metrics
    run_evals = {
        "nf4/L3/s0": {"sparsity/l0": 4.0, "reconstruction_quality/explained_variance": 0.8125,
                      "model_performance_preservation/ce_loss_score": 0.9375},
        "fp32/L3/s0": {"sparsity": {"l0": 7.5}, "reconstruction_quality": {"explained_variance": 0.875}},
        "int8/L3/s0": {"sparsity/l0": 1.0},  # not published: ignored
    }
    (tmp_path / "run_evals.json").write_text(json.dumps(run_evals))
    stage = tmp_path / "stage"
    rc = main(["publish", str(folder), "my-org/saes", "--dry-run", "--stage-dir", str(stage),
               "--evals", str(tmp_path / "run_evals.json")])
    assert rc == 0
    card = ModelCard.load(stage / "README.md").text
    nf4, fp32 = _card_table(card, "nf4-L3-s0"), _card_table(card, "fp32-L3-s0")
    assert (nf4["L0"], nf4["explained variance"], nf4["CE loss recovered"]) == ("4", "0.8125", "0.9375")
    assert (fp32["L0"], fp32["explained variance"]) == ("7.5", "0.875")
