"""DKDM as a search method: Optuna samples a student architecture, DKDM trains it data-free."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from automl_diff.config._reader import positive
from automl_diff.config.search_space import SearchSpace, load_search_space
from automl_diff.config.study import StudyConfig
from automl_diff.errors import UserError
from automl_diff.methods.base import Candidate, Method
from automl_diff.methods.dkdm.distill import DataBatches, PoolBatches, fit
from automl_diff.methods.dkdm.pool import NoisePool, PoolState
from automl_diff.models.loading import Teacher, unet_from_config
from automl_diff.sampling import predict_noise

__all__ = ["DKDM", "DKDMOptions", "PoolOptions", "TrainingInputs"]


@dataclass(frozen=True)
class PoolOptions:
    """Where training inputs come from: the teacher's own generations (data-free) or a dataset.

    Attributes:
        source: ``teacher`` (DKDM, data-free) or ``dataset`` (the real images of ``fid.dataset``,
            noised with the teacher's scheduler; not data-free).
        pool_size: noisy samples in the pool (at least the batch size). Larger pools decorrelate
            batches (see BENCHMARKS.md); warm-up costs about pool_size * pool_steps / 2 teacher calls.
        pool_steps: DDIM steps of a pool trajectory, from pure noise to a clean image.
        pool_eta: stochasticity of the pool's steps (1.0 ancestral-like, 0.0 deterministic DDIM).
    """

    source: str = field(default="teacher", metadata={"choices": ("teacher", "dataset")})
    pool_size: int = field(default=4096, metadata={"check": positive})
    pool_steps: int = field(default=50, metadata={"check": positive})
    pool_eta: float = field(default=1.0, metadata={"check": lambda v: None if 0 <= v <= 1 else "must be in [0, 1]"})


@dataclass(frozen=True)
class DKDMOptions(PoolOptions):
    """``method_options`` of a DKDM study: :class:`PoolOptions` plus

    Attributes:
        ema_decay: weight EMA of the student (0 turns it off).
    """

    ema_decay: float = field(default=0.995, metadata={"check": lambda v: None if 0 <= v < 1 else "must be in [0, 1)"})


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
        from automl_diff.sampling import make_scheduler

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


class DKDM(Method):
    """Data-free knowledge distillation (DKDM) into students from a search space.

    ``prepare`` fills the pool once with the teacher's own generations (warm-up spreads it over the
    trajectory); every trial starts from that same pool snapshot, so trials differ only by their
    architecture and seed. In a stacked study the pool and the targets come from the original
    teacher; the starting model's config is the template the search space edits.
    """

    name = "dkdm"
    options_type = DKDMOptions

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.config.search_space is None:
            raise UserError(f"{self.config.path}: search_space: required for method dkdm")
        prediction = self.reference.scheduler_config.get("prediction_type", "epsilon")
        if prediction != "epsilon":
            raise UserError(f"teacher '{self.reference.source}': DKDM distils noise predictions; its scheduler predicts '{prediction}'")
        space = load_search_space(self.config.search_space)
        if not isinstance(space, SearchSpace):
            raise UserError(f"{self.config.search_space}: family: method dkdm needs family unet2d (student architectures)")
        self.space: SearchSpace = space
        self.space.validate_for(dict(self.teacher.unet.config))
        if self.options.pool_size < self.config.budgets.batch_size:
            raise UserError(
                f"{self.config.path}: method_options.pool_size: must be at least budgets.batch_size "
                f"({self.config.budgets.batch_size}) (got {self.options.pool_size})"
            )
        # distillation targets: the original teacher's predictions (stacking: not the starting model's)
        self.inputs = TrainingInputs(self.config, self.reference, self.options, device=self.device)

    def prepare(self, workdir: Path | None = None, study: Any = None) -> None:
        self.inputs.prepare()

    def suggest(self, trial: Any) -> dict[str, Any]:
        return self.space.suggest(trial)

    def build_student(self, trial: Any) -> tuple[torch.nn.Module, dict[str, Any]]:
        """The untrained student a trial's parameters select, and its diffusers config."""
        params = self.suggest(trial)
        config = self.space.to_config(params, dict(self.teacher.unet.config))
        return unet_from_config(config, where=self.space.path), config

    def run_trial(self, trial: Any) -> Candidate:
        seed = self.config.seed + int(getattr(trial, "number", 0))
        torch.manual_seed(seed)
        student, config = self.build_student(trial)
        student.to(self.device)
        budgets = self.config.budgets
        batches = self.inputs.batches(seed)
        result = fit(
            student,
            batches,
            iterations=budgets.train_iterations,
            batch_size=budgets.batch_size,
            lr=budgets.lr,
            ema_decay=self.options.ema_decay,
            progress=self.progress,
            desc=f"trial {getattr(trial, 'number', '-')} dkdm",
        )
        tail = max(1, len(result.losses) // 10)
        attrs = {
            "train_seconds": round(result.seconds, 3),
            "train_loss_first": result.mean_loss(0, tail),
            "train_loss_last": result.mean_loss(len(result.losses) - tail, len(result.losses)),
            "source": self.options.source,
        }
        if isinstance(batches, PoolBatches):
            attrs.update(teacher_evaluations=batches.teacher_evals, pool_trajectories_completed=self.inputs.pool.completed)
        return Candidate(result.model, config, attrs)
