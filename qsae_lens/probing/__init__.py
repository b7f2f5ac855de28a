"""Probing across precisions: linear probes with Hewitt-Liang control tasks, sparse probing on SAE
latents, corrected latent-wise tests, and the built-in tasks that need no hub."""

from qsae_lens.probing.control import control_task_labels
from qsae_lens.probing.probes import (
    ProbeResult,
    SparseProbeResult,
    latent_scores,
    rank_overlap,
    sparse_probe,
    top_latents,
    train_probe,
)
from qsae_lens.probing.tasks import BUILTIN_TASKS, TaskData, build_task
from qsae_lens.probing.tests import LatentTests, latent_tests

__all__ = ["BUILTIN_TASKS", "LatentTests", "ProbeResult", "SparseProbeResult", "TaskData", "build_task",
           "control_task_labels", "latent_scores", "latent_tests", "rank_overlap", "sparse_probe",
           "top_latents", "train_probe", "probe_sweep"]


def __getattr__(name: str):  # probe_sweep pulls in tqdm/models lazily
    if name == "probe_sweep":
        from qsae_lens.probing.api import probe_sweep

        return probe_sweep
    raise AttributeError(name)
