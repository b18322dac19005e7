"""Where trials run and where results live: the run's set-up, then two sibling backends.

The set-up every backend shares:

* :mod:`~automl_diff.runners.storage`: opening SQLite/PostgreSQL storages, masking passwords.
* :mod:`~automl_diff.runners.session`: the study run (teachers, checks, method, evaluator) and
  what one trial does (train, save, evaluate, record).
* :mod:`~automl_diff.runners.pruning`: early stopping at rungs (MO-ASHA), asked by every trial.
* :mod:`~automl_diff.runners.artifacts`: sample grids as Optuna artifacts, for the dashboard.

The backends:

* :mod:`~automl_diff.runners.local`: create or resume a study and run trials in this process
  (several such workers may share one study).
* :mod:`~automl_diff.runners.ray`: the same trials as Ray Tune trials (``--backend ray``).

Only the storage helpers load eagerly: commands that read a study (``status``, ``pareto``) do not
import torch or diffusers.
"""

from __future__ import annotations

import importlib
from typing import Any

from automl_diff.runners.storage import load_existing_study, mask_url, open_storage, resolve_study_name

_LAZY = {
    "StudySession": "automl_diff.runners.session",
    "make_sampler": "automl_diff.runners.local",
    "open_study": "automl_diff.runners.local",
    "run_study": "automl_diff.runners.local",
    "start_study": "automl_diff.runners.local",
    "run_study_ray": "automl_diff.runners.ray",
}

__all__ = ["load_existing_study", "mask_url", "open_storage", "resolve_study_name", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'automl_diff.runners' has no attribute {name!r}")
