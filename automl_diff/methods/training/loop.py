"""The training loop every method shares: AdamW, warm-up + cosine schedule, clipping, weight EMA.

A method supplies where batches come from and, optionally, its loss. The default loss is the
noise-prediction MSE on ``(x_t, t, target)`` batches (DKDM); DiffNAS passes its joint block-feature
and output loss.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from automl_diff.methods.base import TrainingDiverged
from automl_diff.sampling import predict_noise

__all__ = ["FitResult", "conditioning", "fit", "noise_loss"]


def conditioning(batch: Any) -> dict[str, Any]:
    """The UNet keyword arguments a batch's samples are conditioned with (none for a plain
    ``(x_t, t, target)`` tuple)."""
    return getattr(batch, "conditioning", {})


def noise_loss(model: nn.Module, batch: Any, step: int) -> torch.Tensor:
    """MSE between the model's noise prediction for ``(x_t, t)`` (with the batch's conditioning)
    and the batch's target."""
    x, t, target = batch[:3]
    return F.mse_loss(predict_noise(model, x, t, **conditioning(batch)).float(), target)


@dataclass
class FitResult:
    """What training produced. ``model`` is the EMA of the weights when EMA is on."""

    model: nn.Module
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def mean_loss(self, first: int, last: int) -> float:
        window = self.losses[first:last]
        return sum(window) / max(1, len(window))


def fit(
    student: nn.Module,
    batches: Callable[[int], Any],
    *,
    iterations: int,
    batch_size: int,
    lr: float,
    ema_decay: float = 0.0,
    warmup: int = 20,
    grad_clip: float = 1.0,
    progress: bool = False,
    desc: str = "training",
    on_step: Callable[[int, float], Any] | None = None,
    loss: Callable[[nn.Module, Any, int], torch.Tensor] = noise_loss,
) -> FitResult:
    """Train ``student`` on ``loss``; AdamW, warm-up + cosine LR.

    Args:
        student: any model mapping ``(x_t, t)`` to a noise prediction of ``x_t``'s shape (a diffusers
            UNet, or a module returning the tensor).
        batches: ``batches(batch_size)`` returns the next batch (e.g. DKDM's ``PoolBatches``).
        iterations: optimiser steps.
        batch_size: samples per step.
        lr: peak learning rate.
        ema_decay: decay of a weight EMA that is returned instead of the raw weights (0: off).
        warmup: linear warm-up steps.
        grad_clip: max gradient norm.
        progress: show a progress bar (stderr).
        on_step: called as ``on_step(step, loss)``.
        loss: ``loss(student, batch, step)``, a scalar tensor (default :func:`noise_loss`).

    Raises:
        TrainingDiverged: the loss became NaN or infinite.
    """
    student.train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    warmup = min(warmup, max(1, iterations // 5))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, iterations - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    ema = copy.deepcopy(student).requires_grad_(False).eval() if ema_decay > 0 else None
    result = FitResult(student)
    start = time.perf_counter()
    bar = tqdm(range(iterations), desc=desc, unit="it", disable=not progress, file=sys.stderr, leave=False, mininterval=1)
    for step in bar:
        value_t = loss(student, batches(batch_size), step)
        if not torch.isfinite(value_t):
            bar.close()
            raise TrainingDiverged(f"loss became {value_t.item()} at iteration {step}")
        optimizer.zero_grad(set_to_none=True)
        value_t.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), grad_clip)
        optimizer.step()
        scheduler.step()
        if ema is not None:
            decay = min(ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for p_ema, p in zip(ema.parameters(), student.parameters()):
                    p_ema.lerp_(p, 1 - decay)
        value = value_t.item()
        result.losses.append(value)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{value:.4f}")
        if on_step is not None:
            on_step(step, value)
    bar.close()
    result.seconds = time.perf_counter() - start
    student.eval()
    result.model = ema if ema is not None else student
    return result
