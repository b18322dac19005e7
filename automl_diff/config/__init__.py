"""Typed configs read from YAML: study configs (``studies/``), how models are evaluated, each
method's options, and search spaces (``search_spaces/``).

Errors name the file and the dotted key (``studies/q.yaml: budgets.fid_samples: expected an integer``).
"""

from __future__ import annotations

from automl_diff.config.evaluation import Evaluation, SamplingSettings
from automl_diff.config.options import (
    METHOD_OPTIONS,
    DiffNASOptions,
    DiPGOOptions,
    DKDMOptions,
    MethodOptions,
    PoolOptions,
    read_options,
)
from automl_diff.config.search_space import BlockChoices, SearchSpace, SupernetSpace, TransformerSpace, load_search_space
from automl_diff.config.settings import Budgets, MethodSettings
from automl_diff.config.study import (
    DEFAULT_STORAGE,
    OBJECTIVES,
    ExecutionSettings,
    Objective,
    OptunaSampler,
    PrunerSettings,
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
    "Evaluation",
    "ExecutionSettings",
    "MethodOptions",
    "MethodSettings",
    "Objective",
    "OptunaSampler",
    "PoolOptions",
    "PrunerSettings",
    "SamplingSettings",
    "SearchSpace",
    "StudyConfig",
    "SupernetSpace",
    "TransformerSpace",
    "load_search_space",
    "load_study_config",
    "read_options",
    "resolve_device",
]
