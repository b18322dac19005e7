"""Typed configs read from YAML: study configs (``studies/``) and search spaces (``search_spaces/``).

Errors name the file and the dotted key (``studies/q.yaml: budgets.fid_samples: expected an integer``).
"""

from __future__ import annotations

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
    "OBJECTIVES",
    "BlockChoices",
    "Budgets",
    "ExecutionSettings",
    "FidSettings",
    "Objective",
    "SamplerSettings",
    "SamplingSettings",
    "SearchSpace",
    "StudyConfig",
    "load_search_space",
    "load_study_config",
    "resolve_device",
]
