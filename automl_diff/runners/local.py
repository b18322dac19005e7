"""Running a study in this process: create or resume it in the RDB storage and run trials.

A study is created once and resumed ever after: ``n_trials`` is the total of finished trials
(completed or pruned) the study should reach, so running the same config twice adds nothing the
second time. Several workers (processes, hosts) may run the same config against one storage
(PostgreSQL for many): before each trial a worker counts the finished and running trials of all
workers, and a trial starts only while fewer than ``n_trials`` earlier trials are finished,
running or queued, so the workers together finish exactly ``n_trials``.

Crash recovery: a running trial writes heartbeats to the storage. When its worker dies, the trial
falls silent; the next worker that looks (a restarted one, or another) marks it failed and queues
a retry with the same parameters (Optuna's ``RetryHeartbeatStaleTrialCallback``). A trial that
diverges or runs out of memory fails with its ``fail_reason`` and the run goes on, up to a budget.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections import Counter
from collections.abc import Callable
from typing import Any

import optuna

from automl_diff.config.study import StudyConfig
from automl_diff.errors import UserError
from automl_diff.methods.base import recipe_of
from automl_diff.records import StudyAttr, TrialAttr
from automl_diff.runners.session import FINISHED_STATES, StudySession
from automl_diff.runners.storage import mask_url, open_storage

__all__ = ["begin_run", "make_sampler", "open_study", "run_study", "start_study"]

logger = logging.getLogger("automl_diff")

_TrialState = optuna.trial.TrialState
#: Trial states that hold a place among the ``n_trials`` (finished, running, or queued to run).
_PLACE_STATES = (_TrialState.COMPLETE, _TrialState.PRUNED, _TrialState.RUNNING, _TrialState.WAITING)
#: ``fail_reason`` prefix of a trial that found the study full when it started.
SURPLUS = "surplus"


def make_sampler(config: StudyConfig, *, offset: int = 0) -> optuna.samplers.BaseSampler:
    """The study's sampler. The seed is shifted by ``offset`` (the trials already in the study)
    so that a resumed study does not replay the proposals of its first run."""
    settings = config.sampler
    seed = None if settings.seed is None else settings.seed + offset
    options: dict[str, Any] = dict(settings.options)
    try:
        if settings.name == "tpe":
            options.setdefault("n_startup_trials", min(10, max(2, config.n_trials // 3)))
            options.setdefault("multivariate", True)
            if options["multivariate"] and getattr(config.method_options, "warm_start", ()):
                options.setdefault("group", True)  # recipe trials hold no parameters: model the others' apart
            return optuna.samplers.TPESampler(seed=seed, **options)
        if settings.name == "nsga2":
            options.setdefault("population_size", max(2, min(20, config.n_trials // 2)))
            return optuna.samplers.NSGAIISampler(seed=seed, **options)
        return optuna.samplers.RandomSampler(seed=seed, **options)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{config.path}: sampler.options: {exc}") from None


def open_study(config: StudyConfig, *, storage_url: str, study_name: str) -> tuple[optuna.Study, optuna.storages.BaseStorage]:
    """Create the study, or load it when it exists; refuse one with other objectives, another method or
    another teacher (its trials would not be comparable). Returns the study and its storage."""
    storage = open_storage(storage_url, heartbeat_interval=config.execution.heartbeat, retries=config.execution.retries)
    existing = study_name in optuna.study.get_all_study_names(storage)
    n_existing = 0
    if existing:
        study = optuna.load_study(study_name=study_name, storage=storage)
        stored = study.user_attrs.get(StudyAttr.OBJECTIVES)
        if stored is not None and stored != config.objective_names:
            raise UserError(
                f"{config.path}: objectives: study '{study_name}' in {mask_url(storage_url)} optimises "
                f"{', '.join(stored)}; use another --study-name for {', '.join(config.objective_names)}"
            )
        if [d.name.lower() for d in study.directions] != config.directions:
            raise UserError(f"{config.path}: objectives: directions differ from study '{study_name}' in {mask_url(storage_url)}")
        for key, value, what in ((StudyAttr.METHOD, config.method, "runs method"), (StudyAttr.TEACHER, config.teacher, "compresses")):
            recorded = study.user_attrs.get(key)
            if recorded is not None and recorded != value:
                raise UserError(
                    f"{config.path}: {key}: study '{study_name}' in {mask_url(storage_url)} {what} '{recorded}', not '{value}'; "
                    f"use another --study-name"
                )
        n_existing = len(study.trials)
    study = optuna.create_study(
        storage=storage,
        study_name=study_name,
        directions=config.directions,
        sampler=make_sampler(config, offset=n_existing),
        load_if_exists=True,
    )
    if not existing:
        study.set_metric_names(config.objective_names)
        study.set_user_attr(StudyAttr.OBJECTIVES, config.objective_names)
        study.set_user_attr(StudyAttr.METHOD, config.method)
        study.set_user_attr(StudyAttr.TEACHER, config.teacher)
        study.set_user_attr(StudyAttr.CONFIG_FILE, config.path)
        study.set_user_attr(StudyAttr.SEARCH_SPACE, config.search_space.path if config.search_space is not None else None)
    return study, storage


def finished_trials(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED_STATES))


def start_study(config: StudyConfig, *, storage_url: str, study_name: str, progress: bool = False) -> tuple[StudySession, optuna.Study]:
    """Validate everything a run needs, then create or resume the study.

    The teacher, the method (search space against the teacher), the evaluator, the device and the
    sampler options are checked before the storage is opened, so a bad input leaves it untouched.
    """
    session = StudySession(config, study_name=study_name, progress=progress)
    make_sampler(config)
    study, session.storage = open_study(config, storage_url=storage_url, study_name=study_name)
    return session, study


def begin_run(
    config: StudyConfig,
    *,
    storage_url: str | None,
    study_name: str | None,
    n_trials: int | None,
    progress: bool = False,
) -> tuple[StudySession, optuna.Study, int]:
    """What every backend does before its first trial: apply the command-line overrides,
    :func:`start_study`, log where the study stands, measure the teacher once, enqueue the
    method's warm-start recipes that the study does not hold yet.

    Returns:
        The session, the study and the total of finished trials to reach.
    """
    storage_url = storage_url or config.storage
    study_name = study_name or config.name
    total = n_trials or config.n_trials
    session, study = start_study(config, storage_url=storage_url, study_name=study_name, progress=progress)
    logger.info("study '%s' in %s: %d of %d trials finished", study_name, mask_url(storage_url), finished_trials(study), total)
    session.record_teacher(study)
    session.enqueue_recipes(study)
    return session, study, total


def _objective(session: StudySession, total: int, errors: list[UserError]) -> Callable[[optuna.Trial], Any]:
    """The session's objective, for a trial that still has a place among the ``total``.

    A trial that finds ``total`` earlier trials finished, running or queued (another worker asked
    at the same moment) does nothing and fails as surplus; so does a warm-start recipe that an
    earlier trial already makes (workers that start together each enqueue it). A
    :class:`UserError` met inside a trial fails it with that reason and is raised again after the
    trial is recorded (no traceback).
    """

    def objective(trial: optuna.Trial) -> Any:
        nan = tuple(math.nan for _ in session.config.objective_names)
        earlier = [t for t in trial.study.get_trials(deepcopy=False, states=_PLACE_STATES) if t.number < trial.number]
        if len(earlier) >= total:
            trial.set_user_attr(TrialAttr.FAIL_REASON, f"{SURPLUS}: {total} earlier trials were finished or running")
            return nan
        recipe = recipe_of(trial)
        twin = next((t.number for t in earlier if recipe is not None and recipe_of(t) == recipe), None)
        if twin is not None:
            trial.set_user_attr(TrialAttr.FAIL_REASON, f"{SURPLUS}: trial {twin} makes the recipe {recipe}")
            return nan
        try:
            return session.objective(trial)
        except UserError as exc:
            trial.set_user_attr(TrialAttr.FAIL_REASON, str(exc))
            errors.append(exc)
            return nan

    return objective


def run_study(
    config: StudyConfig,
    *,
    storage_url: str | None = None,
    study_name: str | None = None,
    n_trials: int | None = None,
    progress: bool = False,
) -> optuna.Study:
    """Create or resume the study and run trials until it has ``n_trials`` finished ones.

    Args:
        config: the study config.
        storage_url: overrides ``config.storage``.
        study_name: overrides ``config.name``.
        n_trials: overrides ``config.n_trials`` (total finished trials, not "this many more").
        progress: show progress bars.

    Returns:
        The study.
    """
    session, study, total = begin_run(config, storage_url=storage_url, study_name=study_name, n_trials=n_trials, progress=progress)
    budget = config.execution.failure_budget or max(3, total)
    poll = min(5.0, float(config.execution.heartbeat))
    errors: list[UserError] = []
    objective = _objective(session, total, errors)
    failed = 0
    waiting_logged = False
    while True:
        with warnings.catch_warnings():  # experimental in Optuna, as used inside study.optimize
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        trials = study.get_trials(deepcopy=False)
        states = Counter(t.state for t in trials)
        finished = states[_TrialState.COMPLETE] + states[_TrialState.PRUNED]
        if finished >= total:
            break
        if failed >= budget:
            logger.warning("stopping: %d trials failed in this run; %d of %d finished", failed, finished, total)
            break
        if finished + states[_TrialState.RUNNING] >= total:
            # the rest are running elsewhere: wait until they finish, or fail and are retried here
            if not waiting_logged:
                logger.info("%d of %d trials finished, %d running in other workers: waiting", finished, total, states[_TrialState.RUNNING])
                waiting_logged = True
            time.sleep(poll)
            continue
        waiting_logged = False
        # reseeded per trial from the study's size: reproducible alone, different across workers
        study.sampler = make_sampler(config, offset=len(trials))
        outcome: list[optuna.trial.FrozenTrial] = []
        study.optimize(objective, n_trials=1, callbacks=[lambda _study, trial, outcome=outcome: outcome.append(trial)], gc_after_trial=True)
        if errors:
            raise errors[0]
        if (
            outcome
            and outcome[0].state == _TrialState.FAIL
            and not str(outcome[0].user_attrs.get(TrialAttr.FAIL_REASON, "")).startswith(SURPLUS)
        ):
            failed += 1
    return study
