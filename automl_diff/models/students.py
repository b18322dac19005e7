"""The student classes stock diffusers cannot express, and the code an export ships for each.

Each student module (:mod:`~automl_diff.models.student` for UNets,
:mod:`~automl_diff.models.student_transformer` for DiTs) imports nothing but torch and diffusers,
names its classes in ``STUDENT_CLASSES`` and its file in ``MODULE_FILE``, and says with
``plain_config`` when a student is a stock model after all.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from torch import nn

from automl_diff.models import student, student_transformer

__all__ = ["STUDENT_CLASSES", "as_stock", "student_module"]

_MODULES: tuple[ModuleType, ...] = (student, student_transformer)

#: Every student class name -> (class, the stock class whose config it extends).
STUDENT_CLASSES: dict[str, tuple[type, type]] = {name: pair for module in _MODULES for name, pair in module.STUDENT_CLASSES.items()}


def student_module(class_name: str) -> ModuleType | None:
    """The module defining student class ``class_name`` (None: not a student class)."""
    return next((m for m in _MODULES if class_name in m.STUDENT_CLASSES), None)


def as_stock(model: nn.Module) -> nn.Module:
    """``model`` as its stock diffusers class where that expresses it (the same modules under the
    same names, so the weights load unchanged), else ``model`` itself."""
    module = student_module(type(model).__name__)
    if module is None:
        return model
    plain: dict[str, Any] | None = module.plain_config(dict(model.config))
    if plain is None:
        return model
    stock = module.STUDENT_CLASSES[type(model).__name__][1].from_config(plain)
    stock.load_state_dict(model.state_dict(), strict=True)
    return stock
