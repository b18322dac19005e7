"""DKDM as a search method: Optuna samples a student architecture, DKDM trains it data-free.

The data-free pool (:class:`~automl_diff.methods.training.TrainingInputs`) is filled once with the
teacher's own generations; every trial starts from that same snapshot, so trials differ only by
their architecture and seed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

import torch

from automl_diff.config.options import DKDMOptions
from automl_diff.config.search_space import SearchSpace
from automl_diff.methods.base import Candidate, Method, Rungs, TrainAttr, recipe_of
from automl_diff.methods.training import PoolBatches, TrainingInputs, fit
from automl_diff.methods.training.ddp import fit_data_parallel
from automl_diff.methods.training.loop import held_out_loss
from automl_diff.methods.training.stages import distillation_step_stage, pool_stages
from automl_diff.metrics.stages import Stage
from automl_diff.models.dataflow import is_transformer
from automl_diff.models.inherit import inherit_from_teacher
from automl_diff.models.inherit_transformer import block_influence, inherit_transformer
from automl_diff.models.loading import unet_from_config
from automl_diff.models.recipes import BK_SDM_RECIPES, bk_sdm_peer
from automl_diff.records import TrialAttr

__all__ = ["DKDM", "DKDMAttr"]


class DKDMAttr:
    """Trial attributes of a DKDM trial (besides :class:`~automl_diff.methods.base.TrainAttr`)."""

    #: ``teacher`` (data-free) or ``dataset``: where the training inputs came from.
    SOURCE: Final = "source"
    #: ``teacher`` (weights cut from the teacher's) or ``random``, and the share of the student's
    #: parameters that came from the teacher.
    INIT: Final = "init"
    INHERITED_FRACTION: Final = "inherited_fraction"
    #: A DiT student's blocks: the teacher blocks it starts from (its most influential, in order).
    INHERITED_BLOCKS: Final = "inherited_blocks"
    TEACHER_EVALUATIONS: Final = "teacher_evaluations"
    POOL_TRAJECTORIES_COMPLETED: Final = "pool_trajectories_completed"


class DKDM(Method):
    """Data-free knowledge distillation (DKDM) into students from a search space.

    In a stacked study the pool and the targets come from the original teacher; the starting
    model's config is the template the search space edits.

    Args:
        inputs: training inputs to share with other methods (the benchmark's one pool); None:
            the method's own, from its options.
    """

    options_type = DKDMOptions
    product = "DKDM student"

    def __init__(self, *args: Any, inputs: TrainingInputs | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.space: SearchSpace = self.settings.search_space
        # distillation targets: the original teacher's predictions (stacking: not the starting model's)
        self.inputs = inputs or TrainingInputs(self.settings, self.original, self.options, device=self.device)
        #: Where data-parallel jobs are written (the study's folder once prepared).
        self.workdir = Path("runs")
        self._influence: torch.Tensor | None = None

    def prepare(self, workdir: Path | None = None, *, storage: Any = None, study_name: str | None = None) -> None:
        self.inputs.prepare()
        if workdir is not None:
            self.workdir = Path(workdir)

    @property
    def recipes(self) -> tuple[str, ...]:
        return self.options.warm_start

    def suggest(self, trial: Any) -> dict[str, Any]:
        recipe = recipe_of(trial)
        if recipe is not None:  # a warm start: BK-SDM's student, whatever the space holds
            return {TrialAttr.RECIPE: recipe}
        return self.space.suggest(trial)

    def stages(self) -> list[Stage]:
        st = self.settings
        return [
            *pool_stages(self.original, self.options, st, guided=self.inputs.guided),
            distillation_step_stage("training step", "trial", st.budgets.train_iterations, self.original, st),
        ]

    def build_student(self, params: dict[str, Any]) -> tuple[torch.nn.Module, dict[str, Any], float | None, list[int] | None]:
        """The untrained student ``params`` select (or the recipe they name), its diffusers config,
        the share of its parameters cut from the teacher's (None: ``init: random``) and, for a DiT
        student cut from a DiT, the teacher blocks it starts from."""
        if TrialAttr.RECIPE in params:
            student, config, _ = bk_sdm_peer(self.teacher.unet, BK_SDM_RECIPES[params[TrialAttr.RECIPE]])
            if self.options.init == "teacher":
                return student.train(), config, 1.0, None
            return unet_from_config(config, where=self.settings.where), config, None, None
        config = self.space.to_config(params, dict(self.teacher.unet.config))
        student = unet_from_config(config, where=self.space.path)
        if self.options.init != "teacher" or is_transformer(student) != is_transformer(self.teacher.unet):
            return student, config, None, None
        student.to(self.device)
        if is_transformer(self.teacher.unet):
            copied, total, blocks = inherit_transformer(student, self.teacher.unet, self.influence())
            return student, config, copied / max(1, total), blocks
        return student, config, inherit_from_teacher(student, self.teacher.unet).fraction, None

    def influence(self) -> torch.Tensor:
        """Each block's influence on the teacher's hidden states (a DiT teacher), measured once on
        the held-out batch of the training inputs: which blocks a shallower student keeps."""
        if self._influence is None:
            batch = self.inputs.held_out(self.settings.score_samples)
            self._influence = block_influence(self.teacher.unet, batch.x, batch.t, batch.conditioning)
        return self._influence

    def run_trial(self, params: dict[str, Any], *, number: int = 0, rungs: Rungs | None = None) -> Candidate:
        seed = self.settings.seed + number
        torch.manual_seed(seed)
        student, config, inherited, blocks = self.build_student(params)
        student.to(self.device)
        budgets = self.settings.budgets
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
        held_out = self.inputs.held_out(self.settings.score_samples) if at else None
        processes = self.settings.processes
        if processes > 1:
            result = fit_data_parallel(
                student,
                batches,
                student_config=config,
                teacher_source=self.original.source,
                processes=processes,
                launcher=self.settings.launcher,
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
            TrainAttr.TRAIN_SECONDS: round(result.seconds, 3),
            TrainAttr.TRAIN_LOSS_FIRST: result.mean_loss(0, tail),
            TrainAttr.TRAIN_LOSS_LAST: result.mean_loss(len(result.losses) - tail, len(result.losses)),
            DKDMAttr.SOURCE: self.options.source,
            DKDMAttr.INIT: self.options.init if inherited is not None else "random",  # a student of another family: random
            TrainAttr.TRAIN_PROCESSES: result.processes,
        }
        if TrialAttr.RECIPE in params:
            attrs[TrialAttr.RECIPE] = params[TrialAttr.RECIPE]
        if inherited is not None:
            attrs[DKDMAttr.INHERITED_FRACTION] = round(inherited, 4)
        if blocks is not None:
            attrs[DKDMAttr.INHERITED_BLOCKS] = blocks
        if isinstance(batches, PoolBatches):
            attrs.update(
                {DKDMAttr.TEACHER_EVALUATIONS: batches.teacher_evals, DKDMAttr.POOL_TRAJECTORIES_COMPLETED: self.inputs.pool.completed}
            )
        return Candidate(result.model, config, attrs)
