"""automl_diff: Optuna-driven compression of pretrained diffusion UNets.

Layers, from the top (a module imports only from the layers below it):

* :mod:`automl_diff.cli` (the command line; ``python -m automl_diff.study``),
  :mod:`automl_diff.bench` (every method side by side).
* :mod:`automl_diff.analysis` (trial tables, the Pareto front, figures, reports) and
  :mod:`automl_diff.export` (diffusers pipelines with model cards).
* :mod:`automl_diff.runners`: the run's set-up (storages, the session, what one trial does, early
  stopping) and its two backends, local and Ray Tune.
* :mod:`automl_diff.methods`: DKDM (``dkdm/``), DiffNAS (``diffnas/``), DiP-GO (``dipgo/``) and the
  training they share (``training/``); :mod:`automl_diff.evaluation`: the evaluation every model
  goes through.
* :mod:`automl_diff.config`: study configs, evaluation settings, method options and search spaces
  read from YAML, checked once.
* :mod:`automl_diff.gating`: schedules of which unit computes at which step, and their hooks.
* :mod:`automl_diff.metrics`: MACs/params (fvcore), FID (pytorch-fid), latency.
* :mod:`automl_diff.models`: block addressing and recording, teachers, the student UNet class.
* :mod:`automl_diff.zoo`, :mod:`automl_diff.data`, :mod:`automl_diff.sampling`: the built-in
  teachers and their datasets by name, image folders and prompt files, the sampler.
* :mod:`automl_diff.records`, :mod:`automl_diff.errors`: what a study stores, and user errors.

Importing the package does nothing but define names; heavy modules load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "Schedule": "automl_diff.gating.schedule",
    "StudentUNet2DModel": "automl_diff.models.student",
    "apply_schedule": "automl_diff.gating.hooks",
    "UserError": "automl_diff.errors",
    "count_macs": "automl_diff.metrics.macs",
    "load_teacher": "automl_diff.models.loading",
    "load_unet": "automl_diff.models.loading",
    "load_study_config": "automl_diff.config.study",
    "run_study": "automl_diff.runners.local",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'automl_diff' has no attribute {name!r}")
