"""Calibrated 4-bit methods, written from the papers: GPTQ (``gptq-w{b}``) and AWQ (``awq-w{b}``).

Why by hand: measured with ``pip install --dry-run`` against this environment's pins (docs/precisions.md):
gptqmodel 7.7 pulls torch 2.14.1 and the CUDA 13 stack; llmcompressor 0.14 pins
transformers <= 5.17 (we run 5.25); auto-round 0.16 resolves but implements AutoRound (signed
gradient descent), not GPTQ or AWQ. So both published algorithms are implemented here, on the
same group quantizer as RTN (symmetric absmax, group 128 along the input dimension, see
:mod:`qsae_lens.precision.rtn`), which makes "GPTQ/AWQ beat RTN at the same width" a like-for-like test.

Calibration: ``n_windows`` x ``context_size`` BOS-led windows from the corpus's *train* documents
(:func:`qsae_lens.corpus.tokenize_corpus_splits`, document-disjoint from the held-out windows the
sweep evaluates on). One forward pass over all of them; every decoder ``nn.Linear`` is quantized
inside its forward hook as the pass reaches it, and the hook returns the *quantized* layer's
output, so later layers calibrate on the inputs the quantized model really produces (GPTQ's
sequential order). Layers sharing an input (q/k/v; gate/up) share one Hessian / statistic.

* **GPTQ** (Frantar et al. 2022, Alg. 1): ``H = 2 X^T X / n`` from the layer's inputs, damped by
  ``0.01 * mean(diag H)``; ``U = chol(H^-1)`` (upper); columns quantized left to right, each
  column's error ``(w - q) / U_jj`` spread over the remaining columns of its 128-column block
  through ``U[j, j:]``, and blocks updated lazily (one matmul per block). Group scales are fixed
  from the *updated* weights when a group starts. No act-order.
* **AWQ** (Lin et al. 2023, Sec. 3.2-3.3): per input channel ``s = mean|x|^alpha``, normalised by
  ``sqrt(max s * min s)``; ``alpha`` from a grid of 20 on [0, 1) minimising the layer output
  error ``|| X W^T - X (Q(W diag s) diag s^-1)^T ||^2`` on a token subsample; the weight is then
  ``Q(W diag s) diag s^-1``. A deployed AWQ checkpoint folds ``s^-1`` into the preceding RMSNorm
  / linear; here it stays in the fake-quantized float weight, which computes the same function
  in exact arithmetic. Not implemented: AWQ's weight-clipping search, and one joint ``s`` per
  shared-input group (each layer searches its own).

Results are cached under ``<qsae_lens cache>/quantized/`` keyed by the source weights' hash, the
method and the calibration windows' hash, as integer codes + scales (safetensors).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from qsae_lens.precision.registry import (
    MethodFamily,
    MethodSpec,
    QuantContext,
    decoder_linears,
    register_family,
    single_thread,
)
from qsae_lens.precision.rtn import (
    DEFAULT_GROUP_SIZE,
    GroupQuantized,
    group_params,
    quantize_with,
    rtn_quantize,
)

#: Bump when the algorithms change: part of the cache key.
ALGORITHM_VERSION = 1
CALIBRATION_WINDOWS = 16
CALIBRATION_CONTEXT = 128
GPTQ_DAMP = 0.01
GPTQ_BLOCK = 128
AWQ_GRID = 20
AWQ_MAX_TOKENS = 256
_NAME = re.compile(r"^(gptq|awq)-w(\d+)(?:-g(\d+))?$")


class CalibratedWeight(NamedTuple):
    """One layer's result: integer codes and group scales, and AWQ's per-input-channel scale."""

    codes: GroupQuantized
    col_scale: torch.Tensor | None
    """Tensor[in] float32 AWQ scale ``s`` (the weight is ``Q(W diag s) diag s^-1``), None for GPTQ."""

    def dequantize(self) -> torch.Tensor:
        """Tensor[out, in] float32: the weight the fake-quantized layer computes with."""
        w = self.codes.dequantize()
        return w if self.col_scale is None else w / self.col_scale


def gptq_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int = DEFAULT_GROUP_SIZE,
    symmetric: bool = True,
    damp: float = GPTQ_DAMP,
    block_size: int = GPTQ_BLOCK,
) -> GroupQuantized:
    """GPTQ codes of ``w: Tensor[out, in]`` given ``hessian: Tensor[in, in]`` (``2 X^T X / n``).

    Memory: a few ``[out, in]`` and ``[in, in]`` float32 copies. Python loop over columns (the
    algorithm is sequential in them); each step is a rank-1 update of one ``[out, block]`` slice.
    """
    W = w.detach().float().clone()
    out, cols = W.shape
    H = hessian.detach().float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=H.dtype, device=H.device)
    L = torch.linalg.cholesky(H)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    Q = torch.zeros(out, cols, dtype=torch.int16, device=W.device)
    n_groups = math.ceil(cols / group_size)
    scales = torch.zeros(out, n_groups, device=W.device)
    zeros = torch.zeros(out, n_groups, device=W.device) if not symmetric else None
    scale = zero = None
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % group_size == 0:
                g = col // group_size
                # group parameters from the weights as updated so far (this block's columns from W1)
                grp = torch.cat([W1[:, i:], W[:, i2:]], 1)[:, :group_size]
                scale, zero = group_params(grp, bits, symmetric)
                scales[:, g] = scale[:, 0]
                if zeros is not None and zero is not None:
                    zeros[:, g] = zero[:, 0]
            wcol = W1[:, i : i + 1]
            q = quantize_with(wcol, scale, zero, bits)
            Q[:, col] = q[:, 0].to(torch.int16)
            deq = (q - zero) * scale if zero is not None else q * scale
            err = (wcol - deq) / Hinv1[i, i]
            W1[:, i:] -= err @ Hinv1[i : i + 1, i:]
            Err1[:, i : i + 1] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return GroupQuantized(q=Q, scale=scales, zero=zeros, group_size=group_size)


def awq_search(
    w: torch.Tensor,
    x: torch.Tensor,
    x_abs_mean: torch.Tensor,
    bits: int,
    group_size: int = DEFAULT_GROUP_SIZE,
    symmetric: bool = True,
    n_grid: int = AWQ_GRID,
) -> CalibratedWeight:
    """AWQ's scale search for ``w: Tensor[out, in]`` on inputs ``x: Tensor[n, in]``.

    ``x_abs_mean: Tensor[in]`` is ``mean |x|`` over *all* calibration tokens; ``x`` may be a
    subsample (the loss only ranks the grid). Memory: ``[n, out]`` outputs twice plus ``[out, in]``.
    """
    w = w.detach().float()
    y = x @ w.T
    best: tuple[float, CalibratedWeight] | None = None
    for k in range(n_grid):
        alpha = k / n_grid
        s = x_abs_mean.pow(alpha).clamp(min=1e-4)
        s = s / torch.sqrt(s.max() * s.min())
        codes = rtn_quantize(w * s, bits, group_size, symmetric)
        cand = CalibratedWeight(codes, s)
        err = float(((x @ cand.dequantize().T - y) ** 2).mean())
        if best is None or err < best[0]:
            best = (err, cand)
    assert best is not None
    return best[1]


def calibration_windows(tokenizer: Any, n_windows: int = CALIBRATION_WINDOWS, context_size: int = CALIBRATION_CONTEXT, seed: int = 0) -> torch.Tensor:
    """Tensor[n_windows, context_size] int64: BOS-led windows from the corpus's train documents
    (document-disjoint from the held-out windows of the same split)."""
    from qsae_lens.corpus import tokenize_corpus_splits

    splits = tokenize_corpus_splits(tokenizer, context_size=context_size, max_windows=n_windows, max_eval_windows=1, seed=seed)
    ids = torch.tensor(splits["train"]["input_ids"][:n_windows], dtype=torch.long)
    if ids.shape[0] < n_windows:
        raise ValueError(f"the corpus gave only {ids.shape[0]} calibration windows, {n_windows} were asked for")
    return ids


def calibrate(model: torch.nn.Module, spec: MethodSpec, windows: torch.Tensor) -> dict[str, CalibratedWeight]:
    """Quantize every decoder linear of ``model`` with GPTQ or AWQ in one sequential forward pass
    over ``windows: Tensor[n, ctx]`` (see the module docstring); returns the results by layer name,
    leaving the model's weights untouched."""
    from tqdm.auto import tqdm

    bits, group, sym = int(spec.bits or 4), int(spec.group_size or DEFAULT_GROUP_SIZE), bool(spec.symmetric)
    linears = decoder_linears(model)
    results: dict[str, CalibratedWeight] = {}
    shared: dict[str, Any] = {"key": None}
    bar = tqdm(total=len(linears), desc=f"{spec.name} calibration", leave=False)

    def stats(x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Hessian / statistics of one input tensor, computed once for the layers that share it."""
        key = (x.data_ptr(), tuple(x.shape))
        if shared["key"] != key:
            flat = x.reshape(-1, x.shape[-1]).float()
            if spec.method == "gptq":
                shared["value"] = {"H": 2.0 * flat.T @ flat / flat.shape[0]}
            else:
                gen = torch.Generator().manual_seed(0)
                idx = torch.randperm(flat.shape[0], generator=gen)[:AWQ_MAX_TOKENS]
                shared["value"] = {"mean": flat.abs().mean(0), "sub": flat[idx.to(flat.device)]}
            shared["key"] = key
        return shared["value"]

    def make_hook(name: str) -> Any:
        def hook(module: torch.nn.Linear, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            st = stats(inputs[0])
            with single_thread():  # many tiny ops: see registry.single_thread
                if spec.method == "gptq":
                    res = CalibratedWeight(gptq_quantize(module.weight, st["H"], bits, group, sym), None)
                else:
                    res = awq_search(module.weight, st["sub"], st["mean"], bits, group, sym)
            results[name] = res
            bar.update(1)
            w_hat = res.dequantize().to(module.weight.dtype)
            return F.linear(inputs[0], w_hat, module.bias)

        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in linears.items()]
    try:
        with torch.no_grad():
            model(windows.to(next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
        bar.close()
    missing = set(linears) - set(results)
    if missing:
        raise RuntimeError(f"calibration never reached {len(missing)} layers, e.g. {sorted(missing)[0]}")
    return results


def _save(results: dict[str, CalibratedWeight], path: Path) -> None:
    from safetensors.torch import save

    from qsae_lens._io import atomic_write_bytes

    tensors: dict[str, torch.Tensor] = {}
    for name, r in results.items():
        tensors[f"{name}.q"] = r.codes.q.to(torch.int8).contiguous()
        tensors[f"{name}.scale"] = r.codes.scale.contiguous()
        if r.codes.zero is not None:
            tensors[f"{name}.zero"] = r.codes.zero.contiguous()
        if r.col_scale is not None:
            tensors[f"{name}.col_scale"] = r.col_scale.contiguous()
    atomic_write_bytes(path, save(tensors, metadata={"group_size": str(next(iter(results.values())).codes.group_size)}))


def _load(path: Path) -> dict[str, CalibratedWeight]:
    from safetensors import safe_open

    out: dict[str, CalibratedWeight] = {}
    with safe_open(str(path), "pt") as f:
        group = int(f.metadata()["group_size"])
        keys = set(f.keys())
        for name in sorted(k.removesuffix(".q") for k in keys if k.endswith(".q")):
            zero = f.get_tensor(f"{name}.zero") if f"{name}.zero" in keys else None
            col = f.get_tensor(f"{name}.col_scale") if f"{name}.col_scale" in keys else None
            codes = GroupQuantized(f.get_tensor(f"{name}.q").to(torch.int16), f.get_tensor(f"{name}.scale"), zero, group)
            out[name] = CalibratedWeight(codes, col)
    return out


def calibrated_weights(model: torch.nn.Module, spec: MethodSpec, ctx: QuantContext) -> tuple[dict[str, CalibratedWeight], dict[str, Any]]:
    """The layer results for ``spec`` on this model, from the cache when the same source weights,
    method and calibration windows were quantized before; plus the metadata describing them."""
    from qsae_lens._io import json_sha256
    from qsae_lens.assets import cache_dir

    windows = calibration_windows(ctx.tokenizer)
    calib_hash = json_sha256(windows.tolist())
    key = json_sha256(
        {"weights": ctx.weights_sha256, "spec": spec.name, "calibration": calib_hash, "version": ALGORITHM_VERSION}
    )
    path = cache_dir() / "quantized" / f"{spec.name}-{key[:20]}.safetensors"
    meta = {
        "calibration": f"corpus stdlib train split, {windows.shape[0]} windows x {windows.shape[1]} tokens, seed 0",
        "calibration_sha256": calib_hash,
    }
    if path.exists():
        return _load(path), meta
    results = calibrate(model, spec, windows)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(results, path)
    return results, meta


class CalibratedFamily(MethodFamily):
    """``gptq-w{2..8}[-g{N}]`` and ``awq-w{2..8}[-g{N}]``: calibrated, fake-quantized, any device."""

    def __init__(self, method: str) -> None:
        self.family = method
        self.examples = (f"{method}-w4", f"{method}-w{{2..8}}[-g{{N}}]")

    def parse(self, key: str) -> MethodSpec | None:
        m = _NAME.match(key)
        if m is None or m.group(1) != self.family:
            return None
        bits, group = int(m.group(2)), int(m.group(3) or DEFAULT_GROUP_SIZE)
        if not 2 <= bits <= 8:
            raise ValueError(f"Precision {key!r}: bits must be 2..8, got {bits}.")
        name = f"{self.family}-w{bits}" + ("" if group == DEFAULT_GROUP_SIZE else f"-g{group}")
        return MethodSpec(
            name=name,
            family=self.family,
            method=self.family,
            bits=bits,
            quant_type=f"{self.family}-int{bits}-g{group}-sym",
            group_size=group,
            symmetric=True,
            fake_quant=True,
        )

    def after_load(self, model: torch.nn.Module, spec: MethodSpec, ctx: QuantContext) -> dict[str, Any]:
        results, meta = calibrated_weights(model, spec, ctx)
        linears = decoder_linears(model)
        if set(results) != set(linears):
            raise RuntimeError(f"cached {spec.name} weights do not match this model's layers; delete the cache file")
        with torch.no_grad():
            for name, layer in linears.items():
                layer.weight.data.copy_(results[name].dequantize().to(layer.weight.dtype))
        return meta


register_family(CalibratedFamily("gptq"))
register_family(CalibratedFamily("awq"))

