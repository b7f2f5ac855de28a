"""Shared fixtures. The default model is downloaded and converted once per machine (cached)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Keep CPU tests deterministic and within 2 cores.
torch.set_num_threads(min(2, os.cpu_count() or 1))
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """Local HF folder of the embedded SmolLM2-135M-Instruct (dequantized Q4_1)."""
    from qsae_lens.assets import default_model_path

    return default_model_path()


@pytest.fixture
def one_thread():
    """Tiny matrices: one thread is faster than two contended ones on the shared 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
