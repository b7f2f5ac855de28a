"""Interpretation: detection scoring arithmetic, the OpenAI-compatible client against a local stub server
(the key travels only in the Authorization header), and the local SmolLM2 explainer for real."""

from __future__ import annotations

import json
import logging
import pickle
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from qsae_lens.interpret import (
    Context,
    OpenAICompatibleClient,
    OpenAIExplainer,
    OpenAIScorer,
    detection_score,
    format_examples,
)

KEY = "sk-test-SECRET-0123456789"


class _Stub(BaseHTTPRequestHandler):
    seen: list[dict] = []

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Stub.seen.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        if self.headers.get("Authorization") != f"Bearer {KEY}":
            # a hostile server echoing the header back: the client must mask it
            msg = json.dumps({"error": f"bad key {self.headers.get('Authorization')}"}).encode()
            self.send_response(401)
            self.send_header("Content-Length", str(len(msg)))
            self.end_headers()
            self.wfile.write(msg)
            return
        prompt = body["messages"][0]["content"]
        reply = ("Yes" if "<<" not in prompt and "digit" in prompt and any(c.isdigit() for c in prompt.split("Text:")[-1])
                 else "No" if "Text:" in prompt else "numbers and digits")
        out = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):  # keep the test output quiet
        pass


@pytest.fixture(scope="module")
def stub_url():
    server = HTTPServer(("127.0.0.1", 0), _Stub)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_client_sends_key_only_in_header_and_never_leaks(stub_url, caplog, tmp_path, monkeypatch):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    client = OpenAICompatibleClient(stub_url, model="stub")
    label = OpenAIExplainer(client).explain([Context(["a", " 12", " b"], [0.0, 2.0, 0.0])])
    assert label == "numbers and digits"
    req = _Stub.seen[-1]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == f"Bearer {KEY}"
    assert KEY not in json.dumps(req["body"])
    score = detection_score(OpenAIScorer(client), "a digit", ["x 1", "y 22", "z 3"], ["abc", "def"])
    assert score.balanced_accuracy == 1.0
    assert KEY not in repr(client) and KEY not in repr(OpenAIScorer(client))
    assert KEY.encode() not in pickle.dumps(client)
    (tmp_path / "report.json").write_text(json.dumps({"label": label, "score": score._asdict(), "client": repr(client)}))
    assert KEY not in (tmp_path / "report.json").read_text()
    # a wrong key: the server echoes it in its error body; the exception masks it
    bad = OpenAICompatibleClient(stub_url, api_key=KEY + "-wrong")
    with pytest.raises(RuntimeError, match="HTTP 401") as err:
        bad.chat("hi")
    assert KEY not in str(err.value)
    assert KEY not in caplog.text


def test_client_refuses_missing_base_url(monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(ValueError, match="OPENAI_BASE_URL"):
        OpenAICompatibleClient()


def test_detection_score_is_balanced_accuracy():
    from sklearn.metrics import balanced_accuracy_score

    class Fixed:
        def __init__(self, preds):
            self.preds = preds

        def predict(self, label, texts):
            return self.preds

    preds = [True, True, False, True, False, False, False, True, False]
    s = detection_score(Fixed(preds), "x", ["a"] * 4, ["b"] * 5)
    assert s.balanced_accuracy == pytest.approx(balanced_accuracy_score([1] * 4 + [0] * 5, preds))
    assert (s.tpr, s.tnr) == (0.75, 0.8)
    assert format_examples([Context(["a", "b"], [0.0, 1.0])]) == "1. a<<b>>"


@pytest.mark.slow  # generation with the 135M model: ~45 s of CPU
def test_local_smollm2_explainer_returns_a_label(smollm2_path):
    from qsae_lens.interpret import LocalChatModel, LocalExplainer, LocalScorer

    chat = LocalChatModel(smollm2_path)
    ex = [Context(["The year ", "1984", " was"], [0, 3.0, 0]), Context(["in ", "2001", " we"], [0, 2.5, 0]),
          Context(["since ", "1776", ","], [0, 2.0, 0])]
    label = LocalExplainer(chat, max_new_tokens=12).explain(ex)
    assert isinstance(label, str) and 0 < len(label) < 200
    preds = LocalScorer(chat).predict(label, ["born in 1990", "the cat sat", "around 1850 ships", "a green leaf"])
    assert len(preds) == 4 and sum(preds) <= 2  # the median split predicts at most half positive
