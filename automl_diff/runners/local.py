"""Running a study in this process: create or resume it in the RDB storage and optimise.

A study is created once and resumed ever after: ``n_trials`` is the total of finished trials the
study should reach, so running the same config twice adds nothing the second time, and several
workers on one storage stop together when the total is reached (``MaxTrialsCallback``).
"""

from __future__ import annotations

import logging
from typing import Any

import optuna

from automl_diff.config.study import StudyConfig
from automl_diff.errors import UserError
from automl_diff.runners.storage import mask_url, open_storage
from automl_diff.runners.trial import FINISHED_STATES, TRIAL_FAILURES, StudySession

__all__ = ["make_sampler", "open_study", "run_study"]

logger = logging.getLogger("automl_diff")


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
            return optuna.samplers.TPESampler(seed=seed, **options)
        if settings.name == "nsga2":
            options.setdefault("population_size", max(2, min(20, config.n_trials // 2)))
            return optuna.samplers.NSGAIISampler(seed=seed, **options)
        return optuna.samplers.RandomSampler(seed=seed, **options)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{config.path}: sampler.options: {exc}") from None


def open_study(config: StudyConfig, *, storage_url: str, study_name: str) -> optuna.Study:
    """Create the study, or load it when it exists; refuse one with other objectives."""
    storage = open_storage(storage_url)
    existing = study_name in optuna.study.get_all_study_names(storage)
    n_existing = 0
    if existing:
        study = optuna.load_study(study_name=study_name, storage=storage)
        stored = study.user_attrs.get("objectives")
        if stored is not None and stored != config.objective_names:
            raise UserError(
                f"{config.path}: objectives: study '{study_name}' in {mask_url(storage_url)} optimises "
                f"{', '.join(stored)}; use another --study-name for {', '.join(config.objective_names)}"
            )
        if [d.name.lower() for d in study.directions] != config.directions:
            raise UserError(f"{config.path}: objectives: directions differ from study '{study_name}' in {mask_url(storage_url)}")
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
        study.set_user_attr("objectives", config.objective_names)
        study.set_user_attr("method", config.method)
        study.set_user_attr("teacher", config.teacher)
        study.set_user_attr("config_file", config.path)
        study.set_user_attr("search_space", config.search_space)
    return study


def finished_trials(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED_STATES))


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
    storage_url = storage_url or config.storage
    study_name = study_name or config.name
    total = n_trials or config.n_trials
    # Load the teacher and validate the search space before the storage is touched.
    session = StudySession(config, study_name=study_name, progress=progress)
    study = open_study(config, storage_url=storage_url, study_name=study_name)
    done = finished_trials(study)
    logger.info("study '%s' in %s: %d of %d trials finished", study_name, mask_url(storage_url), done, total)
    session.record_teacher(study)
    # Trials that fail (diverged, out of memory) do not count: try again, up to a failure budget.
    failure_budget = max(3, total)
    failed = 0
    while (remaining := total - finished_trials(study)) > 0:
        if failed >= failure_budget:
            logger.warning("stopping: %d trials failed in this run; %d of %d finished", failed, total - remaining, total)
            break
        before = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,)))
        study.optimize(
            session.objective,
            n_trials=remaining,
            callbacks=[optuna.study.MaxTrialsCallback(total, states=FINISHED_STATES)],
            catch=TRIAL_FAILURES,
            gc_after_trial=True,
        )
        failed += len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,))) - before
    return study
