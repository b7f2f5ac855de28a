"""The feature browser: a static, offline HTML atlas of one frozen SAE read at every precision.

``build_atlas`` computes what to show (top/quantile examples, histograms, logit lens, survival
status, matched latents) and ``write_feature_pages`` writes the site; ``qsae atlas SWEEP_DIR --out DIR``
builds it from a finished sweep (:mod:`qsae_lens.dashboards.cli`).
"""

from qsae_lens.dashboards.atlas import AtlasResult, build_atlas, choose_latents
from qsae_lens.dashboards.pages import (
           Example,
           LatentPage,
           PrecisionView,
           latent_filename,
           write_feature_pages,
)

__all__ = ["AtlasResult", "build_atlas", "choose_latents", "Example", "LatentPage", "PrecisionView",
           "latent_filename", "write_feature_pages"]
