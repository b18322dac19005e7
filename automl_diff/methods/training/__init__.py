"""What every method that trains a network shares: the training loop and where its batches come from.

* :mod:`~automl_diff.methods.training.loop`: :func:`fit` (AdamW, warm-up and cosine schedule,
  clipping, weight EMA).
* :mod:`~automl_diff.methods.training.pool`: :class:`NoisePool`, the teacher's own generations.
* :mod:`~automl_diff.methods.training.inputs`: :class:`TrainingInputs` and its batch sources
  (data-free from the pool, or real images).
"""

from __future__ import annotations

from automl_diff.methods.training.inputs import Batch, BatchSource, DataBatches, PoolBatches, TrainingInputs
from automl_diff.methods.training.loop import FitResult, fit, noise_loss
from automl_diff.methods.training.pool import NoisePool, PoolState

__all__ = [
    "Batch",
    "BatchSource",
    "DataBatches",
    "FitResult",
    "NoisePool",
    "PoolBatches",
    "PoolState",
    "TrainingInputs",
    "fit",
    "noise_loss",
]
