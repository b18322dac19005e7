"""The contract between a compression method and the runners.

A runner (local Optuna loop, or Ray Tune) builds one :class:`Method` per study run, calls
:meth:`Method.prepare` once before the first trial, then :meth:`Method.run_trial` once per Optuna
trial. The method turns the trial's parameters into a trained model (:class:`Candidate`); the
runner evaluates it (MACs, FID, latency) the same way for every method, saves its weights and
records everything in the study.
"""

from __future__ import annotations

import dataclasses
import typing
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from automl_diff.config._reader import Section
from automl_diff.config.study import StudyConfig
from automl_diff.errors import UserError
from automl_diff.models.loading import Teacher

__all__ = ["Candidate", "Method", "TrainingDiverged", "read_options", "require_range"]


class TrainingDiverged(RuntimeError):
    """A method's loss became NaN or infinite; the trial fails with this reason, the study goes on."""


@dataclass
class Candidate:
    """A trained model a trial produced.

    Attributes:
        unet: the model, ready to sample.
        config: its diffusers config (JSON-safe, with ``_class_name``): rebuilds the architecture.
        attrs: method-specific facts to record on the trial (JSON-safe: losses, seconds, ...).
        schedule: a DiP-GO gate schedule the model samples with (None: every block, every step).
        weights: a folder that already holds the model's weights (the runner saves none then).
        fingerprint: identifies the result; a trial whose fingerprint equals a completed trial's
            is pruned as a duplicate (for methods whose parameters can map to the same model).
    """

    unet: nn.Module
    config: dict[str, Any]
    attrs: dict[str, Any] = field(default_factory=dict)
    schedule: Any = None
    weights: str | None = None
    fingerprint: str | None = None


def read_options(options_type: type, config: StudyConfig) -> Any:
    """Validate ``config.method_options`` into the method's options dataclass.

    Field types (int, float, str, bool, and tuples of them read from lists) are checked; a field's ``metadata["choices"]`` restricts
    its values; unknown keys are rejected. Errors name the study file and ``method_options.<key>``.
    """
    section = Section(config.method_options, file=config.path, prefix="method_options")
    hints = typing.get_type_hints(options_type)
    values = {}
    for f in dataclasses.fields(options_type):
        kind = hints[f.name]
        if typing.get_origin(kind) is tuple:  # tuple[int, ...]: a list, each item checked
            values[f.name] = tuple(section.take_list(f.name, typing.get_args(kind)[0], f.default, check=f.metadata.get("check")))
            continue
        values[f.name] = section.take(f.name, kind, f.default, choices=f.metadata.get("choices"), check=f.metadata.get("check"))
    section.done()
    return options_type(**values)


def require_range(config: StudyConfig, options: Any, low: str, high: str) -> None:
    """Check that option ``low`` is below option ``high`` (a range Optuna samples from).

    Raises:
        UserError: naming the study file, ``method_options.<low>`` and both values.
    """
    if getattr(options, low) >= getattr(options, high):
        raise UserError(f"{config.path}: method_options.{low}: must be below {high} ({getattr(options, high)}) (got {getattr(options, low)})")


class Method(ABC):
    """A compression method (DKDM, DiffNAS, DiP-GO) as the runners see it.

    Args:
        config: the validated study config.
        teacher: the model to compress, on ``device``: a pretrained teacher, or the exported
            result of another study (stacking).
        reference: the original teacher when ``teacher`` is the result of another study (None:
            ``teacher`` itself). Methods that distil outputs (DKDM, DiffNAS's output term) take
            their targets from it; block features and gate consistency come from ``teacher``,
            whose architecture they mirror.
        device: torch device for training.
        progress: show progress bars.
    """

    #: Registry name (``method:`` in a study config).
    name: ClassVar[str]
    #: Dataclass of the method's ``method_options``.
    options_type: ClassVar[type]

    def __init__(
        self,
        config: StudyConfig,
        teacher: Teacher,
        *,
        reference: Teacher | None = None,
        device: str | torch.device = "cpu",
        progress: bool = False,
    ) -> None:
        self.config = config
        self.teacher = teacher
        self.reference = reference if reference is not None else teacher
        self.device = torch.device(device)
        self.progress = progress
        self.options = self.options_from(config)

    @classmethod
    def options_from(cls, config: StudyConfig) -> Any:
        """Validate the study's ``method_options`` (called when the config is loaded)."""
        return read_options(cls.options_type, config)

    def prepare(self, workdir: Path | None = None, study: Any = None) -> None:
        """One-time work before the first trial (called once per study run). Default: nothing.

        Args:
            workdir: the study's output folder, for results worth keeping across resumed runs.
            study: the ``optuna.Study`` the trials belong to (None outside a study), for methods
                that keep their own searches in the same storage.
        """

    def suggest(self, trial: Any) -> dict[str, Any]:
        """Ask the trial for all of the method's parameters, before any training.

        The runner calls this first (to skip a trial that repeats a finished one's parameters);
        asking again in :meth:`run_trial` returns the same values. Default: no parameters.
        """
        return {}

    def fingerprint(self, trial: Any) -> str | None:
        """Identify the model a trial will produce, before training it (after :meth:`prepare`).

        A trial whose fingerprint equals a completed trial's is pruned as a duplicate without
        training. Default: None (only identical parameters count as duplicates).
        """
        return None

    @abstractmethod
    def run_trial(self, trial: Any) -> Candidate:
        """Sample the trial's parameters, build and train the model, return it.

        Args:
            trial: an ``optuna.Trial`` (or ``optuna.trial.FixedTrial`` to rebuild a known one).
        """
