"""automl_diff: Optuna-driven compression of pretrained diffusion UNets.

Layout:

* :mod:`automl_diff.methods`: the compression methods (``dkdm``, ``dipgo``; DiffNAS registers here).
* :mod:`automl_diff.metrics`: MACs/params (fvcore), FID (pytorch-fid), latency.
* :mod:`automl_diff.models`: block addressing and recording, teachers, the student UNet class.
* :mod:`automl_diff.config`: study configs and search spaces read from YAML.
* :mod:`automl_diff.runners`: RDB storages and the runners that execute trials.
* :mod:`automl_diff.analysis`: trial tables and the Pareto front.
* :mod:`automl_diff.export`: diffusers pipelines with model cards.
* :mod:`automl_diff.study`: the command line.
* :mod:`automl_diff.zoo`: the shipped digits teacher and classifier.

Importing the package does nothing but define names; heavy modules load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "Schedule": "automl_diff.methods.dipgo.schedule",
    "StudentUNet2DModel": "automl_diff.models.student",
    "apply_schedule": "automl_diff.methods.dipgo.gates",
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
