"""wandb logging: off unless asked, whatever credentials exist; when asked, one real (offline) run per
training job, created, logged and finished, with no network, no API key in any output, and
``os.environ`` left as it was.

Each test isolates HOME, the working directory, TMPDIR-free wandb dirs and the credentials
(a fake ``WANDB_API_KEY`` and a ``~/.netrc`` entry for api.wandb.ai)."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch

FAKE_KEY = "qsaefake" + "0123456789abcdef" * 2 + "01234567"  # 40 characters, like a real key
D_IN, D_SAE, K, BATCH = 16, 32, 4, 256


@pytest.fixture
def isolated_wandb_home(tmp_path, monkeypatch):
    """A HOME with wandb credentials in both places wandb reads them, cwd inside it, no network."""
    home = tmp_path / "home"
    home.mkdir()
    netrc = home / ".netrc"
    netrc.write_text(f"machine api.wandb.ai\n  login user\n  password {FAKE_KEY}\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("NETRC", str(netrc))
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # a closed port: any network use fails
    for key in ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "WANDB_NAME", "WANDB_SERVICE"):
        monkeypatch.delenv(key, raising=False)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return home


def _activations() -> torch.Tensor:
    return torch.randn(2048, D_IN, generator=torch.Generator().manual_seed(0))


def _train(**kwargs):
    from qsae_lens.training import OpenAITopKTrainingSAEConfig
    from qsae_lens.training.fit import train_sae_on_activations

    cfg = OpenAITopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, init_seed=0, dead_tokens_threshold=4096)
    return train_sae_on_activations(cfg, _activations(), total_tokens=BATCH * 40, batch_size=BATCH, **kwargs)


def _wandb_records(path: Path) -> list:
    """The protobuf records of an offline run's ``run-*.wandb`` file.

    Written by hand because wandb 0.31 ships no Python reader for its own files: the format is
    LevelDB's log format (32 KiB blocks; each chunk a 7-byte header crc32/length/type, types
    FULL=1, FIRST=2, MIDDLE=3, LAST=4) after a 7-byte ``:W&B`` file header.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    block, pos, chunks, records = 32768, 7, [], []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:  # zero padding to the end of a block
            pos += left
            continue
        chunks.append(data[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(b"".join(chunks))
            records.append(record)
            chunks = []
    return records


def _files_containing(root: Path, needle: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


def test_credentials_alone_leave_logging_off(isolated_wandb_home, tmp_path, capfd):
    from qsae_lens.training import safe_logging_config

    env_before = dict(os.environ)
    result = _train(out_dir=tmp_path / "sae")
    assert (tmp_path / "sae" / "cfg.json").is_file() and result.loss_history
    assert safe_logging_config().log_to_wandb is False
    # asked for: on (credentials exist), and still nothing in os.environ changes
    assert safe_logging_config(log_to_wandb=True, wandb_project="x").log_to_wandb is True
    assert dict(os.environ) == env_before
    assert not [p for p in tmp_path.rglob("*wandb*")], "logging off must create no wandb folder"
    out, err = capfd.readouterr()
    assert FAKE_KEY not in out + err and "wandb.init()" not in out + err


def test_asking_without_credentials_is_refused_not_prompted(tmp_path, monkeypatch):
    from qsae_lens.training import safe_logging_config

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    with pytest.raises(ValueError, match="wandb login.*WANDB_MODE=offline"):
        safe_logging_config(log_to_wandb=True)
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert safe_logging_config(log_to_wandb=True).log_to_wandb is True
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert safe_logging_config(log_to_wandb=True).log_to_wandb is False


def test_offline_run_is_created_logged_and_finished(isolated_wandb_home, tmp_path, monkeypatch, capfd):
    from qsae_lens.training import WandbSettings

    monkeypatch.setenv("WANDB_MODE", "offline")
    env_before = dict(os.environ)
    runs = tmp_path / "runs"
    settings = WandbSettings(project="qsae-test", name="nf4-L3-s0", config={"precision": "nf4"}, dir=str(runs))
    result = _train(wandb=settings, record_every=1)
    assert dict(os.environ) == env_before

    (run_dir,) = (runs / "wandb").glob("offline-run-*")
    records = _wandb_records(next(run_dir.glob("run-*.wandb")))
    kinds = [r.WhichOneof("record_type") for r in records]
    (run,) = [r.run for r in records if r.HasField("run")]
    assert run.project == "qsae-test" and run.display_name == "nf4-L3-s0"
    assert {u.key: json.loads(u.value_json) for u in run.config.update}["precision"] == "nf4"
    (exit_record,) = [r.exit for r in records if r.HasField("exit")]
    assert exit_record.exit_code == 0 and "history" in kinds

    # The logged losses are the trainer's (recorded here at every step, independently of wandb),
    # matched by the token count each record carries.
    logged = {}
    for r in records:
        if r.HasField("history"):
            items = {(i.key or "/".join(i.nested_key)): i.value_json for i in r.history.item}
            if "losses/mse_loss" in items:
                logged[int(float(items["details/n_training_samples"]))] = float(items["losses/mse_loss"])
    recorded = {int(row["tokens"]): row["mse_loss"] for row in result.loss_history}
    common = sorted(set(logged) & set(recorded))
    assert len(common) >= 2, (sorted(logged), sorted(recorded))
    for tokens in common:
        assert logged[tokens] == pytest.approx(recorded[tokens], rel=1e-6)

    out, err = capfd.readouterr()
    assert FAKE_KEY not in out + err
    assert _files_containing(tmp_path, FAKE_KEY) == [isolated_wandb_home / ".netrc"]


def test_a_failing_job_finishes_its_run_with_exit_code_1(isolated_wandb_home, tmp_path, monkeypatch):
    from qsae_lens.training import WandbSettings
    from qsae_lens.training.common import wandb_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    env_before = dict(os.environ)
    with pytest.raises(RuntimeError, match="boom"), wandb_run(WandbSettings(project="p", dir=str(tmp_path))) as run:
        run.log({"x": 1.0})
        raise RuntimeError("boom")
    assert dict(os.environ) == env_before
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    (exit_record,) = [r.exit for r in _wandb_records(run_file) if r.HasField("exit")]
    assert exit_record.exit_code == 1
