"""DKDM as a search method: Optuna samples a student architecture, DKDM trains it data-free.

The data-free pool (:class:`~automl_diff.methods.training.TrainingInputs`) is filled once with the
teacher's own generations; every trial starts from that same snapshot, so trials differ only by
their architecture and seed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from automl_diff.config.options import DKDMOptions
from automl_diff.config.search_space import SearchSpace, load_search_space
from automl_diff.errors import UserError
from automl_diff.methods.base import Candidate, Method, Rungs
from automl_diff.methods.training import PoolBatches, TrainingInputs, fit
from automl_diff.methods.training.ddp import fit_data_parallel
from automl_diff.methods.training.loop import held_out_loss
from automl_diff.models.inherit import inherit_from_teacher
from automl_diff.models.loading import unet_from_config
from automl_diff.records import TrialAttr

__all__ = ["DKDM"]


class DKDM(Method):
    """Data-free knowledge distillation (DKDM) into students from a search space.

    In a stacked study the pool and the targets come from the original teacher; the starting
    model's config is the template the search space edits.

    Args:
        inputs: training inputs to share with other methods (the benchmark's one pool); None:
            the method's own, from its options.
    """

    name = "dkdm"
    options_type = DKDMOptions
    text_to_image = True
    reports_rungs = True

    def __init__(self, *args: Any, inputs: TrainingInputs | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.config.search_space is None:
            raise UserError(f"{self.config.path}: search_space: required for method dkdm")
        prediction = self.original.scheduler_config.get("prediction_type", "epsilon")
        if prediction != "epsilon":
            raise UserError(f"teacher '{self.original.source}': DKDM distils noise predictions; its scheduler predicts '{prediction}'")
        space = load_search_space(self.config.search_space)
        if not isinstance(space, SearchSpace):
            raise UserError(
                f"{self.config.search_space}: family: method dkdm needs family unet2d or unet2d_condition (student architectures)"
            )
        self.space: SearchSpace = space
        self.space.validate_for(dict(self.teacher.unet.config))
        if self.options.pool_size < self.config.budgets.batch_size:
            raise UserError(
                f"{self.config.path}: method_options.pool_size: must be at least budgets.batch_size "
                f"({self.config.budgets.batch_size}) (got {self.options.pool_size})"
            )
        # distillation targets: the original teacher's predictions (stacking: not the starting model's)
        self.inputs = inputs or TrainingInputs(self.config, self.original, self.options, device=self.device)
        #: Where data-parallel jobs are written (the study's folder once prepared).
        self.workdir = Path(self.config.output_dir)

    def prepare(self, workdir: Path | None = None, *, storage: Any = None, study_name: str | None = None) -> None:
        self.inputs.prepare()
        if workdir is not None:
            self.workdir = Path(workdir)

    def suggest(self, trial: Any) -> dict[str, Any]:
        return self.space.suggest(trial)

    def build_student(self, params: dict[str, Any]) -> tuple[torch.nn.Module, dict[str, Any], float | None]:
        """The untrained student ``params`` select, its diffusers config, and the share of its
        parameters cut from the teacher's (None: ``init: random``)."""
        config = self.space.to_config(params, dict(self.teacher.unet.config))
        student = unet_from_config(config, where=self.space.path)
        inherited = None
        if self.options.init == "teacher":
            student.to(self.device)
            inherited = inherit_from_teacher(student, self.teacher.unet).fraction
        return student, config, inherited

    def run_trial(self, params: dict[str, Any], *, number: int = 0, rungs: Rungs | None = None) -> Candidate:
        seed = self.config.seed + number
        torch.manual_seed(seed)
        student, config, inherited = self.build_student(params)
        student.to(self.device)
        budgets = self.config.budgets
        batches = self.inputs.batches(seed)
        iterations = budgets.train_iterations
        options = {
            "iterations": iterations,
            "batch_size": budgets.batch_size,
            "lr": budgets.lr,
            "ema_decay": self.options.ema_decay,
            "progress": self.progress,
            "desc": f"trial {number} dkdm",
        }
        at = rungs.iterations(iterations) if rungs is not None else []
        held_out = self.inputs.held_out(self.config.pruner.score_samples) if at else None
        processes = self.config.execution.processes
        if processes > 1:
            if budgets.batch_size % processes:
                raise UserError(
                    f"{self.config.path}: budgets.batch_size: {budgets.batch_size} does not split over "
                    f"{processes} processes (execution.processes_per_trial)"
                )
            result = fit_data_parallel(
                student,
                batches,
                student_config=config,
                teacher_source=self.original.source,
                processes=processes,
                folder=self.workdir / "ddp" / f"trial_{number}",
                held_out=held_out,
                rungs=at,
                on_rung=(lambda k, iteration, score: rungs.report(k, iteration, score, student)) if at else None,
                **options,
            )
        else:
            result = fit(
                student,
                batches,
                rungs=at,
                on_rung=(lambda k, iteration, model: rungs.report(k, iteration, held_out_loss(model, held_out), model)) if at else None,
                **options,
            )
        tail = max(1, len(result.losses) // 10)
        attrs = {
            TrialAttr.TRAIN_SECONDS: round(result.seconds, 3),
            TrialAttr.TRAIN_LOSS_FIRST: result.mean_loss(0, tail),
            TrialAttr.TRAIN_LOSS_LAST: result.mean_loss(len(result.losses) - tail, len(result.losses)),
            TrialAttr.SOURCE: self.options.source,
            TrialAttr.INIT: self.options.init,
            TrialAttr.TRAIN_PROCESSES: result.processes,
        }
        if inherited is not None:
            attrs[TrialAttr.INHERITED_FRACTION] = round(inherited, 4)
        if isinstance(batches, PoolBatches):
            attrs.update(
                {TrialAttr.TEACHER_EVALUATIONS: batches.teacher_evals, TrialAttr.POOL_TRAJECTORIES_COMPLETED: self.inputs.pool.completed}
            )
        return Candidate(result.model, config, attrs)
