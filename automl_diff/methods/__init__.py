"""Compression methods, by registry name.

* ``dkdm``: data-free distillation into student architectures swept by Optuna
  (:mod:`automl_diff.methods.dkdm`).
"""

from __future__ import annotations

from automl_diff.methods.base import Candidate, Method
from automl_diff.methods.dkdm import DKDM

#: Methods a study config may name in ``method:``.
METHODS: dict[str, type[Method]] = {
    DKDM.name: DKDM,
}

__all__ = ["METHODS", "Candidate", "Method"]
