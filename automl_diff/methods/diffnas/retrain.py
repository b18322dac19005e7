"""Retraining an assembled student with DiffNAS's dynamic joint loss.

At step ``s`` of ``S``::

    loss = w(s) * sum_b relMSE(F_b(student), F_b(teacher))
         + (1 - w(s)) * MSE(eps_student, eps_teacher)
         [+ data_weight * MSE(eps_student, noise)]        (dataset source only)

``F_b`` are the outputs of block ``b`` in each model's own forward pass (every model called with
the batch's text conditioning, if any), recorded through removable hooks. The block terms
continue what the supernets were trained on and give every block a short gradient path; the
output term is what sampling needs. ``w`` moves from ``start`` to
``end`` over training (``linear`` or ``cosine``), or stays at ``start`` (``static``, the ablation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from automl_diff.methods.diffnas.search import block_loss
from automl_diff.methods.training.loop import conditioning
from automl_diff.models.blocks import block_names, record_blocks
from automl_diff.sampling import predict_noise

__all__ = ["JointLoss", "JointWeight"]


@dataclass(frozen=True)
class JointWeight:
    """The block-feature weight ``w(s)`` over ``total`` steps."""

    schedule: str = "linear"
    start: float = 1.0
    end: float = 0.0

    def __call__(self, step: int, total: int) -> float:
        if self.schedule == "static" or total <= 1:
            return self.start
        progress = min(1.0, max(0.0, step / (total - 1)))
        if self.schedule == "cosine":
            progress = 0.5 * (1 - math.cos(math.pi * progress))
        return self.start + (self.end - self.start) * progress


class JointLoss:
    """The joint loss as a :func:`~automl_diff.methods.training.fit` loss.

    Args:
        teacher: the frozen teacher.
        weight: the schedule of ``w``.
        total: training steps (for the schedule).
        data_weight: weight of the noise-prediction loss against the batch's true noise (batches
            from a dataset; 0 otherwise).
        original: the model whose noise predictions the output term matches (stacking: the
            original teacher); None: ``teacher``.
        blocks: each teacher block's counterpart in the student, by name (a shallower SD3 student
            numbers its kept blocks anew); None: every teacher block, under its own name.
    """

    def __init__(
        self,
        teacher: nn.Module,
        weight: JointWeight,
        total: int,
        *,
        data_weight: float = 0.0,
        original: nn.Module | None = None,
        blocks: dict[str, str] | None = None,
    ) -> None:
        self.teacher = teacher
        self.original = original
        self.weight = weight
        self.total = total
        self.data_weight = data_weight
        self.blocks = blocks if blocks is not None else {name: name for name in block_names(teacher)}
        self.last: dict[str, float] = {}

    def __call__(self, student: nn.Module, batch: Any, step: int) -> torch.Tensor:
        x, t, target = batch[:3]
        kwargs = conditioning(batch)
        with torch.no_grad(), record_blocks(self.teacher, list(self.blocks)) as teacher_rec:
            eps_teacher = predict_noise(self.teacher, x, t, **kwargs).float()
            if self.original is not None:
                eps_teacher = predict_noise(self.original, x, t, **kwargs).float()
        model = getattr(student, "module", student)  # hooks go on the model inside a DDP wrapper
        with record_blocks(model, list(self.blocks.values()), detach=False) as student_rec:
            eps = predict_noise(student, x, t, **kwargs).float()
        pairs = self.blocks.items()
        features = torch.stack([block_loss(student_rec[mine].outputs[0], teacher_rec[theirs].outputs[0]) for theirs, mine in pairs]).sum()
        output = F.mse_loss(eps, eps_teacher)
        w = self.weight(step, self.total)
        loss = w * features + (1 - w) * output
        if self.data_weight:
            loss = loss + self.data_weight * F.mse_loss(eps, target)
        self.last = {"w": w, "features": features.detach().item(), "output": output.detach().item()}
        return loss
