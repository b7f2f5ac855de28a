"""The steering page (`qsae ui`): two precisions side by side, one SAE latent, a strength slider."""

from __future__ import annotations

from qsae_lens.ui.app import SteeringApp, make_server

__all__ = ["SteeringApp", "make_server"]
