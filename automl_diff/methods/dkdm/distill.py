"""Training a student: data-free from the teacher's pool (DKDM), or on real images (the baseline).

Both go through one loop (:func:`fit`) that differs only in where a batch ``(x_t, t, target)``
comes from:

* :class:`PoolBatches` (DKDM): ``(x_t, t)`` from the :class:`~automl_diff.methods.dkdm.pool.NoisePool`,
  target = the teacher's ``eps(x_t, t)``; the same prediction advances the pool. No dataset is read.
* :class:`DataBatches` (baseline): real images noised with the scheduler, target = the true noise
  (the standard DDPM objective), for "the same student trained on the real data".
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from automl_diff.methods.base import TrainingDiverged
from automl_diff.methods.dkdm.pool import NoisePool
from automl_diff.sampling import predict_noise

__all__ = ["DataBatches", "FitResult", "PoolBatches", "TrainingDiverged", "fit"]



class BatchSource(Protocol):
    def __call__(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


class PoolBatches:
    """DKDM batches: the teacher labels a random pool batch and advances it one step.

    Args:
        teacher: noise-prediction model (frozen).
        pool: the noisy-sample pool.
    """

    def __init__(self, teacher: nn.Module, pool: NoisePool) -> None:
        self.teacher = teacher
        self.pool = pool
        self.teacher_evals = 0

    @torch.no_grad()
    def label(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.teacher_evals += len(x)
        return predict_noise(self.teacher, x, t).float()

    def __call__(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = self.pool.draw(batch_size)
        x, t = self.pool.batch(idx)  # copies: advancing the pool leaves this batch as it is
        eps = self.label(x, t)
        self.pool.advance(idx, eps)
        return x, t, eps


class DataBatches:
    """Baseline batches from real images: ``x_t = sqrt(a) x_0 + sqrt(1-a) noise``, target = noise."""

    def __init__(self, images: torch.Tensor, alphas_cumprod: torch.Tensor, *, generator: torch.Generator, device: torch.device) -> None:
        self.images = images
        self.alphas_cumprod = alphas_cumprod.float()
        self.generator = generator
        self.device = device

    def __call__(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, len(self.images), (batch_size,), generator=self.generator)
        x0 = self.images[idx]
        t = torch.randint(0, len(self.alphas_cumprod), (batch_size,), generator=self.generator)
        noise = torch.randn(x0.shape, generator=self.generator)
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        x = a.sqrt() * x0 + (1 - a).sqrt() * noise
        return x.to(self.device), t.to(self.device), noise.to(self.device)


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
    batches: BatchSource,
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
) -> FitResult:
    """Train ``student`` to predict ``target`` from ``(x_t, t)`` with MSE; AdamW, warm-up + cosine LR.

    Args:
        student: any model mapping ``(x_t, t)`` to a noise prediction of ``x_t``'s shape (a diffusers
            UNet, or a module returning the tensor).
        batches: where batches come from (:class:`PoolBatches` or :class:`DataBatches`).
        iterations: optimiser steps.
        batch_size: samples per step.
        lr: peak learning rate.
        ema_decay: decay of a weight EMA that is returned instead of the raw weights (0: off).
        warmup: linear warm-up steps.
        grad_clip: max gradient norm.
        progress: show a progress bar (stderr).
        on_step: called as ``on_step(step, loss)``.

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
        x, t, target = batches(batch_size)
        loss = F.mse_loss(predict_noise(student, x, t).float(), target)
        if not torch.isfinite(loss):
            bar.close()
            raise TrainingDiverged(f"loss became {loss.item()} at iteration {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), grad_clip)
        optimizer.step()
        scheduler.step()
        if ema is not None:
            decay = min(ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for p_ema, p in zip(ema.parameters(), student.parameters()):
                    p_ema.lerp_(p, 1 - decay)
        value = loss.item()
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
