"""Running a study as Ray Tune trials (``run CONFIG --backend ray [--address ADDR]``).

The driver validates the inputs and creates or resumes the study exactly as the local runner does
(:func:`~automl_diff.runners.local.begin_run`), measures the teacher once, then hands the
remaining trials to Ray Tune:

* Ray's ``OptunaSearch`` is the searcher. It asks the trials of the *same* Optuna study in the
  *same* storage, with the study's sampler, through the method's define-by-run ``suggest``; so
  ``status``, ``pareto``, ``export``, ``report`` and the dashboards read a Ray run unchanged.
* The trainable runs in a Ray worker (CPUs and GPUs per trial from the config's ``execution:``)
  and calls :meth:`StudySession.objective` on that Optuna trial, the same trial code as a local
  run; it records the outcome in the study itself (values, pruned duplicate, failed with
  ``fail_reason``), then reports it to Tune with the trial folder (weights, samples, schedule)
  as the trial's checkpoint.
* A worker that crashes is restarted up to ``execution.max_failures`` times (``FailureConfig``);
  a restarted trial whose result is already in the study reports it instead of training again.
* An interrupted experiment (driver stopped, trials left running) is resumed with
  ``Tuner.restore`` by running the same command again; otherwise each run starts a new Tune
  experiment for the trials still missing from ``n_trials``.
* With ``pruner:`` on, a trial stops early exactly as a local one does: at each rung the
  trainable records its held-out score on its Optuna trial and asks the shared MO-ASHA decision
  (:class:`~automl_diff.runners.pruning.MOASHA`), which ranks it against the other trials' rung
  scores in the same storage on (MACs, score); a stopped trial is recorded PRUNED with its rung
  scores and the reason. Tune's own schedulers are single-objective (they would stop the cheap,
  less accurate students of the front's low-MACs end first), so none is used.
* With ``execution.processes_per_trial`` (or ``gpus_per_trial``) above 1, a trial trains with DDP
  over the GPUs Ray reserved for it (``torchrun`` inside its worker, one node).
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import optuna

from automl_diff.config.study import StudyConfig
from automl_diff.errors import UserError, first_line
from automl_diff.records import StudyAttr, StudyFolder, TrialAttr
from automl_diff.runners.local import begin_run, finished_trials, make_sampler
from automl_diff.runners.session import StudySession
from automl_diff.runners.storage import open_storage

__all__ = ["run_study_ray"]

logger = logging.getLogger("automl_diff")

#: Key of the Tune config that names the Optuna trial (its number) a trainable runs.
TRIAL_NUMBER_KEY = "optuna_trial"

_sessions: dict[tuple[str, str], StudySession] = {}


class _Space:
    """The define-by-run search space OptunaSearch calls: the method's own ``suggest``, plus the
    Optuna trial id the trainable needs to record its result."""

    def __init__(self, session: StudySession) -> None:
        self.config = session.config
        self.study_name = session.study_name
        self._method = session.method

    def __getstate__(self) -> dict[str, Any]:  # Tune checkpoints the searcher: no models inside
        return {"config": self.config, "study_name": self.study_name, "_method": None}

    def __call__(self, trial: Any) -> dict[str, Any]:
        if self._method is None:
            self._method = _session(self.config, self.study_name).method
        self._method.suggest(trial)
        return {TRIAL_NUMBER_KEY: trial.number}


def _searcher_class() -> type:
    from ray.tune.search.optuna import OptunaSearch

    class StudySearch(OptunaSearch):
        """OptunaSearch whose trainables record their own outcome in the study (as local trials
        do); the searcher only fails the trials whose worker crashed for good."""

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            if error:
                super().on_trial_complete(trial_id, result=None, error=True)

    return StudySearch


def _session(config: StudyConfig, study_name: str) -> StudySession:
    """One session per worker process and study (Tune reuses actors between trials)."""
    key = (config.path, study_name)
    if key not in _sessions:
        _sessions[key] = StudySession(config, study_name=study_name)
    return _sessions[key]


def _result(config: StudyConfig, trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    values = trial.values or [math.nan] * len(config.objective_names)
    result: dict[str, Any] = dict(zip(config.objective_names, values))
    result.update(
        {"optuna_trial": trial.number, "state": trial.state.name, TrialAttr.FAIL_REASON: trial.user_attrs.get(TrialAttr.FAIL_REASON, "")}
    )
    return result


def _trainable(tune_config: dict[str, Any], *, config: StudyConfig, study_name: str, storage_url: str) -> None:
    """A Tune function trainable: one Optuna trial through :meth:`StudySession.objective`."""
    from ray import tune

    storage = open_storage(storage_url, heartbeat_interval=None)
    study = optuna.load_study(study_name=study_name, storage=storage)
    study_id = storage.get_study_id_from_name(study_name)
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, int(tune_config[TRIAL_NUMBER_KEY]))
    if not storage.get_trial(trial_id).state.is_finished():
        trial = optuna.Trial(study, trial_id)
        session = _session(config, study_name)
        session.storage = storage
        try:
            values = session.objective(trial)  # rungs: the shared MO-ASHA decision, as in a local run
        except optuna.TrialPruned:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        except UserError as exc:
            trial.set_user_attr(TrialAttr.FAIL_REASON, str(exc))
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        else:
            study.tell(trial, list(values))  # NaN values (diverged, out of memory): a failed trial
    frozen = storage.get_trial(trial_id)
    folder = StudyFolder.of(config.output_dir, study_name).trial(frozen.number)
    checkpoint = tune.Checkpoint.from_directory(str(folder)) if folder.is_dir() else None
    tune.report(_result(config, frozen), checkpoint=checkpoint)


def _init_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    try:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, configure_logging=True)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        where = f"--address {address}" if address else "a local Ray instance"
        raise UserError(f"{where}: cannot start or join Ray: {first_line(exc)}") from None


def run_study_ray(
    config: StudyConfig,
    *,
    storage_url: str | None = None,
    study_name: str | None = None,
    n_trials: int | None = None,
    address: str | None = None,
    progress: bool = False,
) -> optuna.Study:
    """Create or resume the study and run its missing trials as Ray Tune trials.

    Args:
        config: the study config (``execution:`` gives CPUs/GPUs per trial, concurrency, retries).
        storage_url: overrides ``config.storage``; every Ray node must reach it (PostgreSQL for a
            cluster; SQLite only when all workers share this machine's disk).
        study_name: overrides ``config.name``.
        n_trials: overrides ``config.n_trials`` (total finished trials, not "this many more").
        address: the Ray cluster to join (``ray start --head`` prints it); None: a local instance.
        progress: Tune's progress output.

    Returns:
        The study.
    """
    try:
        from ray import tune
        from ray.tune.search import ConcurrencyLimiter
    except ImportError:
        raise UserError("--backend ray: Ray Tune is not installed (pip install 'automl_diff[ray]')") from None
    storage_url = storage_url or config.storage
    study_name = study_name or config.name
    session, study, total = begin_run(config, storage_url=storage_url, study_name=study_name, n_trials=n_trials, progress=progress)
    _init_ray(address)
    execution = config.execution
    trainable = tune.with_resources(
        tune.with_parameters(_trainable, config=config, study_name=study_name, storage_url=storage_url),
        {"cpu": execution.cpus_per_trial, "gpu": execution.gpus_per_trial},
    )
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    previous = study.user_attrs.get(StudyAttr.RAY_EXPERIMENT)
    if running and previous and tune.Tuner.can_restore(previous):
        logger.info("resuming the interrupted Ray Tune experiment %s (%d trials were running)", previous, len(running))
        tuner = tune.Tuner.restore(previous, trainable, resume_unfinished=True, resume_errored=True)
    else:
        remaining = total - finished_trials(study) - len(running)
        if remaining <= 0:
            return study
        directions = ["min" if d == "minimize" else "max" for d in config.directions]
        names = config.objective_names
        searcher: Any = _searcher_class()(
            space=_Space(session),
            metric=names if len(names) > 1 else names[0],
            mode=directions if len(names) > 1 else directions[0],
            sampler=make_sampler(config, offset=len(study.trials)),
            study_name=study_name,
            storage=open_storage(storage_url, heartbeat_interval=None),
        )
        if execution.max_concurrent:
            searcher = ConcurrencyLimiter(searcher, max_concurrent=execution.max_concurrent)
        root = StudyFolder.of(config.output_dir, study_name).ray
        name = f"run_{len(study.trials)}"
        study.set_user_attr(StudyAttr.RAY_EXPERIMENT, str(root / name))
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=searcher, num_samples=remaining, reuse_actors=True),
            run_config=tune.RunConfig(
                name=name,
                storage_path=str(root),
                failure_config=tune.FailureConfig(max_failures=execution.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
                verbose=1 if progress else 0,
            ),
        )
    tuner.fit()
    study = optuna.load_study(study_name=study_name, storage=open_storage(storage_url, heartbeat_interval=None))
    left = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    if left:
        logger.warning("the Ray Tune experiment stopped with %d trials unfinished; run the same command again to resume it", len(left))
    return study
