"""Compression methods, by registry name.

* ``dkdm``: data-free distillation into student architectures swept by Optuna
  (:mod:`automl_diff.methods.dkdm`).
* ``diffnas``: block-wise NAS with distillation: block supernets, block-wise search, retraining
  with a dynamic joint loss (:mod:`automl_diff.methods.diffnas`).
* ``dipgo``: timestep-aware block pruning with a learned pruner and an Optuna-tuned threshold
  (:mod:`automl_diff.methods.dipgo`).
"""

from __future__ import annotations

from automl_diff.methods.base import Candidate, Method
from automl_diff.methods.diffnas import DiffNAS
from automl_diff.methods.dipgo.method import DiPGO
from automl_diff.methods.dkdm import DKDM

#: Methods a study config may name in ``method:``.
METHODS: dict[str, type[Method]] = {
    DKDM.name: DKDM,
    DiffNAS.name: DiffNAS,
    DiPGO.name: DiPGO,
}

__all__ = ["METHODS", "Candidate", "Method"]
