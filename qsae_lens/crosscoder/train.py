"""Train a crosscoder from aligned activation tensors (e.g. the sweep's caches of two precisions).

Loss per batch: ``sum_s ||x_s - x̂_s||² / ||x_s - mean(x_s)||²`` (normalised MSE per source) plus,
for BatchTopK, the aux-k loss (OpenAI's recipe: the ``k_aux`` largest pre-activations among dead
latents regress the main reconstruction's residual), or, for the L1 variant, Lindsey et al.'s
decoder-norm-weighted penalty ``λ · mean_t sum_i f_i(t) sum_s ||W_dec[i, s]||``.

Written by hand (SAELens's ``SAETrainer`` trains one-input SAEs; its ``TrainingSAE`` interface
takes ``Tensor[n, d_in]`` and has no per-source decoders): a plain Adam loop with the package's
habits — seeded initial weights and data order, cosine-free linear decay of the learning rate over
the last 20% of steps, gradient clipping, resumable checkpoints written atomically.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from qsae_lens._io import atomic_write_bytes, atomic_write_json, json_sha256
from qsae_lens.crosscoder.model import CrossCoder, CrossCoderConfig, SparseCodes, Sparsity, stack_sources

CHECKPOINT_SUFFIX = ".ckpt"


class TrainResult(NamedTuple):
    """What :func:`train_crosscoder_with_history` returns."""

    crosscoder: CrossCoder
    """The trained crosscoder (eval mode)."""
    loss_history: list[dict[str, float]]
    """Rows ``{"step", "loss", "mse", "aux"|"l1"}`` every ``record_every`` steps."""
    dead_fraction: float
    """Fraction of latents that did not fire in the last ``dead_steps`` steps."""


def _batch_indices(n: int, batch_size: int, step: int, seed: int) -> Tensor:
    """Row indices of batch ``step``: epoch ``e`` uses the permutation seeded by (seed, e), so a
    resumed run sees exactly the batches an uninterrupted one would (no RNG state to save)."""
    per_epoch = n // batch_size
    epoch, offset = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return perm[offset * batch_size:(offset + 1) * batch_size]


def _normalised_mse(x: Tensor, x_hat: Tensor) -> Tensor:
    """Σ_s ||x_s − x̂_s||² / ||x_s − mean(x_s)||² over a batch; x, x_hat Tensor[n, S, d]."""
    err = (x - x_hat).pow(2).sum(dim=(0, 2))
    var = (x - x.mean(0, keepdim=True)).pow(2).sum(dim=(0, 2)).clamp_min(1e-12)
    return (err / var).sum()


def _save_checkpoint(path: Path, model: CrossCoder, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    from safetensors.torch import save

    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    names = dict(model.named_parameters())
    for name, p in names.items():
        for key, value in opt.state.get(p, {}).items():
            tensors[f"opt.{name}.{key}"] = torch.as_tensor(value).detach().contiguous().cpu()
    tensors["tokens_since_fired"] = state.pop("tokens_since_fired").contiguous()
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path / "state.safetensors", save(tensors))
    atomic_write_json(path / "state.json", state)  # written last: it marks the checkpoint complete


def _load_checkpoint(path: Path, model: CrossCoder, opt: torch.optim.Optimizer, key: str) -> dict[str, Any] | None:
    from safetensors.torch import load_file

    try:
        state = json.loads((path / "state.json").read_text())
        tensors = load_file(path / "state.safetensors")
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if state.get("key") != key:
        return None  # a checkpoint of different settings/data: start over
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    for name, p in model.named_parameters():
        st = {k.split(".")[-1]: v for k, v in tensors.items() if k.startswith(f"opt.{name}.")}
        if st:
            opt.state[p] = st
    state["tokens_since_fired"] = tensors["tokens_since_fired"]
    return state


def train_crosscoder_with_history(
    sources: Sequence[Tensor],
    *,
    d_sae: int,
    k: int = 32,
    sparsity: Sparsity = "batchtopk",
    l1_coefficient: float = 1.0,
    steps: int = 2000,
    batch_size: int = 256,
    lr: float = 2e-3,
    aux_k: int | None = None,
    aux_coefficient: float = 1.0 / 32.0,
    dead_steps: int = 200,
    threshold_momentum: float = 0.99,
    seed: int = 0,
    source_names: Sequence[str] | None = None,
    metadata: dict[str, Any] | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 500,
    record_every: int = 20,
    progress: bool = False,
    sparse_decode: bool = True,
) -> TrainResult:
    """Train a crosscoder on S aligned sources and also return its loss curve (see :func:`train_crosscoder`)."""
    x_all = stack_sources(list(sources)).float()
    n, s, d = x_all.shape
    if n < batch_size:
        raise ValueError(f"need at least batch_size={batch_size} aligned rows, got {n}")
    if not torch.isfinite(x_all).all():
        raise ValueError("activations contain NaN or Inf values; refusing to train on them.")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    cfg = CrossCoderConfig(n_sources=s, d_in=d, d_sae=d_sae, k=k, sparsity=sparsity, l1_coefficient=l1_coefficient,
                           init_seed=seed, source_names=list(source_names or []), metadata=dict(metadata or {}))
    model = CrossCoder(cfg)
    with torch.no_grad():
        # normalisation: each source divided by its mean norm, so both weigh the same in the loss
        model.input_scale.copy_(x_all.norm(dim=-1).mean(0).clamp_min(1e-12))
        model.b_dec.copy_(x_all.mean(0) / model.input_scale[:, None])
    k_aux = aux_k if aux_k is not None else max(1, d // 2)
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999))
    decay_start = int(0.8 * steps)

    def lr_at(step: int) -> float:
        return lr if step < decay_start else lr * (steps - step) / max(1, steps - decay_start)

    tokens_since_fired = torch.zeros(d_sae, dtype=torch.long)
    history: list[dict[str, float]] = []
    start = 0
    ckpt: Path | None = None
    key = json_sha256({"cfg": asdict(cfg), "steps": steps, "batch_size": batch_size, "lr": lr, "aux_k": k_aux,
                       "aux_coefficient": aux_coefficient, "dead_steps": dead_steps, "n": n,
                       "data": [float(x_all[:64].sum()), float(x_all[-64:].sum()), float(x_all.norm())]})
    if out_dir is not None:
        out = Path(out_dir)
        ckpt = out.with_name(f".{out.name}{CHECKPOINT_SUFFIX}")
        state = _load_checkpoint(ckpt, model, opt, key)
        if state is not None:
            start, history = state["step"], state["history"]
            tokens_since_fired = state["tokens_since_fired"]

    from tqdm.auto import tqdm

    model.train()
    bar = tqdm(range(start, steps), desc="crosscoder", disable=not progress, initial=start, total=steps)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        x = x_all[_batch_indices(n, batch_size, step, seed)]
        xn = model.normalise(x)
        pre = model.pre_acts(xn)
        if sparsity == "batchtopk" and sparse_decode:
            # decode only the k·B kept activations (embedding_bag), as openai_topk does per token
            codes, min_kept = model.batch_topk_sparse(pre)
            x_hat = model.decode_sparse(codes) + model.b_dec
            fired = torch.bincount(codes.latents, minlength=d_sae) > 0
        else:
            if sparsity == "batchtopk":  # dense reference path (benchmarks, tests)
                f, min_kept = model.batch_topk(pre)
            else:
                f = pre
            x_hat = torch.einsum("nm,msd->nsd", f, model.W_dec) + model.b_dec
            fired = (f > 0).any(0)
        if sparsity == "batchtopk":
            with torch.no_grad():  # inference threshold: running mean of the smallest kept score
                if step == 0:
                    model.threshold.copy_(min_kept)
                else:
                    model.threshold.mul_(threshold_momentum).add_((1 - threshold_momentum) * min_kept)
        mse = _normalised_mse(xn, x_hat)
        loss = mse
        extra: dict[str, float] = {}
        tokens_since_fired = torch.where(fired, torch.zeros_like(tokens_since_fired), tokens_since_fired + batch_size)
        if sparsity == "l1":
            l1 = (f * model.W_dec.norm(dim=-1).sum(-1)).sum(-1).mean()
            loss = loss + l1_coefficient * l1
            extra["l1"] = float(l1.detach())
        elif aux_coefficient > 0:
            dead = tokens_since_fired > dead_steps * batch_size
            n_dead = int(dead.sum())
            if n_dead > 0:
                # aux-k: the dead latents' largest pre-activations regress the residual (OpenAI 2024)
                residual = (xn - x_hat).detach()
                dead_pre = pre * dead
                top = torch.topk(dead_pre, min(k_aux, n_dead), dim=-1)
                if sparse_decode:
                    aux_hat = model.decode_sparse(SparseCodes.from_topk(top.values, top.indices))
                else:
                    f_aux = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
                    aux_hat = torch.einsum("nm,msd->nsd", f_aux, model.W_dec)
                aux = _normalised_mse(residual, aux_hat).clamp(max=float(s))  # bounded: a bad aux step cannot dominate
                loss = loss + aux_coefficient * aux
                extra["aux"] = float(aux.detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % record_every == 0 or step + 1 == steps:
            history.append({"step": float(step + 1), "loss": float(loss.detach()), "mse": float(mse.detach()), **extra})
            bar.set_postfix(mse=f"{history[-1]['mse']:.4f}")
        if ckpt is not None and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            _save_checkpoint(ckpt, model, opt, {"key": key, "step": step + 1, "history": history,
                                               "tokens_since_fired": tokens_since_fired.clone()})
    model.eval()
    dead_fraction = float((tokens_since_fired > dead_steps * batch_size).float().mean())
    model.cfg.metadata = {**cfg.metadata, "steps": steps, "batch_size": batch_size, "lr": lr,
                          "dead_fraction": dead_fraction, "normalisation": "each source / its mean training norm"}
    if out_dir is not None:
        model.save(out_dir)
        atomic_write_json(Path(out_dir) / "loss_history.json", history)
        if ckpt is not None:
            shutil.rmtree(ckpt, ignore_errors=True)
    return TrainResult(model, history, dead_fraction)


def train_crosscoder(sources: Sequence[Tensor], *, d_sae: int, k: int = 32, **kwargs: Any) -> CrossCoder:
    """A crosscoder trained on S aligned sources (each ``Tensor[n, d]``: same tokens, same order).

    Why: one dictionary for both models gives every latent a decoder per model, so "which features
    does quantization create or destroy" is read off the decoder norms (:func:`diff_latents`)
    instead of being inferred by matching two separately trained, seed-noisy SAEs.

    ``sparsity="batchtopk"`` (default) keeps ``k * batch`` activations per batch and learns an
    inference threshold; ``sparsity="l1"`` is the L1 variant (``l1_coefficient``) kept for
    comparison. Keyword options: ``steps``, ``batch_size``, ``lr``, ``aux_k``, ``aux_coefficient``,
    ``dead_steps``, ``seed`` (initial weights and data order), ``source_names``, ``metadata``,
    ``out_dir`` (saved there atomically; an interrupted run resumes from its last checkpoint, every
    ``checkpoint_every`` steps), ``progress`` (tqdm), ``sparse_decode`` (default True: decode only
    the kept latents with ``embedding_bag``; False: the dense reference matmul, same maths).
    Each source is divided by its mean norm.
    """
    return train_crosscoder_with_history(sources, d_sae=d_sae, k=k, **kwargs).crosscoder


def explained_variance(model: CrossCoder, sources: Sequence[Tensor], *, block: int = 4096) -> Tensor:
    """Tensor[S]: 1 − Σ||x_s − x̂_s||² / Σ||x_s − mean(x_s)||² per source (inference rule, raw units),
    in blocks of ``block`` rows; one :class:`qsae_lens.metrics.ExplainedVariance` per source."""
    from qsae_lens.metrics import ExplainedVariance

    x_all = stack_sources(list(sources)).float()
    evs = [ExplainedVariance() for _ in range(x_all.shape[1])]
    with torch.no_grad():
        for i in range(0, x_all.shape[0], block):
            x = x_all[i:i + block]
            x_hat = model(x)
            for s, ev in enumerate(evs):
                ev.update(x[:, s], x_hat[:, s])
    return torch.tensor([ev.compute() for ev in evs], dtype=torch.float32)

