"""DKDM: data-free knowledge distillation of a diffusion teacher into any student architecture.

* :mod:`~automl_diff.methods.dkdm.pool`: the teacher-generated pool of noisy samples.
* :mod:`~automl_diff.methods.dkdm.distill`: the training loop (data-free, or the data baseline).
* :mod:`~automl_diff.methods.dkdm.method`: the Optuna-facing method over a student search space.
"""

from __future__ import annotations

from automl_diff.methods.dkdm.distill import DataBatches, FitResult, PoolBatches, TrainingDiverged, fit
from automl_diff.methods.dkdm.method import DKDM, DKDMOptions
from automl_diff.methods.dkdm.pool import NoisePool

__all__ = ["DKDM", "DKDMOptions", "DataBatches", "FitResult", "NoisePool", "PoolBatches", "TrainingDiverged", "fit"]
