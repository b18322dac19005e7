"""Typed configs read from YAML: study configs (``studies/``), each method's options, and search
spaces (``search_spaces/``).

Errors name the file and the dotted key (``studies/q.yaml: budgets.fid_samples: expected an integer``).
"""

from __future__ import annotations

from automl_diff.config.options import METHOD_OPTIONS, DiffNASOptions, DiPGOOptions, DKDMOptions, PoolOptions, read_options
from automl_diff.config.search_space import BlockChoices, SearchSpace, load_search_space
from automl_diff.config.study import (
    DEFAULT_STORAGE,
    OBJECTIVES,
    Budgets,
    ExecutionSettings,
    FidSettings,
    Objective,
    SamplerSettings,
    SamplingSettings,
    StudyConfig,
    load_study_config,
    resolve_device,
)

__all__ = [
    "DEFAULT_STORAGE",
    "METHOD_OPTIONS",
    "OBJECTIVES",
    "BlockChoices",
    "Budgets",
    "DKDMOptions",
    "DiPGOOptions",
    "DiffNASOptions",
    "ExecutionSettings",
    "FidSettings",
    "Objective",
    "PoolOptions",
    "SamplerSettings",
    "SamplingSettings",
    "SearchSpace",
    "StudyConfig",
    "load_search_space",
    "load_study_config",
    "read_options",
    "resolve_device",
]
