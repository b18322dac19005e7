"""Metrics: MACs and params (fvcore), FID (pytorch-fid), and sampling latency.

Lower is better for all of them.
"""

from __future__ import annotations

from automl_diff.metrics.fid import (
    FEATURE_EXTRACTORS,
    FeatureExtractor,
    feature_statistics,
    fid_from_images,
    frechet_distance,
    get_extractor,
    reference_statistics,
)
from automl_diff.metrics.latency import lockstep_rounds, sampler_rounds
from automl_diff.metrics.macs import BlockCost, MacsReport, count_macs, example_inputs

__all__ = [
    "FEATURE_EXTRACTORS",
    "BlockCost",
    "FeatureExtractor",
    "MacsReport",
    "count_macs",
    "example_inputs",
    "feature_statistics",
    "fid_from_images",
    "frechet_distance",
    "get_extractor",
    "lockstep_rounds",
    "reference_statistics",
    "sampler_rounds",
]
