"""Training a student: data-free from the teacher's pool (DKDM), or on real images (the baseline).

Both go through one loop (:func:`fit`) that differs only in where a batch ``(x_t, t, target)``
comes from:

* :class:`PoolBatches` (DKDM): ``(x_t, t)`` from the :class:`~automl_diff.methods.dkdm.pool.NoisePool`,
  target = the teacher's ``eps(x_t, t)``; the same prediction advances the pool. No dataset is read.
* :class:`DataBatches` (baseline): real images noised with the scheduler, target = the true noise
  (the standard DDPM objective), for "the same student trained on the real data".
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from automl_diff.methods.base import TrainingDiverged
from automl_diff.methods.dkdm.pool import NoisePool
from automl_diff.methods.training import FitResult, fit
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
