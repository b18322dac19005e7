"""Compression methods, by registry name.

* ``dkdm``: data-free distillation into student architectures swept by Optuna
  (:mod:`automl_diff.methods.dkdm`).
* ``diffnas``: block-wise NAS with distillation: block supernets, block-wise search, retraining
  with a dynamic joint loss (:mod:`automl_diff.methods.diffnas`).
* ``dipgo``: timestep-aware block pruning with a learned pruner and an Optuna-tuned compute budget
  (:mod:`automl_diff.methods.dipgo`).

What they share: the contract with the runners (:mod:`~automl_diff.methods.base`) and the training
loop with its data-free inputs (:mod:`~automl_diff.methods.training`). Their options are config
(:mod:`automl_diff.config.options`), under the same names.
"""

from __future__ import annotations

from automl_diff.methods.base import Candidate, CardSection, Method, Rungs, TrainAttr, TrainingDiverged, TrainingFailed
from automl_diff.methods.diffnas import DiffNAS
from automl_diff.methods.dipgo import DiPGO
from automl_diff.methods.dkdm import DKDM

#: Methods a study config may name in ``method:``.
METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (DKDM, DiffNAS, DiPGO)}

__all__ = ["METHODS", "Candidate", "CardSection", "Method", "Rungs", "TrainAttr", "TrainingDiverged", "TrainingFailed"]
