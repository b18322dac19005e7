"""DKDM: data-free knowledge distillation of a diffusion teacher into any student architecture.

:class:`DKDM` is the Optuna method over a student search space; the data-free pool it trains from
is shared with the other methods (:mod:`automl_diff.methods.training`).
"""

from __future__ import annotations

from automl_diff.config.options import DKDMOptions
from automl_diff.methods.dkdm.method import DKDM

__all__ = ["DKDM", "DKDMOptions"]
