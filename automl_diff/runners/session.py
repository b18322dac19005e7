"""The set-up of a study run and what one trial does, whatever backend runs it.

:class:`StudySession` loads the teachers, checks the config against them once
(:meth:`~automl_diff.config.StudyConfig.check_against`), builds the method and the evaluator, and
exposes :meth:`StudySession.objective`, the Optuna objective both backends call: train a
candidate, save it, evaluate it, record it.
"""

from __future__ import annotations

import gc
import json
import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import optuna
import torch

from automl_diff.config.study import StudyConfig, resolve_device
from automl_diff.errors import UserError
from automl_diff.evaluation import Evaluator, ModelMetrics
from automl_diff.methods import METHODS, Rungs, TrainingDiverged, TrainingFailed
from automl_diff.methods.base import recipe_of
from automl_diff.models.loading import ExportInfo, Teacher, denoiser_folder, load_teacher, read_export_info
from automl_diff.records import StudyAttr, StudyFolder, TrialAttr
from automl_diff.runners.artifacts import artifact_store, attach_samples, check_store, upload_folder
from automl_diff.runners.pruning import MOASHA
from automl_diff.zoo import TEACHERS

__all__ = ["FINISHED_STATES", "StudySession", "resolve_original_teacher"]

logger = logging.getLogger("automl_diff")

#: Trial states that count towards ``n_trials``.
FINISHED_STATES = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
#: Exceptions that fail one trial (reason recorded) but let the study go on.
TRIAL_FAILURES: tuple[type[BaseException], ...] = (TrainingDiverged, TrainingFailed, torch.OutOfMemoryError)


def _load(config: StudyConfig, key: str, source: str, *, device: str, dtype: torch.dtype) -> Teacher:
    """A teacher the config names under ``key``, errors naming the file and the key."""
    try:
        return load_teacher(source, device=device, dtype=dtype)
    except UserError as exc:
        raise UserError(f"{config.path}: {key}: {exc}") from None


def resolve_original_teacher(config: StudyConfig) -> tuple[str, ExportInfo | None]:
    """The teacher a study's chain started from, and the export record of its starting model.

    ``teacher`` may be an export of another study (stacking): then the original teacher is
    ``original_teacher`` when the config names one, else the one the export records. For a
    pretrained teacher both are the same and the record is None.

    Raises:
        UserError: the export samples with a DiP-GO schedule (a further study would drop it), the
            teacher it records is not on this machine, or ``original_teacher`` is set for a
            teacher that is not an export.
    """
    info = None if config.teacher in TEACHERS else read_export_info(config.teacher)
    if info is not None and info.schedule:
        raise UserError(
            f"{config.path}: teacher: {config.teacher} samples with a DiP-GO schedule ({info.schedule}), which a further "
            "study would drop; start from the model it was scheduled for (its study's teacher) instead"
        )
    if info is None and config.original_teacher not in (None, config.teacher):
        raise UserError(
            f"{config.path}: original_teacher: only a teacher that is an export of another study (a folder with "
            f"automl_diff.json) has an original teacher; {config.teacher} is not one"
        )
    original = config.original_teacher or (info.original_teacher if info is not None else None) or config.teacher
    if info is not None and config.original_teacher is None and original.startswith("/") and not Path(original).exists():
        raise UserError(
            f"{config.path}: teacher: the export {config.teacher} was made from the teacher '{original}', which is not on "
            "this machine; name it with original_teacher:"
        )
    return original, info


class StudySession:
    """The shared state of the trials of one study run.

    The *teacher* is the model the study compresses: a pretrained model, or an exported model of
    another study (stacking: DiP-GO on a DiffNAS student, say). The *original teacher* is the model
    the chain started from; it is the yardstick (FID, MACs and speedup are measured against it) and
    gives the distillation targets of DKDM and DiffNAS. Without stacking they are one model.

    Args:
        config: the study config.
        study_name: name of the study in the storage.
        progress: show progress bars.
    """

    def __init__(self, config: StudyConfig, *, study_name: str, progress: bool = False) -> None:
        self.config = config
        self.study_name = study_name
        self.progress = progress
        self.device = resolve_device(config.device, source=config.path)
        if config.dtype == "float16" and not self.device.startswith("cuda"):
            raise UserError(f"{config.path}: dtype: float16 needs a CUDA device (device is {self.device}); use bfloat16 or float32")
        dtype = getattr(torch, config.dtype)
        #: Where the trials' weights, sample grids and the teacher's pipeline are copied for every host.
        self.store_location = config.execution.artifact_store or str(self.folder.artifacts)
        check_store(self.store_location, where=f"{config.path}: execution.artifact_store")
        self._store: Any = None
        original, info = resolve_original_teacher(config)
        self.teacher: Teacher = _load(config, "teacher", config.teacher, device=self.device, dtype=dtype)
        #: The studies and trials that made the teacher, oldest first (empty: a pretrained teacher).
        self.lineage: list[dict[str, Any]] = info.lineage if info is not None else []
        self.original: Teacher = self.teacher
        if original != config.teacher:
            self.original = _load(config, "original_teacher", original, device=self.device, dtype=dtype)
        config.check_against(self.teacher, self.original)
        self.method = METHODS[config.method].from_config(
            config, self.teacher, original=self.original, device=self.device, progress=progress
        )
        self.evaluator = Evaluator(
            replace(config.evaluation, dtype=config.dtype), self.original, device=self.device, where=config.path, progress=progress
        )
        #: The study's storage, once a runner has opened it (methods keep their own searches beside
        #: the study; sample notes name the study's and trial's ids in it).
        self.storage: optuna.storages.BaseStorage | None = None
        #: The original teacher's metrics, once :meth:`record_teacher` has measured or read them.
        self.teacher_metrics: dict[str, Any] | None = None
        self._prepared = False

    @property
    def stacked(self) -> bool:
        """The study starts from a model other than the original teacher."""
        return self.original is not self.teacher

    @property
    def folder(self) -> StudyFolder:
        return StudyFolder.of(self.config.output_dir, self.study_name)

    def store(self, study: optuna.Study) -> Any:
        """The study's artifact store, its location recorded in the study (a rerun may move it)."""
        if self._store is None:
            self._store = artifact_store(self.store_location)
        if study.user_attrs.get(StudyAttr.ARTIFACT_STORE) != self.store_location:
            study.set_user_attr(StudyAttr.ARTIFACT_STORE, self.store_location)
        return self._store

    def record_teacher(self, study: optuna.Study) -> dict[str, Any]:
        """The original teacher's metrics, measured once per study and kept as study user
        attributes together with its scheduler config, the evaluation setup and the lineage;
        returns the metrics (read from the study once per run after that). A stacked study also
        measures the model it starts from."""
        if self.teacher_metrics is None:
            self.teacher_metrics = self._record_teacher(study)
        return self.teacher_metrics

    def _record_teacher(self, study: optuna.Study) -> dict[str, Any]:
        stored = study.user_attrs.get(StudyAttr.TEACHER_METRICS)
        if stored:
            recorded = study.user_attrs.get(StudyAttr.ORIGINAL_TEACHER)
            if recorded is not None and recorded != self.original.source:
                raise UserError(
                    f"{self.config.path}: original_teacher: study '{self.study_name}' measures against '{recorded}', not "
                    f"'{self.original.source}'; use another --study-name for another yardstick"
                )
            return stored
        study.set_user_attr(StudyAttr.SCHEDULER_CONFIG, dict(self.teacher.scheduler_config))
        study.set_user_attr(StudyAttr.ORIGINAL_TEACHER, self.original.source)
        study.set_user_attr(StudyAttr.LINEAGE, self.lineage)
        parts = self.original.latent
        if parts is not None:  # its VAE (and text encoder, tokenizer) go into every export, from any host
            copy = upload_folder(self.store(study), parts.folder, study, only=("model_index.json", *parts.parts)) if parts.folder else None
            study.set_user_attr(StudyAttr.PIPELINE, {"class": parts.pipeline_class, "folder": parts.folder, "artifact": copy})
        study.set_user_attr(StudyAttr.EVALUATION, self.evaluator.evaluation.to_record())
        logger.info("measuring the teacher (MACs, FID on %d samples, latency)", self.evaluator.evaluation.fid_samples)
        metrics = self.evaluator.evaluate(self.original.unet, desc="teacher").to_dict()
        self._log_metrics("teacher", metrics)
        if self.stacked:
            logger.info("measuring the starting model %s the same way", self.teacher.source)
            start = self.evaluator.evaluate(self.teacher.unet, desc="starting model").to_dict()
            self._log_metrics("starting model", start)
            study.set_user_attr(StudyAttr.START_METRICS, start)
        study.set_user_attr(StudyAttr.TEACHER_METRICS, metrics)  # last: a study with it has everything above
        return metrics

    @staticmethod
    def _log_metrics(what: str, metrics: dict[str, Any]) -> None:
        fid = metrics.get(TrialAttr.FID)
        logger.info(
            "%s: %.3gM params, %.3gM MACs per call, %s, %.4g s per image",
            what,
            metrics[TrialAttr.PARAMS] / 1e6,
            metrics[TrialAttr.MACS] / 1e6,
            "no FID" if fid is None else f"FID {fid:.4g}",
            metrics[TrialAttr.LATENCY],
        )

    def enqueue_recipes(self, study: optuna.Study) -> list[str]:
        """Enqueue each of the method's warm-start recipes that no trial of the study holds yet
        (a failed one is tried again) as a waiting trial, so that the next trials make them;
        returns the recipes enqueued."""
        held = {recipe_of(t) for t in study.get_trials(deepcopy=False) if t.state != optuna.trial.TrialState.FAIL}
        missing = [recipe for recipe in self.method.recipes if recipe not in held]
        for recipe in missing:
            study.enqueue_trial({}, user_attrs={TrialAttr.RECIPE: recipe})
        if missing:
            logger.info("warm start: %s enqueued as the next trials", ", ".join(missing))
        return missing

    def prepare(self, study: optuna.Study, storage: optuna.storages.BaseStorage | None = None) -> None:
        """The method's one-time work, before the first trial of this run that needs it."""
        if not self._prepared:
            self.method.prepare(self.folder.path, storage=storage, study_name=study.study_name)
            self._prepared = True

    @staticmethod
    def _duplicate_of(study: optuna.Study, trial: optuna.Trial, fingerprint: str) -> int | None:
        """A completed trial that makes the same model, or an earlier trial that another worker
        is running for it (so that concurrent workers never train one model twice). Trials
        recorded without a fingerprint (older studies, or still preparing) match by parameters."""
        running = optuna.trial.TrialState.RUNNING
        for other in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE, running)):
            if other.number == trial.number or (other.state == running and other.number > trial.number):
                continue
            theirs = other.user_attrs.get(TrialAttr.FINGERPRINT)
            same_recipe = recipe_of(other) == recipe_of(trial)
            if theirs == fingerprint or (theirs is None and other.params == trial.params and same_recipe):
                return other.number
        return None

    def objective(self, trial: optuna.Trial) -> tuple[float, ...]:
        """Train, save, evaluate and record one trial; return its objective values.

        A trial whose training diverges (NaN or infinite loss) or that runs out of memory records
        why as the user attribute ``fail_reason`` and returns NaN values, which Optuna records as a
        failed trial (one warning, no traceback); the study goes on with the next trial.
        """
        try:
            return self._run_trial(trial)
        except TRIAL_FAILURES as exc:
            reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else 'no message'}"
            trial.set_user_attr(TrialAttr.FAIL_REASON, reason)
            logger.warning("trial %d failed: %s", trial.number, reason)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return tuple(math.nan for _ in self.config.objective_names)

    def _run_trial(self, trial: optuna.Trial) -> tuple[float, ...]:
        study = trial.study
        params = self.method.suggest(trial)
        self.prepare(study, self.storage)
        fingerprint = self.method.fingerprint(params)
        trial.set_user_attr(TrialAttr.FINGERPRINT, fingerprint)
        duplicate = self._duplicate_of(study, trial, fingerprint)
        if duplicate is not None:
            trial.set_user_attr(TrialAttr.DUPLICATE_OF, duplicate)
            logger.info("trial %d repeats trial %d: pruned", trial.number, duplicate)
            raise optuna.TrialPruned(f"same model as trial {duplicate}")
        pruner = self.config.pruner
        rungs = Rungs(pruner.rungs, MOASHA(pruner, trial, self.evaluator.macs)) if pruner.enabled else None
        candidate = self.method.run_trial(params, number=trial.number, rungs=rungs)
        folder = self.folder.trial(trial.number)
        weights = candidate.weights
        if weights is None:
            weights = str(StudyFolder.weights(folder))
            candidate.unet.save_pretrained(weights, safe_serialization=True)
        trial.set_user_attr(TrialAttr.WEIGHTS, weights)
        trial.set_user_attr(TrialAttr.WEIGHTS_ARTIFACT, self._weights_copy(trial, weights))
        trial.set_user_attr(TrialAttr.MODEL_CONFIG, json.loads(json.dumps(candidate.config)))
        if candidate.schedule is not None:
            path = candidate.schedule.save(StudyFolder.schedule(folder))
            trial.set_user_attr(TrialAttr.SCHEDULE_FILE, str(path))
            trial.set_user_attr(TrialAttr.SCHEDULE, candidate.schedule.to_dict())
        for key, value in candidate.attrs.items():
            trial.set_user_attr(key, value)
        metrics = self.evaluator.evaluate(candidate.unet, schedule=candidate.schedule, desc=f"trial {trial.number} sampling")
        self._record(trial, metrics, self.record_teacher(study))  # read from the study once per run
        if self.evaluator.last_samples is not None:
            attach_samples(
                trial,
                self.evaluator.last_samples,
                folder=folder,
                store=self.store(study),
                metrics=metrics.to_dict(),
                storage=self.storage,
                prompts=self.evaluator.last_prompts,
            )
        values = metrics.to_dict()
        return tuple(float(values[name]) for name in self.config.objective_names)

    def _weights_copy(self, trial: optuna.Trial, weights: str) -> str:
        """The artifact id of the weights folder's copy in the store: another trial's where it
        saved the same folder (DiP-GO's schedules of one model), else a new upload."""
        for other in trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            if other.user_attrs.get(TrialAttr.WEIGHTS) == weights and other.user_attrs.get(TrialAttr.WEIGHTS_ARTIFACT):
                return other.user_attrs[TrialAttr.WEIGHTS_ARTIFACT]
        return upload_folder(self.store(trial.study), denoiser_folder(Path(weights)), trial)  # not a pipeline's other parts

    @staticmethod
    def _record(trial: optuna.Trial, metrics: ModelMetrics, teacher: dict[str, Any]) -> None:
        for key, value in metrics.to_dict().items():
            trial.set_user_attr(key, value)
        if teacher.get(TrialAttr.LATENCY) and metrics.latency:
            trial.set_user_attr(TrialAttr.SPEEDUP, teacher[TrialAttr.LATENCY] / metrics.latency)
        if teacher.get(TrialAttr.TRAJECTORY_MACS) and metrics.trajectory_macs:
            trial.set_user_attr(TrialAttr.MACS_REDUCTION, teacher[TrialAttr.TRAJECTORY_MACS] / metrics.trajectory_macs)
        elif teacher.get(TrialAttr.MACS) and metrics.macs:
            trial.set_user_attr(TrialAttr.MACS_REDUCTION, teacher[TrialAttr.MACS] / metrics.macs)
