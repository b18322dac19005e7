"""The contract between a compression method and the runners.

A runner (the local Optuna loop, or Ray Tune) builds one :class:`Method` per study run, calls
:meth:`Method.prepare` once before the first trial, and for every Optuna trial asks the method
for its parameters (:meth:`Method.suggest`, once), for the identity of the model they make
(:meth:`Method.fingerprint`: a trial that repeats a finished one is pruned before training), and
then for that model (:meth:`Method.run_trial`). It evaluates every method's :class:`Candidate`
the same way (MACs, FID, latency), saves its weights and records everything in the study.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Final

import torch
from torch import nn

from automl_diff.config.options import MethodOptions
from automl_diff.config.settings import MethodSettings
from automl_diff.config.study import StudyConfig
from automl_diff.gating import Schedule
from automl_diff.metrics.stages import Stage
from automl_diff.models.loading import Teacher
from automl_diff.records import TrialAttr, stable_key

__all__ = ["Candidate", "CardSection", "Method", "Rungs", "TrainAttr", "TrainingDiverged", "TrainingFailed", "recipe_of"]


def recipe_of(trial: Any) -> str | None:
    """The recipe an Optuna trial was enqueued for (None: a trial the sampler suggests)."""
    recipe = trial.user_attrs.get(TrialAttr.RECIPE)
    return str(recipe) if recipe is not None else None


class TrainAttr:
    """Trial attributes of the methods that train a network (DKDM, DiffNAS's retraining)."""

    TRAIN_SECONDS: Final = "train_seconds"
    TRAIN_LOSS_FIRST: Final = "train_loss_first"
    TRAIN_LOSS_LAST: Final = "train_loss_last"
    #: Processes that trained the model: the world size the data-parallel ranks saw (1: one process).
    TRAIN_PROCESSES: Final = "train_processes"


@dataclass(frozen=True)
class CardSection:
    """What a method adds to an exported model's card.

    Attributes:
        text: paragraphs after the metrics table (Markdown).
        setup: an import and a call, placed between loading the pipeline and sampling in the card's
            usage snippet (a DiP-GO schedule's ``apply_schedule``); empty: none.
    """

    text: str = ""
    setup: tuple[str, ...] = ()


class TrainingDiverged(RuntimeError):
    """A method's loss became NaN or infinite; the trial fails with this reason, the study goes on."""


class TrainingFailed(RuntimeError):
    """A trial's training processes failed (a data-parallel rank exited with an error); the trial
    fails with this reason, the study goes on."""


@dataclass(frozen=True)
class Rungs:
    """Where a trial reports intermediate scores, so that a runner can stop it early.

    Attributes:
        fractions: the rungs, as fractions of the trial's training budget.
        report: ``report(rung, iteration, score, model)``: the score (lower is better) of
            ``model`` after ``iteration`` training iterations; raises ``optuna.TrialPruned`` (or
            whatever the runner stops trials with) to end the trial there.
    """

    fractions: tuple[float, ...]
    report: Callable[[int, int, float, nn.Module], None]

    def iterations(self, total: int) -> list[int]:
        """The iteration counts, within a run of ``total`` iterations, at which to report."""
        return sorted({max(1, min(total - 1, round(f * total))) for f in self.fractions}) if total > 1 else []


@dataclass
class Candidate:
    """A trained model a trial produced.

    Attributes:
        unet: the model, ready to sample.
        config: its diffusers config (JSON-safe, with ``_class_name``): rebuilds the architecture.
        attrs: method-specific facts to record on the trial (JSON-safe; keys from
            :class:`~automl_diff.records.TrialAttr`).
        schedule: a gate schedule the model samples with (None: every unit, every step).
        weights: a folder that already holds the model's weights (the runner saves none then).
    """

    unet: nn.Module
    config: dict[str, Any]
    attrs: dict[str, Any] = field(default_factory=dict)
    schedule: Schedule | None = None
    weights: str | None = None


class Method(ABC):
    """A compression method (DKDM, DiffNAS, DiP-GO) as the runners see it.

    Args:
        teacher: the model to compress, on ``device``: a pretrained teacher, or the exported
            result of another study (stacking).
        options: the method's own options (:attr:`options_type`), read and checked with the config.
        settings: what the study hands every method: budgets, the sampler, training prompts, the
            search space, the seed (:class:`~automl_diff.config.MethodSettings`).
        original: the original teacher when ``teacher`` is the result of another study (None:
            ``teacher`` itself). Methods that distil outputs (DKDM, DiffNAS's output term) take
            their targets from it; block features and gate consistency come from ``teacher``,
            whose architecture they mirror.
        device: torch device for training.
        progress: show progress bars.

    The checks of the options against the teachers are the config's
    (:meth:`~automl_diff.config.StudyConfig.check_against`), made once before a method is built.
    """

    #: Registry name (``method:`` in a study config): its options class names it.
    name: ClassVar[str]
    #: Dataclass of the method's ``method_options`` (:mod:`automl_diff.config.options`).
    options_type: ClassVar[type[MethodOptions]]
    #: What a trial of the method makes, as model cards and lineages name it.
    product: ClassVar[str] = "model"

    def __init__(
        self,
        teacher: Teacher,
        options: Any,
        settings: MethodSettings,
        *,
        original: Teacher | None = None,
        device: str | torch.device = "cpu",
        progress: bool = False,
    ) -> None:
        self.teacher = teacher
        self.original = original if original is not None else teacher
        self.options = options
        self.settings = settings
        self.device = torch.device(device)
        self.progress = progress

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "options_type" in cls.__dict__:
            cls.name = cls.options_type.method

    @classmethod
    def from_config(
        cls, config: StudyConfig, teacher: Teacher, *, original: Teacher | None = None, device: str | torch.device = "cpu", **kwargs: Any
    ) -> Method:
        """The method a study config asks for, with its options and the study's settings."""
        return cls(teacher, config.method_options, config.method_settings, original=original, device=device, **kwargs)

    @classmethod
    def card_section(cls, attrs: Mapping[str, Any], *, steps: int, first_step: bool) -> CardSection:
        """What an export of one of the method's trials says about it (``attrs``: the trial's
        attributes; ``steps``: the study's sampling steps; ``first_step``: the study started from
        a pretrained teacher, not another study's export). Default: nothing."""
        return CardSection()

    @classmethod
    def lineage_facts(cls, attrs: Mapping[str, Any]) -> dict[str, Any]:
        """What a trial's step of an export's lineage records besides its parameters and metrics.
        Default: the recipe a warm-start trial was enqueued for."""
        return {TrialAttr.RECIPE: attrs[TrialAttr.RECIPE]} if attrs.get(TrialAttr.RECIPE) else {}

    @classmethod
    def lineage_note(cls, step: Mapping[str, Any], number: int) -> str:
        """What a model card shows of step ``number`` of a longer lineage (Markdown). Default: nothing."""
        return ""

    @property
    def reports_rungs(self) -> bool:
        """Whether :meth:`run_trial` reports intermediate scores at :class:`Rungs` (early stopping)."""
        return self.options_type.reports_rungs

    @property
    def stacked(self) -> bool:
        """The method starts from a model other than the original teacher."""
        return self.original is not self.teacher

    def prepare(self, workdir: Path | None = None, *, storage: Any = None, study_name: str | None = None) -> None:
        """One-time work before the first trial (called once per study run). Default: nothing.

        Args:
            workdir: the study's output folder, for results worth keeping across resumed runs.
            storage: the Optuna storage of the study (None outside a study), for methods that
                keep their own searches beside it, named after ``study_name``.
            study_name: the study's name.
        """

    def stages(self) -> list[Stage]:
        """What the method's own work costs at the study's shapes, for a dry run: the stages it
        repeats per trial and once per study (:mod:`automl_diff.metrics.stages`; evaluation's are
        the evaluator's). Default: none."""
        return []

    def suggest(self, trial: Any) -> dict[str, Any]:
        """Ask an ``optuna.Trial`` for all of the method's parameters; the runner calls it once
        per trial, before any training. Default: no parameters."""
        return {}

    @property
    def recipes(self) -> tuple[str, ...]:
        """Known recipes the study enqueues as its first trials (``warm_start``); a trial the study
        enqueued for one carries its name as the user attribute ``recipe``, and :meth:`suggest`
        returns ``{"recipe": name}`` for it (:func:`recipe_of`). Default: none."""
        return ()

    def fingerprint(self, params: dict[str, Any]) -> str:
        """Identify the model ``params`` make (after :meth:`prepare`): a trial whose fingerprint
        equals a finished trial's is pruned as a duplicate without training. Default: the
        parameters themselves; methods whose parameters can map to the same model say more."""
        return stable_key(params)

    @abstractmethod
    def run_trial(self, params: dict[str, Any], *, number: int = 0, rungs: Rungs | None = None) -> Candidate:
        """Build and train the model ``params`` select.

        Args:
            params: what :meth:`suggest` returned (or the parameters of a finished trial, to
                rebuild its model).
            number: the trial's number (seeds differ per trial).
            rungs: where to report intermediate scores (methods with :attr:`reports_rungs`;
                None: train in full without reporting).
        """
