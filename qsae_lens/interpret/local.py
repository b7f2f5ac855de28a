"""An explainer and a detection scorer backed by a local Hugging Face chat model (default: the embedded SmolLM2).

Honest expectation: SmolLM2-135M-Instruct is a 135M-parameter model (and the embedded copy went
through Q4_1 once). Its labels are short and often generic; see docs/survival.md for its measured
detection balanced accuracy. Any larger local chat model can be passed as ``model_path``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from qsae_lens.interpret.base import Context, format_examples

__all__ = ["LocalChatModel", "LocalExplainer", "LocalScorer", "EXPLAIN_PROMPT", "DETECT_PROMPT"]

EXPLAIN_PROMPT = (
    "Here are text excerpts. In each, the tokens marked <<like this>> share one property.\n{examples}\n"
    "In a few words, what do the marked tokens have in common? Answer with the label only."
)
DETECT_PROMPT = 'Label: "{label}"\nText: {text}\nDoes the text contain something matching the label? Answer Yes or No.'


class LocalChatModel:
    """A causal LM with a chat template, greedy decoding, loaded once (CPU float32 by default)."""

    def __init__(self, model_path: str | os.PathLike[str] | None = None, *, device: str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if model_path is None:
            from qsae_lens.assets import default_model_path

            model_path = default_model_path()
        self.model_path = str(model_path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=dtype).to(device).eval()
        self.device = device

    def __repr__(self) -> str:
        return f"LocalChatModel({self.model_path!r})"

    def _prompt_ids(self, content: str) -> torch.Tensor:
        ids = self.tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                                 return_tensors="pt", return_dict=True)["input_ids"]
        return ids.to(self.device)

    @torch.no_grad()
    def chat(self, content: str, *, max_new_tokens: int = 24) -> str:
        """Greedy reply to one user message."""
        ids = self._prompt_ids(content)
        out = self.model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                                  pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
        return self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()

    @torch.no_grad()
    def yes_logit_margin(self, content: str) -> float:
        """log P("Yes") - log P("No") for the first reply token: a graded yes/no answer."""
        logits = self.model(self._prompt_ids(content)).logits[0, -1]
        yes = self.tokenizer.encode("Yes", add_special_tokens=False)[0]
        no = self.tokenizer.encode("No", add_special_tokens=False)[0]
        return float(logits[yes] - logits[no])


class LocalExplainer:
    """:class:`~qsae_lens.interpret.base.Explainer` backed by :class:`LocalChatModel`."""

    def __init__(self, chat_model: LocalChatModel | None = None, *, max_examples: int = 10, max_new_tokens: int = 16) -> None:
        self.chat_model = chat_model or LocalChatModel()
        self.max_examples = max_examples
        self.max_new_tokens = max_new_tokens

    def __repr__(self) -> str:
        return f"LocalExplainer({self.chat_model!r})"

    def explain(self, examples: Sequence[Context]) -> str:
        reply = self.chat_model.chat(EXPLAIN_PROMPT.format(examples=format_examples(examples[: self.max_examples])),
                                     max_new_tokens=self.max_new_tokens)
        return (reply.splitlines() or [""])[0].strip().strip('"').strip()


class LocalScorer:
    """:class:`~qsae_lens.interpret.base.Scorer`: predicts "activating" when the model's Yes-No logit margin is
    above its median over the batch (a small model answers "Yes" to nearly everything; ranking its
    margins and splitting at the batch median removes that bias; with balanced batches it is fair)."""

    def __init__(self, chat_model: LocalChatModel | None = None) -> None:
        self.chat_model = chat_model or LocalChatModel()

    def __repr__(self) -> str:
        return f"LocalScorer({self.chat_model!r})"

    def predict(self, label: str, texts: Sequence[str]) -> list[bool]:
        margins = torch.tensor([self.chat_model.yes_logit_margin(DETECT_PROMPT.format(label=label, text=t.strip()))
                                for t in texts])
        return (margins > margins.median()).tolist()


