"""``probe_sweep``: probes per (precision, layer, task) on residual activations and SAE codes.

For every precision the model reads each task's windows once (all layers hooked in one forward
pass, stopped after the deepest layer); the rows' residuals are probed (:func:`train_probe`, with
the control task), and, when an SAE is given for a layer, so are its codes, with sparse probing by
k and the rank overlap of each precision's top latents with the baseline precision's. One SAE per
layer is applied to every precision's residuals, so latent indices mean the same thing across
precisions (that is what makes "are the top latents still the top latents at nf4?" answerable).

Memory: per precision, ``rows x d_model`` float32 per (task, layer), plus ``rows x d_sae`` for
the codes of the (task, layer) being probed. Models given by path are loaded one at a time.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from qsae_lens.probing.probes import CI_UNIT, DEFAULT_KS, rank_overlap, sparse_probe, top_latents, train_probe
from qsae_lens.probing.tasks import BUILTIN_TASKS, TaskData, build_task

FP32_NOTE = ("The embedded SmolLM2-135M-Instruct 'fp32' is dequantized from a Q4_1 GGUF: it already went "
             "through 4-bit quantization once.")


class ProbeRow(NamedTuple):
    """One probe: a task at a (precision, layer) on ``source`` ("resid" or "sae") features."""

    task: str
    precision: str
    layer: int
    source: str
    accuracy: float
    accuracy_ci: tuple[float, float]
    control_accuracy: float
    control_ci: tuple[float, float]
    selectivity: float
    selectivity_ci: tuple[float, float]
    chance: float
    """Share of the most frequent class (1/C: the tasks are balanced)."""
    n: int


class SparseRow(NamedTuple):
    """Sparse-probing accuracy with the k best SAE latents (chosen on training folds only)."""

    task: str
    precision: str
    layer: int
    k: int
    accuracy: float
    accuracy_ci: tuple[float, float]


class OverlapRow(NamedTuple):
    """|top-k latents at ``precision`` ∩ top-k at the baseline| / k, same SAE, same task and layer."""

    task: str
    precision: str
    layer: int
    k: int
    overlap: float


@dataclass
class ProbeSweepResult:
    """Everything :func:`probe_sweep` measured, as lists of typed rows (``to_json`` / ``from_json``)."""

    probes: list[ProbeRow]
    sparse: list[SparseRow] = field(default_factory=list)
    overlap: list[OverlapRow] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    """precisions, layers, tasks, baseline, n_examples, cv, l2, seed, ci_unit, model, note."""

    def __repr__(self) -> str:
        return (f"ProbeSweepResult({len(self.probes)} probes, {len(self.sparse)} sparse, {len(self.overlap)} overlaps; "
                f"tasks={self.settings.get('tasks')}, precisions={self.settings.get('precisions')}, "
                f"layers={self.settings.get('layers')})")

    def probe(self, task: str, precision: str, layer: int, source: str = "resid") -> ProbeRow:
        """The row of one probe (KeyError if it was not run)."""
        for r in self.probes:
            if (r.task, r.precision, r.layer, r.source) == (task, precision, layer, source):
                return r
        raise KeyError((task, precision, layer, source))

    def to_json(self) -> dict[str, Any]:
        return {"settings": self.settings, "probes": [r._asdict() for r in self.probes],
                "sparse": [r._asdict() for r in self.sparse], "overlap": [r._asdict() for r in self.overlap]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ProbeSweepResult:
        def rows(kind: type, items: list[dict[str, Any]]) -> list[Any]:
            return [kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in it.items()}) for it in items]

        return cls(rows(ProbeRow, data["probes"]), rows(SparseRow, data["sparse"]),
                   rows(OverlapRow, data["overlap"]), dict(data["settings"]))

    @classmethod
    def load(cls, path: Any) -> ProbeSweepResult:
        from pathlib import Path

        return cls.from_json(json.loads(Path(path).read_text()))


def task_features(model: Any, tasks: Sequence[TaskData], layers: Sequence[int], *, hook: str = "hook_resid_post",
                  batch_size: int = 16, progress: bool = True) -> dict[tuple[str, int], Tensor]:
    """Residuals of every task's rows: ``(task name, layer) -> Tensor[n_rows, d_model]`` float32.

    Windows shared by several tasks run once; a batch is right-padded (the model is causal, so
    padding after a token never changes it). Sequence rows are the mean over positions >= 1 (BOS,
    the attention sink, is never a row).
    """
    hooks = [f"blocks.{layer}.{hook}" for layer in layers]
    unique: dict[tuple[int, ...], int] = {}
    for t in tasks:
        for w in t.windows:
            unique.setdefault(tuple(w), len(unique))
    wins = list(unique)
    # per task: rows grouped by their window in the unique list
    win_ids = {t.name: np.asarray([unique[tuple(w)] for w in t.windows], np.int64)[t.window_index] for t in tasks}
    d_model = int(model.cfg.d_model)
    out = {(t.name, layer): torch.empty(len(t.labels), d_model) for t in tasks for layer in layers}
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(wins)), key=lambda i: len(wins[i]))
    device = getattr(model.cfg, "device", "cpu")
    for start in tqdm(range(0, len(order), batch_size), desc="probe forward", disable=not progress, leave=False):
        batch = order[start:start + batch_size]
        width = max(len(wins[i]) for i in batch)
        tokens = torch.full((len(batch), width), pad, dtype=torch.long)
        for j, i in enumerate(batch):
            tokens[j, :len(wins[i])] = torch.tensor(wins[i])
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens.to(device), names_filter=hooks, stop_at_layer=max(layers) + 1,
                                            return_type=None)
        pos_in_batch = {i: j for j, i in enumerate(batch)}
        for t in tasks:
            rows = np.flatnonzero(np.isin(win_ids[t.name], batch))
            if len(rows) == 0:
                continue
            b = torch.as_tensor([pos_in_batch[i] for i in win_ids[t.name][rows]])
            for layer, name in zip(layers, hooks):
                acts = cache[name].float().cpu()
                if t.level == "token":
                    out[(t.name, layer)][rows] = acts[b, torch.as_tensor(t.position[rows])]
                else:
                    lengths = torch.as_tensor([len(wins[i]) for i in win_ids[t.name][rows]])
                    mask = (torch.arange(width)[None, :] < lengths[:, None]) & (torch.arange(width)[None, :] >= 1)
                    out[(t.name, layer)][rows] = (acts[b] * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    return out


def sae_codes(sae: Any, x: Tensor, block: int = 2048) -> Tensor:
    """SAE codes ``Tensor[n, d_sae]`` of residuals ``x: Tensor[n, d_model]``, encoded in row blocks."""
    dev = next(sae.parameters()).device
    with torch.no_grad():
        return torch.cat([sae.encode(x[i:i + block].to(dev)).float().cpu() for i in range(0, len(x), block)])


def _models(models: Mapping[str, Any] | None, model_path: Any, precisions: Sequence[str] | None,
            device: str) -> Iterator[tuple[str, Any]]:
    if models is not None:
        yield from models.items()
        return
    import gc

    from qsae_lens.models import load_model

    for p in precisions or ("fp32",):
        model = load_model(model_path, p, device)
        yield p, model
        del model
        gc.collect()


def probe_sweep(models: Mapping[str, Any] | None = None, tasks: Sequence[str | TaskData] = BUILTIN_TASKS,
                layers: Sequence[int] = (16,), *, model_path: Any = None, precisions: Sequence[str] | None = None,
                saes: Mapping[int, Any] | None = None, baseline: str | None = None, hook: str = "hook_resid_post",
                n_examples: int = 1200, cv: int = 5, l2: float = 1.0, ks: Sequence[int] = DEFAULT_KS,
                top_k: int = 20, seed: int = 0, batch_size: int = 16, device: str = "cpu",
                progress: bool = True, on_precision: Callable[[str], None] | None = None) -> ProbeSweepResult:
    """Probe every task at every (precision, layer) on residuals and, where ``saes[layer]`` exists, on SAE codes.

    ``models``: precision name -> loaded model (kept by the caller), or ``model_path`` plus
    ``precisions`` (loaded one at a time). ``tasks``: built-in names (:data:`BUILTIN_TASKS`),
    ``"sae_probes:<dataset>"``, or :class:`TaskData`. ``saes``: layer -> SAELens SAE applied to
    every precision's residuals. ``baseline``: precision the top-``top_k`` latent overlap is
    measured against (default: the first). CIs are over the ``cv`` grouped folds.
    """
    if models is None and model_path is None:
        from qsae_lens.assets import default_model_path

        model_path = default_model_path()
    layers = [int(x) for x in layers]
    if not layers:
        raise ValueError("layers is empty: give at least one block index.")
    names = list(models) if models is not None else list(precisions or ("fp32",))
    baseline = baseline or names[0]
    if baseline not in names:
        raise ValueError(f"baseline {baseline!r} is not among the precisions {names}.")
    saes = dict(saes or {})
    probes: list[ProbeRow] = []
    sparse: list[SparseRow] = []
    tops: dict[tuple[str, str, int], np.ndarray] = {}
    built: list[TaskData] | None = None
    for precision, model in _models(models, model_path, precisions, device):
        if on_precision is not None:
            on_precision(precision)
        bad = [layer for layer in layers if not 0 <= layer < model.cfg.n_layers]
        if bad:
            raise ValueError(f"layers {bad} are outside the model's 0..{model.cfg.n_layers - 1}.")
        if built is None:
            built = [t if isinstance(t, TaskData) else build_task(t, model.tokenizer, n_examples=n_examples, seed=seed)
                     for t in tasks]
        feats = task_features(model, built, layers, hook=hook, batch_size=batch_size, progress=progress)
        for t in built:
            for layer in layers:
                x = feats[(t.name, layer)]
                sources = [("resid", x)]
                if layer in saes:
                    sources.append(("sae", sae_codes(saes[layer], x)))
                for source, f in sources:
                    r = train_probe(f, t.labels, types=t.types, groups=t.groups, cv=cv, l2=l2, seed=seed)
                    probes.append(ProbeRow(t.name, precision, layer, source, r.accuracy.value,
                                           (r.accuracy.ci_low, r.accuracy.ci_high), r.control_accuracy.value,
                                           (r.control_accuracy.ci_low, r.control_accuracy.ci_high),
                                           r.selectivity.value, (r.selectivity.ci_low, r.selectivity.ci_high),
                                           r.majority, r.n))
                    if source == "sae":
                        sp = sparse_probe(f, t.labels, ks=ks, groups=t.groups, cv=cv, l2=l2, seed=seed)
                        sparse += [SparseRow(t.name, precision, layer, k, e.value, (e.ci_low, e.ci_high))
                                   for k, e in zip(sp.ks, sp.accuracy)]
                        tops[(t.name, precision, layer)] = top_latents(f, t.labels, top_k)
        del feats
    overlap = [OverlapRow(task, p, layer, top_k, rank_overlap(tops[(task, baseline, layer)], top))
               for (task, p, layer), top in tops.items() if (task, baseline, layer) in tops]
    settings = {"precisions": names, "layers": layers, "tasks": [t.name for t in built or []], "baseline": baseline,
                "hook": hook, "n_examples": n_examples, "cv": cv, "l2": l2, "ks": list(ks), "top_k": top_k,
                "seed": seed, "ci_unit": CI_UNIT, "sae_layers": sorted(saes),
                "model": str(model_path) if model_path is not None else None, "note": FP32_NOTE}
    return ProbeSweepResult(probes, sparse, overlap, settings)
