"""Where distillation batches ``(x_t, t, target)`` come from, shared by every method that trains.

* :class:`PoolBatches` (data-free, DKDM's idea): ``(x_t, t)`` from a
  :class:`~automl_diff.methods.training.pool.NoisePool` of the teacher's own generations; the
  target is the teacher's ``eps(x_t, t)``, and the same prediction advances the pool. No dataset
  is read.
* :class:`DataBatches` (the baseline): real images noised with the scheduler; the target is the
  true noise (the standard DDPM objective).

:class:`TrainingInputs` builds either from a study's :class:`~automl_diff.config.options.PoolOptions`
once, and hands every run a batch source that starts from the same pool snapshot. DKDM, DiffNAS's
supernet training and retraining, and the benchmark's Torch-Pruning fine-tune all draw from it.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from automl_diff.config.options import PoolOptions
from automl_diff.config.study import StudyConfig
from automl_diff.errors import UserError
from automl_diff.methods.training.pool import NoisePool, PoolState
from automl_diff.models.loading import Teacher
from automl_diff.sampling import make_scheduler, predict_noise

__all__ = ["BatchSource", "DataBatches", "PoolBatches", "TrainingInputs"]


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


class TrainingInputs:
    """Batches ``(x_t, t, target)`` for distilling a teacher, per :class:`PoolOptions`.

    ``prepare`` fills the pool once (data-free) or loads the dataset; ``batches(seed)`` then gives
    a fresh batch source that starts from the same pool snapshot, so runs differ only by seed.
    The target is the teacher's noise prediction (pool) or the true noise (dataset).
    """

    def __init__(self, config: StudyConfig, teacher: Teacher, options: PoolOptions, *, device: torch.device) -> None:
        self.config = config
        self.teacher = teacher
        self.options = options
        self.device = device
        self.pool: NoisePool | None = None
        self._snapshot: PoolState | None = None
        self._dataset: torch.Tensor | None = None

    def alphas_cumprod(self) -> torch.Tensor:
        return make_scheduler(self.teacher.scheduler_config, "ddpm").alphas_cumprod

    def prepare(self) -> None:
        if self.options.source == "dataset":
            if self._dataset is not None:
                return
            from automl_diff.data import load_dataset

            dataset = self.config.fid.dataset or self.teacher.dataset
            if dataset is None:
                raise UserError(f"{self.config.path}: fid.dataset: needed for method_options.source=dataset")
            self._dataset = load_dataset(dataset, resolution=self.teacher.resolution, channels=self.teacher.channels)
            return
        if self._snapshot is not None:
            return
        scheduler_config = self.teacher.scheduler_config
        self.pool = NoisePool(
            size=self.options.pool_size,
            sample_shape=(self.teacher.channels, self.teacher.resolution, self.teacher.resolution),
            alphas_cumprod=self.alphas_cumprod(),
            num_steps=self.options.pool_steps,
            eta=self.options.pool_eta,
            clip_sample=bool(scheduler_config.get("clip_sample", True)),
            clip_range=float(scheduler_config.get("clip_sample_range", 1.0)),
            generator=torch.Generator().manual_seed(self.config.seed),
            device=self.device,
        )
        with torch.no_grad():
            self.pool.warm_up(
                lambda x, t: predict_noise(self.teacher.unet, x, t).float(),
                batch_size=max(self.config.budgets.batch_size, 256),
            )
        self._snapshot = self.pool.state()

    def batches(self, seed: int) -> PoolBatches | DataBatches:
        """A batch source for one run, seeded with ``seed``."""
        self.prepare()
        generator = torch.Generator().manual_seed(seed)
        if self.options.source == "dataset":
            return DataBatches(self._dataset, self.alphas_cumprod(), generator=generator, device=self.device)
        self.pool.load_state(self._snapshot)
        self.pool.generator = generator
        self.pool.completed = 0
        return PoolBatches(self.teacher.unet, self.pool)
