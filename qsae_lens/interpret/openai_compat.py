"""A minimal OpenAI-compatible chat client (``POST {base_url}/chat/completions``) over the standard library.

Written on ``urllib`` rather than the ``openai`` package: one endpoint, and no new dependency.
The API key comes from the ``api_key`` argument or the ``OPENAI_API_KEY`` environment variable and
is sent only in the ``Authorization`` header: it is never logged, never in ``repr``, never in an
exception message (HTTP errors are re-raised with the status and a body excerpt with any
occurrence of the key masked), never in anything this package saves.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from qsae_lens.interpret.base import Context, format_examples

__all__ = ["OpenAICompatibleClient", "OpenAIExplainer", "OpenAIScorer"]

log = logging.getLogger(__name__)


class OpenAICompatibleClient:
    """Chat completions against any OpenAI-compatible server (vLLM, llama.cpp server, Ollama, OpenAI)."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *, model: str = "gpt-4o-mini",
                 timeout: float = 60.0) -> None:
        base = base_url or os.environ.get("OPENAI_BASE_URL")
        if not base:
            raise ValueError("no base URL: pass base_url= or set OPENAI_BASE_URL (e.g. http://127.0.0.1:8000/v1)")
        if not base.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base!r}")
        self.base_url = base.rstrip("/")
        self.__key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.model = model
        self.timeout = timeout

    def __repr__(self) -> str:
        return (f"OpenAICompatibleClient(base_url={self.base_url!r}, model={self.model!r}, "
                f"api_key={'set' if self.__key else 'unset'})")

    def __getstate__(self) -> dict[str, Any]:  # never pickle the key
        state = self.__dict__.copy()
        state.pop("_OpenAICompatibleClient__key", None)
        return state

    def _mask(self, text: str) -> str:
        return text.replace(self.__key, "***") if self.__key else text

    def chat(self, content: str, *, max_tokens: int = 64, temperature: float = 0.0) -> str:
        """The assistant's reply to one user message."""
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": content}],
                           "max_tokens": max_tokens, "temperature": temperature}).encode()
        headers = {"Content-Type": "application/json"}
        if self.__key:
            headers["Authorization"] = f"Bearer {self.__key}"
        req = urllib.request.Request(f"{self.base_url}/chat/completions", data=body, headers=headers, method="POST")
        log.debug("POST %s/chat/completions model=%s", self.base_url, self.model)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                data = json.loads(resp.read())
        except urllib.error.HTTPError as e:
            detail = self._mask(e.read()[:300].decode(errors="replace"))
            raise RuntimeError(f"chat completion failed: HTTP {e.code} from {self.base_url}: {detail}") from None
        except urllib.error.URLError as e:
            raise RuntimeError(f"cannot reach {self.base_url}: {self._mask(str(e.reason))}") from None
        try:
            return str(data["choices"][0]["message"]["content"]).strip()
        except (KeyError, IndexError, TypeError):
            raise RuntimeError(f"unexpected reply from {self.base_url}: no choices[0].message.content") from None


class OpenAIExplainer:
    """:class:`~qsae_lens.interpret.base.Explainer` over an :class:`OpenAICompatibleClient`."""

    def __init__(self, client: OpenAICompatibleClient, *, max_examples: int = 20) -> None:
        self.client = client
        self.max_examples = max_examples

    def __repr__(self) -> str:
        return f"OpenAIExplainer({self.client!r})"

    def explain(self, examples: Sequence[Context]) -> str:
        from qsae_lens.interpret.local import EXPLAIN_PROMPT

        reply = self.client.chat(EXPLAIN_PROMPT.format(examples=format_examples(examples[: self.max_examples])))
        return (reply.splitlines() or [""])[0].strip().strip('"')


class OpenAIScorer:
    """:class:`~qsae_lens.interpret.base.Scorer`: one yes/no question per text (Delphi's detection)."""

    def __init__(self, client: OpenAICompatibleClient) -> None:
        self.client = client

    def __repr__(self) -> str:
        return f"OpenAIScorer({self.client!r})"

    def predict(self, label: str, texts: Sequence[str]) -> list[bool]:
        from qsae_lens.interpret.local import DETECT_PROMPT

        return [self.client.chat(DETECT_PROMPT.format(label=label, text=t.strip()), max_tokens=3).lower().startswith("yes")
                for t in texts]
