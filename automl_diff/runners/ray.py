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
* Each trial records the Ray node it runs on (``ray_node``: node id, IP and host name).
* A worker that crashes, or a node that dies under a trial, is retried up to
  ``execution.max_failures`` times (``FailureConfig``), on any node with the resources. The lost
  attempt's Optuna trial is failed with the reason (which node, whether it died) and the retry
  is a new Optuna trial with the same parameters that names it in its retry history, as
  Optuna's ``RetryFailedTrialCallback`` does for the local runner; completed trials are never
  touched, and the study still reaches its total. A restarted trial whose result is already in
  the study reports it instead of training again.
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
  as a Ray Train ``TorchTrainer`` run inside its Tune trial (``execution.launcher: auto``): the
  run's placement group reserves one CPU (or GPU) per rank and spreads the ranks over the
  cluster's nodes, and rung scores and early stopping work as on one node. The trial's own
  worker keeps its ``cpus_per_trial``/``gpus_per_trial`` for evaluating the trained model.
  ``launcher: torchrun`` runs the ranks inside the trial's worker instead (one node).
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import math
import os
import socket
import time
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

        def __init__(self, *args: Any, study_name: str, storage: optuna.storages.BaseStorage, **kwargs: Any) -> None:
            super().__init__(*args, study_name=study_name, storage=storage, **kwargs)
            self.study_name, self.storage = study_name, storage
            self.numbers: dict[str, int] = {}  # Tune trial id: the Optuna trial it asked

        def suggest(self, trial_id: str) -> dict | None:
            config = super().suggest(trial_id)
            if isinstance(config, dict) and TRIAL_NUMBER_KEY in config:
                self.numbers[trial_id] = config[TRIAL_NUMBER_KEY]
            return config

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            if error and trial_id in self.numbers:  # failed for good: its last attempt's Optuna trial fails with the reason
                study = optuna.load_study(study_name=self.study_name, storage=self.storage)
                if _give_up(self.storage, study, self.numbers[trial_id]):
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


def _this_node() -> dict[str, str]:
    import ray

    return {"id": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address(), "host": socket.gethostname()}


#: Seconds a retry waits for the cluster to mark a lost attempt's node dead: a node's death reaches
#: the cluster's list of nodes (its health checks) some seconds after its workers' deaths do.
NODE_DEATH_WAIT = 30.0


def _lost(node: dict[str, str]) -> str:
    """Why an attempt that started on ``node`` ended without a result, as the cluster tells it
    (waiting up to :data:`NODE_DEATH_WAIT` seconds for a node still listed alive)."""
    import ray

    where = f"Ray node {node['id'][:12]} ({node['ip']}, {node['host']})"
    deadline = time.monotonic() + NODE_DEATH_WAIT
    while True:
        alive = {n["NodeID"]: n["Alive"] for n in ray.nodes()}
        if node["id"] not in alive:
            return f"lost mid-trial: {where} is no longer in the cluster (its Ray instance was stopped with the driver)"
        if not alive[node["id"]]:
            return f"lost mid-trial: {where} died"
        if time.monotonic() > deadline:
            return f"lost mid-trial: its worker on {where} died"
        time.sleep(1.0)


def _reason(attempt: optuna.trial.FrozenTrial) -> str:
    """Why a running attempt ended without a result: the exception it raised, else the cluster's word."""
    node = attempt.user_attrs.get(TrialAttr.NODE)
    return attempt.user_attrs.get(TrialAttr.FAIL_REASON) or (_lost(node) if node else "its Ray worker failed before the trial started")


def _newest_attempt(storage: optuna.storages.BaseStorage, study: optuna.Study, number: int) -> tuple[optuna.trial.FrozenTrial, int]:
    """The newest of Optuna trial ``number`` and its retries, and its trial id."""
    chain = [t for t in study.get_trials(deepcopy=False) if t.number == number or number in t.system_attrs.get("retry_history", ())]
    current = max(chain, key=lambda t: t.number)
    study_id = storage.get_study_id_from_name(study.study_name)
    return current, storage.get_trial_id_from_study_id_trial_number(study_id, current.number)


def _attempt(storage: optuna.storages.BaseStorage, study: optuna.Study, number: int) -> int:
    """The id of the Optuna trial an attempt of the Tune trial that asked Optuna trial ``number``
    runs or reports: the newest of ``number`` and its retries. One that an earlier attempt left
    running on a node (the attempt was lost with its worker, its node or its driver) is failed
    with the reason, and a new trial with its parameters, naming it in its retry history, is
    the one to run."""
    current, current_id = _newest_attempt(storage, study, number)
    if current.state.is_finished() or TrialAttr.NODE not in current.user_attrs:
        return current_id
    reason = _reason(current)
    storage.set_trial_user_attr(current_id, TrialAttr.FAIL_REASON, reason)
    storage.set_trial_state_values(current_id, state=optuna.trial.TrialState.FAIL)
    history = [*current.system_attrs.get("retry_history", ()), current.number]
    retry = optuna.trial.FrozenTrial(
        number=-1,
        state=optuna.trial.TrialState.RUNNING,
        value=None,
        datetime_start=datetime.datetime.now(),
        datetime_complete=None,
        params=current.params,
        distributions=current.distributions,
        user_attrs={k: v for k, v in current.user_attrs.items() if k in (TrialAttr.RECIPE,)},
        system_attrs={**current.system_attrs, "failed_trial": current.number, "retry_history": history},
        intermediate_values={},
        trial_id=-1,
    )
    retry_id = storage.create_new_trial(storage.get_study_id_from_name(study.study_name), template_trial=retry)
    logger.warning("trial %d %s; retried as trial %d", current.number, reason, storage.get_trial_number_from_id(retry_id))
    return retry_id


def _give_up(storage: optuna.storages.BaseStorage, study: optuna.Study, number: int) -> bool:
    """Fail the newest running trial of Tune trial ``number``'s attempts (``number`` or one of its
    retries) with its reason; whether ``number`` itself is still to be failed (by the searcher)."""
    current, current_id = _newest_attempt(storage, study, number)
    if current.state != optuna.trial.TrialState.RUNNING:
        return False
    storage.set_trial_user_attr(current_id, TrialAttr.FAIL_REASON, f"{_reason(current)}; no retries left (execution.max_failures)")
    if current.number == number:
        return True
    storage.set_trial_state_values(current_id, state=optuna.trial.TrialState.FAIL)
    return False


def _trainable(tune_config: dict[str, Any], *, config: StudyConfig, study_name: str, storage_url: str) -> None:
    """A Tune function trainable: one Optuna trial through :meth:`StudySession.objective`."""
    from ray import tune

    storage = open_storage(storage_url, heartbeat_interval=None)
    study = optuna.load_study(study_name=study_name, storage=storage)
    trial_id = _attempt(storage, study, int(tune_config[TRIAL_NUMBER_KEY]))
    if not storage.get_trial(trial_id).state.is_finished():
        storage.set_trial_user_attr(trial_id, TrialAttr.NODE, _this_node())
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
        except Exception as exc:  # Tune retries the attempt; the retry names this reason
            trial.set_user_attr(TrialAttr.FAIL_REASON, f"{type(exc).__name__}: {first_line(exc)}")
            raise
        else:
            study.tell(trial, list(values))  # NaN values (diverged, out of memory): a failed trial
    frozen = storage.get_trial(trial_id)
    folder = StudyFolder.of(config.output_dir, study_name).trial(frozen.number)
    checkpoint = tune.Checkpoint.from_directory(str(folder)) if folder.is_dir() else None
    tune.report(_result(config, frozen), checkpoint=checkpoint)


def _init_ray(address: str | None) -> None:
    """Join the Ray cluster at ``address`` (or ``RAY_ADDRESS``; ``auto``: the one ``ray start``
    started on this machine), or start a local instance. Without an address Ray itself would
    join the instance that ``ray start`` last recorded on this machine, and wait forever on one
    that has since died."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    try:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, configure_logging=True)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        where = "a local Ray instance" if address == "local" else f"--address {address}"
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
        address: the Ray cluster to join (``ray start --head`` prints it); None: ``RAY_ADDRESS``, else a new local instance.
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
    if config.execution.launcher == "auto":  # data-parallel trials as Ray Train runs over the cluster
        config = dataclasses.replace(config, execution=dataclasses.replace(config.execution, launcher="ray_train"))
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
