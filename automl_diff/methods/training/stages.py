"""The dry-run stages of the methods that train (:mod:`automl_diff.metrics.stages`): a teacher
call of the pool's warm-up and a distillation step, at the study's shapes.

A distillation step is timed on a student of the teacher's own architecture, which no searched
student exceeds: the projection is an upper bound for DKDM and DiffNAS students.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from automl_diff.config.options import PoolOptions
from automl_diff.config.settings import MethodSettings
from automl_diff.methods.training.inputs import conditioning_kwargs
from automl_diff.metrics.macs import example_inputs
from automl_diff.metrics.stages import Stage
from automl_diff.models.loading import Teacher
from automl_diff.models.text import text_length
from automl_diff.sampling import predict_noise

__all__ = ["distillation_step_stage", "pool_stages", "teacher_call"]


def _call(unet: nn.Module, batch: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    sample, timestep, *context = example_inputs(unet, batch_size=batch, text_length=tokens)
    condition = context[0] if context else None
    if condition is not None and condition.is_floating_point():  # text embeddings: random ones (class ids stay ids)
        condition = torch.randn_like(condition)
    return torch.randn_like(sample), timestep, conditioning_kwargs(condition)


def teacher_call(teacher: Teacher) -> Callable[[int], None]:
    """One call of the teacher without gradients on ``batch`` rows of the study's shapes."""
    tokens = text_length(teacher.text)

    @torch.no_grad()
    def run(batch: int) -> None:
        x, t, kwargs = _call(teacher.unet, batch, tokens)
        predict_noise(teacher.unet, x, t, **kwargs)

    return run


def pool_stages(teacher: Teacher, options: PoolOptions, settings: MethodSettings, *, guided: bool) -> list[Stage]:
    """The data-free pool's warm-up (once per study): about ``pool_size * pool_steps / 2`` teacher
    evaluations, in calls of ``max(batch_size, 256)`` states (both halves of guidance: twice the rows)."""
    if options.source != "teacher":
        return []
    states = max(settings.budgets.batch_size, 256)
    rows = states * (2 if guided else 1)
    count = -(-options.pool_size * options.pool_steps // (2 * states))
    return [Stage("pool warm-up: one teacher call", "study", count, rows, teacher_call(teacher))]


def distillation_step_stage(name: str, per: str, count: int, teacher: Teacher, settings: MethodSettings, *, note: str = "") -> Stage:
    """A distillation step at ``budgets.batch_size`` rows: the teacher labels the batch, a
    float32 student of the teacher's size computes, backpropagates and steps AdamW (built at the
    first call)."""
    tokens = text_length(teacher.text)
    state: dict[str, nn.Module | torch.optim.Optimizer] = {}

    def run(batch: int) -> None:
        if not state:
            state["student"] = student = copy.deepcopy(teacher.unet).float().train().requires_grad_(True)
            state["optimiser"] = torch.optim.AdamW(student.parameters(), lr=settings.budgets.lr)
        student, optimiser = state["student"], state["optimiser"]
        x, t, kwargs = _call(teacher.unet, batch, tokens)
        with torch.no_grad():
            target = predict_noise(teacher.unet, x, t, **kwargs).float()
        kwargs = {k: v.float() if v.is_floating_point() else v for k, v in kwargs.items()}
        loss = F.mse_loss(predict_noise(student, x.float(), t, **kwargs), target)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    return Stage(name, per, count, settings.budgets.batch_size, run, note=note or "a teacher-sized student: an upper bound")
