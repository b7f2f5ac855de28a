"""HookedQuantizedLM.generate against Hugging Face's own generate, and hooks under the KV cache."""

from __future__ import annotations

import pytest
import torch

PROMPTS = ["def add(a, b):", "The capital of France is a city that"]


@pytest.fixture(scope="module", params=["fp32", "nf4"])
def model(request, smollm2_path):
    from qsae_lens.models import load_model

    return load_model(smollm2_path, request.param, "cpu")


def test_greedy_equals_hf_generate_batched(model):
    """Left-padded batch, no hooks: token for token what HF generate(do_sample=False) produces."""
    n_new = 5
    ours = model.generate(PROMPTS, max_new_tokens=n_new, do_sample=False, prepend_bos=False,
                          stop_at_eos=False, return_type="tokens")
    enc = model.tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    ref = model.hf_model.generate(**enc, max_new_tokens=n_new, do_sample=False,
                                  pad_token_id=model.tokenizer.pad_token_id)
    assert ours.shape == ref.shape
    assert torch.equal(ours, ref)


def test_hooks_apply_to_prefix_and_every_step(model):
    """With a hook that adds a vector to a residual stream, cached generation equals recomputing the
    whole sequence each step (no cache): the hook reached the cached prefix and each new token."""
    if model.precision.name != "fp32":
        pytest.skip("hook routing is precision independent; nf4 is covered by the HF equality test")
    g = torch.Generator().manual_seed(0)
    v = torch.randn(model.cfg.d_model, generator=g) * 8.0

    def add(resid, hook):  # noqa: ARG001
        return resid + v.to(resid.dtype)

    with model.hooks(fwd_hooks=[("blocks.3.hook_resid_post", add)]):
        cached = model.generate(PROMPTS[1], max_new_tokens=4, do_sample=False, return_type="tokens")
        full = model.generate(PROMPTS[1], max_new_tokens=4, do_sample=False, return_type="tokens",
                              use_past_kv_cache=False)
    plain = model.generate(PROMPTS[1], max_new_tokens=4, do_sample=False, return_type="tokens")
    assert torch.equal(cached, full)
    assert not torch.equal(cached, plain)  # the hook did change the text


def test_sampling_seeded_and_strings(model):
    if model.precision.name != "fp32":
        pytest.skip("sampling logic is precision independent")
    a = model.generate("Once upon a time", max_new_tokens=4, seed=3, top_k=20, top_p=0.9)
    b = model.generate("Once upon a time", max_new_tokens=4, seed=3, top_k=20, top_p=0.9)
    assert isinstance(a, str) and a == b and a.startswith("<|im_start|>Once upon a time")
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate("x", max_new_tokens=-1)
