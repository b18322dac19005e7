"""What a study hands its method: the training budgets, and :class:`MethodSettings` (the budgets,
the sampler, the training prompts, the search space, the seed), which the benchmark builds too."""

from __future__ import annotations

from dataclasses import dataclass, field

from automl_diff.config._reader import positive, setting
from automl_diff.config.evaluation import SamplingSettings
from automl_diff.config.search_space import SearchSpace, SupernetSpace, TransformerSpace

__all__ = ["Budgets", "MethodSettings"]


@dataclass(frozen=True)
class Budgets:
    """Training budgets per trial (DKDM, DiffNAS retraining, DiP-GO's pruner)."""

    train_iterations: int = setting(300, section="budgets", check=positive, doc="optimiser steps per trial")
    batch_size: int = setting(64, section="budgets", check=positive, doc="samples (DiP-GO: trajectories) per step")
    lr: float = setting(2e-3, section="budgets", check=positive, doc="peak learning rate")


@dataclass(frozen=True)
class MethodSettings:
    """What a study hands its method besides the teachers and the method's own options.

    Attributes:
        budgets: the training budgets.
        sampling: the study's sampler (DiP-GO prunes its trajectories).
        train_prompts: text-to-image: what a method may train on (the pool, DiP-GO's pruner).
        search_space: the student space (DKDM, DiffNAS), loaded.
        dataset: the real images of ``source: dataset`` (a dataset spec; None: the teacher's).
        latency_batch_size, latency_repeats: where methods time their candidates (DiP-GO's and
            DiffNAS's latency costs).
        score_samples: the held-out batch of rung scores.
        processes: data-parallel training processes.
        launcher: what starts them (``torchrun``, or ``ray_train``: Ray Train's TorchTrainer).
        seed: the training seed.
        where: what errors name (the config file).
    """

    budgets: Budgets = field(default_factory=Budgets)
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    train_prompts: tuple[str, ...] = ()
    search_space: SearchSpace | TransformerSpace | SupernetSpace | None = None
    dataset: str | None = None
    latency_batch_size: int = 8
    latency_repeats: int = 3
    score_samples: int = 256
    processes: int = 1
    launcher: str = "torchrun"
    seed: int = 0
    where: str = "study"
