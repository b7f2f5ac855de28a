"""The quantization method registry: RTN and GGUF bit for bit against independent implementations,
every fake-quantized family under the wrapper, RTN's cost falling with bits, GPTQ/AWQ beating RTN.

Budget: one fp32 load of the default model (the fake-quantized families rewrite its decoder
weights in place and restore them), plus one ``load_model`` for the end-to-end path. The GPTQ/AWQ
held-out CE test is ``slow`` (calibration from scratch on a fresh machine); their weights come from
the qsae_lens cache after the first computation.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qsae_lens.precision import PRECISION_METADATA_KEYS, parse_precision, registered_names
from qsae_lens.precision.gguf import gguf_fake_quantize
from qsae_lens.precision.rtn import rtn_fake_quantize

# ------------------------------------------------------------------ independent references


def numpy_rtn(w: np.ndarray, bits: int, group: int, symmetric: bool) -> np.ndarray:
    """The issue's formula, one group at a time in float32 NumPy (written apart from rtn.py)."""
    w = w.astype(np.float32)
    out = np.empty_like(w)
    for start in range(0, w.shape[1], group):
        g = w[:, start : start + group]
        if symmetric:
            qmax = np.float32(2 ** (bits - 1) - 1)
            s = np.max(np.abs(g), axis=1, keepdims=True) / qmax
            s[s == 0] = 1
            q = np.clip(np.round(g / s), -qmax - 1, qmax)
            out[:, start : start + group] = q * s
        else:
            levels = np.float32(2**bits - 1)
            lo, hi = g.min(axis=1, keepdims=True), g.max(axis=1, keepdims=True)
            s = (hi - lo) / levels
            s[s == 0] = 1
            z = np.round(-lo / s)
            q = np.clip(np.round(g / s) + z, 0, levels)
            out[:, start : start + group] = (q - z) * s
    return out


def q8_0_by_hand(w: np.ndarray) -> np.ndarray:
    """GGML Q8_0 decoded from its byte layout: per 32 weights, an fp16 scale d then 32 int8 codes,
    value = d * q. The bytes come from gguf's quantizer; the decoding here is independent of it."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    raw = quantize(w.astype(np.float32), GGMLQuantizationType.Q8_0).reshape(-1, 34)
    d = raw[:, :2].copy().view(np.float16).astype(np.float32)  # [blocks, 1]
    q = raw[:, 2:].copy().view(np.int8).astype(np.float32)  # [blocks, 32]
    return (d * q).reshape(w.shape)


def _weights(rows: int = 40, cols: int = 576, seed: int = 0) -> torch.Tensor:
    """Gaussian weights with a few large outliers and one all-zero group (the edge cases)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[torch.rand(rows, cols, generator=g) < 0.01] *= 20
    w[3, :32] = 0
    return w


# ------------------------------------------------------------------ bit-for-bit


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group", [32, 128, 100])
@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_equals_numpy_formula_bit_for_bit(bits: int, group: int, symmetric: bool) -> None:
    w = _weights(seed=bits * 7 + group)
    ours = rtn_fake_quantize(w, bits, group, symmetric).numpy()
    ref = numpy_rtn(w.numpy(), bits, group, symmetric)
    assert np.array_equal(ours, ref), f"max diff {np.abs(ours - ref).max()}"
    # and it is a real quantizer: at most 2^bits distinct values per group of a row
    assert len(np.unique(ours[0, :group])) <= 2**bits


def test_gguf_q8_0_equals_its_byte_layout() -> None:
    w = _weights()
    assert np.array_equal(gguf_fake_quantize(w, "Q8_0").numpy(), q8_0_by_hand(w.numpy()))


# ------------------------------------------------------------------ names and metadata


def test_names_resolve_and_error_lists_every_family() -> None:
    assert parse_precision("RTN-W4-G128").name == "rtn-w4"
    spec = parse_precision("rtn-w3-g64-asym").spec
    assert (spec.bits, spec.group_size, spec.symmetric, spec.fake_quant) == (3, 64, False, True)
    assert parse_precision("gguf-q8_0").quant_type == "Q8_0"
    assert parse_precision("gptq-w4").spec.method == "gptq" and parse_precision("awq-w4").bits == 4
    assert parse_precision("nf4").is_bnb and not parse_precision("rtn-w4").is_bnb
    with pytest.raises(ValueError, match="Valid precisions: fp32, fp16, bf16, int8, nf4, nf4-dq, fp4") as err:
        parse_precision("int3")
    for name in registered_names():
        assert name in str(err.value)
    assert any(n.startswith("hqq") for n in registered_names()) and any(n.startswith("torchao") for n in registered_names())
    with pytest.raises(ValueError, match="not quantize"):
        parse_precision("gguf-q4_k")
    with pytest.raises(ValueError, match="2..8"):
        parse_precision("rtn-w9")
    for name in ("fp32", "nf4", "rtn-w4", "gguf-q4_0", "gptq-w4"):
        meta = parse_precision(name).metadata()
        assert list(meta) == list(PRECISION_METADATA_KEYS[:5]) + [k for k in PRECISION_METADATA_KEYS[7:]]


# ------------------------------------------------------------------ on the default model


@pytest.fixture(scope="module")
def fp32_model(smollm2_path):
    from qsae_lens.models import load_model

    return load_model(smollm2_path, "fp32", "cpu")


@pytest.fixture(scope="module")
def heldout(fp32_model) -> torch.Tensor:
    """Tensor[8, 128]: held-out windows (document-disjoint from the calibration windows)."""
    from qsae_lens.corpus import tokenize_corpus_splits

    splits = tokenize_corpus_splits(fp32_model.tokenizer, context_size=128, max_windows=1, max_eval_windows=8)
    return torch.tensor(splits["test"]["input_ids"], dtype=torch.long)


def _held_out_ce(fp32_model, heldout, smollm2_path, names: list[str]) -> dict[str, tuple[float, list[str]]]:
    """name -> (held-out CE, names of hooks that fired), quantizing the shared fp32 model in place."""
    from transformers import AutoTokenizer

    from qsae_lens.models.loading import weights_sha256
    from qsae_lens.precision import QuantContext, decoder_linears

    hf = fp32_model.model
    linears = decoder_linears(hf)
    original = {n: m.weight.detach().clone() for n, m in linears.items()}
    ctx = QuantContext(
        smollm2_path, weights_sha256(sorted(smollm2_path.glob("*.safetensors"))), "cpu", AutoTokenizer.from_pretrained(smollm2_path)
    )
    out = {}
    for name in names:
        prec = parse_precision(name)
        if name != "fp32":
            prec.family.after_load(hf, prec.spec, ctx)
        with torch.no_grad():
            loss, cache = fp32_model.run_with_cache(heldout, return_type="loss", names_filter=lambda n: n.endswith("hook_resid_post"))
        out[name] = (float(loss), sorted(cache.keys()))
        with torch.no_grad():
            for n, m in linears.items():
                m.weight.copy_(original[n])
    return out


@pytest.fixture(scope="module")
def quantized_ce(fp32_model, heldout, smollm2_path):
    """The uncalibrated families (no calibration pass: cheap on a fresh machine)."""
    names = ["fp32", "rtn-w8", "rtn-w5", "rtn-w4", "rtn-w3", "rtn-w4-g64-asym", "gguf-q8_0", "gguf-q4_0"]
    return _held_out_ce(fp32_model, heldout, smollm2_path, names)


def test_every_fake_quantized_family_runs_under_the_wrapper(quantized_ce, fp32_model) -> None:
    expected = sorted(f"blocks.{i}.hook_resid_post" for i in range(fp32_model.cfg.n_layers))
    for name, (ce, hooks) in quantized_ce.items():
        assert np.isfinite(ce), name
        assert hooks == expected, name


def test_rtn_cost_falls_as_bits_rise(quantized_ce) -> None:
    base = quantized_ce["fp32"][0]
    cost = {b: quantized_ce[f"rtn-w{b}"][0] - base for b in (8, 5, 4, 3)}
    assert abs(cost[8]) < cost[5] < cost[3], cost
    assert cost[5] < cost[4] < cost[3], cost


@pytest.mark.slow
def test_calibrated_methods_beat_rtn_at_4_bits(fp32_model, heldout, smollm2_path) -> None:
    """The published property of GPTQ and AWQ: lower held-out CE than RTN at the same width and grouping.

    Slow: on a fresh machine (empty qsae_lens cache) GPTQ's and AWQ's calibration passes over the
    default model take minutes (300+ s measured under load); later runs read the cached weights. The
    default suite keeps the property on planted problems (``test_gptq_reduces_to_rtn_...``,
    ``test_awq_never_worse_...``)."""
    ce = _held_out_ce(fp32_model, heldout, smollm2_path, ["rtn-w4", "gptq-w4", "awq-w4"])
    expected = sorted(f"blocks.{i}.hook_resid_post" for i in range(fp32_model.cfg.n_layers))
    assert all(np.isfinite(loss) and hooks == expected for loss, hooks in ce.values()), ce
    rtn = ce["rtn-w4"][0]
    assert ce["gptq-w4"][0] < rtn, ce
    assert ce["awq-w4"][0] < rtn, ce


def test_load_model_applies_gguf_as_gguf_would(smollm2_path, fp32_model) -> None:
    """End to end: the loaded layer holds gguf's own dequantization of the fp32 layer, and the
    metadata says what was done."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    from qsae_lens.models import load_model

    model = load_model(smollm2_path, "gguf-q4_1", "cpu", num_hidden_layers=2)
    w32 = fp32_model.model.model.layers[1].mlp.down_proj.weight.detach().numpy()
    ref = dequantize(quantize(w32, GGMLQuantizationType.Q4_1), GGMLQuantizationType.Q4_1)
    assert np.array_equal(model.model.model.layers[1].mlp.down_proj.weight.detach().numpy(), ref)
    assert torch.equal(model.model.lm_head.weight, fp32_model.model.lm_head.weight)  # LM head stays
    meta = model.precision_metadata
    assert meta["quant_method"] == "gguf" and meta["fake_quant"] is True and meta["quant_library_version"]


def test_bitwidth_step_tolerates_absent_data(tmp_path) -> None:
    """A sweep with no transfer/comparison/survival results yet: every panel skipped with a reason."""
    from types import SimpleNamespace

    from qsae_lens.sweep.steps import bitwidth

    plan = SimpleNamespace(baseline="fp32", precision_names=["fp32", "rtn-w4", "gptq-w4"], layers=[3], seeds=[0],
                           step_dir=lambda name: tmp_path / name)
    result = bitwidth.run_step(plan, SimpleNamespace(transfer=None, comparisons=None))
    assert [r["bits"] for r in result.rows] == [32, 4, 4] and set(result.skipped) == set(bitwidth.PANELS)
    assert "add it to --analyses" in result.skipped["survived"]
    section = bitwidth.report_section(result)
    assert section.key == "bitwidth" and "rtn-w4" in section.markdown


@pytest.mark.parametrize("name, module", [("quanto-int8", "optimum.quanto"), ("torchao-int8wo", "torchao")])
def test_library_methods_run_under_the_wrapper(smollm2_path, heldout, name, module) -> None:
    """quanto / torchao keep their own quantized layers; the wrapper's hooks and loss still work
    (2 decoder layers keep it cheap), and the LM head stays an ordinary float Linear."""
    pytest.importorskip(module)
    from qsae_lens.models import load_model

    model = load_model(smollm2_path, name, "cpu", num_hidden_layers=2)
    down = model.model.model.layers[0].mlp.down_proj
    assert type(down).__name__ == "QLinear" or type(down.weight).__name__ == "Int8Tensor"
    assert type(model.model.lm_head) is torch.nn.Linear and type(model.model.lm_head.weight) is torch.nn.Parameter
    with torch.no_grad():
        loss, cache = model.run_with_cache(heldout[:2], return_type="loss")
    assert np.isfinite(float(loss)) and "blocks.1.hook_mlp_out" in cache
    assert model.precision_metadata["quant_library_version"]


def test_missing_extra_is_named(monkeypatch) -> None:
    import importlib.util

    from qsae_lens.precision import check_precision_runs_on

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "optimum.quanto" else real(n, *a))
    with pytest.raises(RuntimeError, match=r"qsae_lens\[quanto\]"):
        check_precision_runs_on(parse_precision("quanto-int4"), "cpu")


def test_gptq_reduces_to_rtn_for_uncorrelated_inputs_and_beats_it_otherwise() -> None:
    """With a diagonal Hessian GPTQ has no other column to push the error onto: it is RTN exactly.
    With correlated inputs it lowers the layer's output error ||X (W - W_hat)^T|| (its objective)."""
    from qsae_lens.precision.calibrated import gptq_quantize
    from qsae_lens.precision.rtn import rtn_quantize

    w = _weights(rows=32, cols=256)
    for bits in (3, 4):
        ours = gptq_quantize(w, torch.eye(256) * 2.0, bits, group_size=64).dequantize()
        assert torch.equal(ours, rtn_quantize(w, bits, 64).dequantize())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2048, 16, generator=g) @ torch.randn(16, 256, generator=g) + 0.1 * torch.randn(2048, 256, generator=g)
    h = 2 * x.T @ x / x.shape[0]
    err_gptq = (x @ (w - gptq_quantize(w, h, 4, 64).dequantize()).T).norm()
    err_rtn = (x @ (w - rtn_quantize(w, 4, 64).dequantize()).T).norm()
    assert err_gptq < 0.8 * err_rtn, (float(err_gptq), float(err_rtn))


def test_awq_never_worse_than_rtn_on_its_objective() -> None:
    """alpha = 0 on AWQ's grid is plain RTN, so the chosen scale's output error is at most RTN's;
    with a few high-magnitude input channels (AWQ's premise) it is strictly lower."""
    from qsae_lens.precision.calibrated import awq_search
    from qsae_lens.precision.rtn import rtn_quantize

    w = _weights(rows=64, cols=256)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(512, 256, generator=g)
    x[:, :8] *= 30  # salient channels
    res = awq_search(w, x, x.abs().mean(0), 4, 64)
    err_awq = ((x @ (w - res.dequantize()).T) ** 2).mean()
    err_rtn = ((x @ (w - rtn_quantize(w, 4, 64).dequantize()).T) ** 2).mean()
    assert err_awq < err_rtn and not torch.all(res.col_scale == 1)
