"""Trial tables and the Pareto front of a study (MACs against FID, or whatever it optimises)."""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Any

import optuna

from automl_diff.records import StudyAttr, TrialAttr

__all__ = [
    "ALIGNMENT_METRICS",
    "COLUMNS",
    "TrialRow",
    "alignment_name",
    "alignment_of",
    "all_trials_frame",
    "pareto_rows",
    "teacher_metrics",
    "trial_rows",
    "trials_frame",
]

#: Columns of ``pareto --json``/``--csv``, in order.
COLUMNS = ("trial", TrialAttr.MACS, TrialAttr.PARAMS, TrialAttr.FID, TrialAttr.LATENCY, TrialAttr.SPEEDUP, TrialAttr.RECIPE)


@dataclass(frozen=True)
class TrialRow:
    """One finished trial. MACs per UNet forward pass (the mean over the steps for a DiP-GO
    schedule); trajectory MACs for one image's whole sampling run; latency in seconds per image;
    speedup is the teacher's latency divided by this one's (higher is faster); FID lower is better
    (None: a study with ``fid: none``); ``alignment`` is a text-to-image trial's
    ``prompt_accuracy`` or ``clip_score`` (higher is better); ``recipe`` names the known recipe
    a warm-start trial makes (``deepcache:5``)."""

    trial: int
    macs: int
    params: int
    fid: float | None
    latency: float
    speedup: float | None
    macs_no_attention: int | None = None
    trajectory_macs: int | None = None
    weights: str | None = None
    schedule_file: str | None = None
    alignment: float | None = None
    recipe: str | None = None

    @property
    def label(self) -> str:
        """The trial's number, with the recipe it makes: ``3 (deepcache:5)``."""
        return f"{self.trial} ({self.recipe})" if self.recipe else str(self.trial)

    def to_dict(self, columns: tuple[str, ...] = COLUMNS) -> dict[str, Any]:
        data = asdict(self)
        return {c: data[c] for c in columns}


def teacher_metrics(study: optuna.Study) -> dict[str, Any] | None:
    """The teacher's metrics as measured when the study started (None before that)."""
    return study.user_attrs.get(StudyAttr.TEACHER_METRICS)


def _row(trial: optuna.trial.FrozenTrial) -> TrialRow | None:
    attrs = trial.user_attrs
    if not all(k in attrs for k in (TrialAttr.MACS, TrialAttr.PARAMS, TrialAttr.LATENCY)):
        return None
    fid = attrs.get(TrialAttr.FID)
    return TrialRow(
        trial=trial.number,
        macs=int(attrs[TrialAttr.MACS]),
        params=int(attrs[TrialAttr.PARAMS]),
        fid=None if fid is None else float(fid),
        latency=float(attrs[TrialAttr.LATENCY]),
        speedup=attrs.get(TrialAttr.SPEEDUP),
        macs_no_attention=attrs.get(TrialAttr.MACS_NO_ATTENTION),
        trajectory_macs=attrs.get(TrialAttr.TRAJECTORY_MACS),
        weights=attrs.get(TrialAttr.WEIGHTS),
        schedule_file=attrs.get(TrialAttr.SCHEDULE_FILE),
        alignment=alignment_of(attrs),
        recipe=attrs.get(TrialAttr.RECIPE),
    )


#: Text-alignment metrics a trial may record, in the order they are looked for.
ALIGNMENT_METRICS = (TrialAttr.PROMPT_ACCURACY, TrialAttr.CLIP_SCORE)


def alignment_of(metrics: dict[str, Any]) -> float | None:
    """The text alignment a trial's (or the teacher's) metrics hold, if any."""
    return next((float(metrics[k]) for k in ALIGNMENT_METRICS if metrics.get(k) is not None), None)


def alignment_name(study: optuna.Study) -> str | None:
    """The text-alignment metric a study's trials record (None: an unconditional study)."""
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        for key in ALIGNMENT_METRICS:
            if trial.user_attrs.get(key) is not None:
                return key
    return None


def trial_rows(study: optuna.Study) -> list[TrialRow]:
    """Every completed trial with its metrics, by trial number."""
    trials = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return [r for r in map(_row, trials) if r is not None]


def pareto_rows(study: optuna.Study) -> list[TrialRow]:
    """The trials on the Pareto front of the study's objectives, by increasing MACs."""
    if not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        return []
    best = study.best_trials if len(study.directions) > 1 else [study.best_trial]
    rows = [r for r in map(_row, best) if r is not None]
    return sorted(rows, key=lambda r: (r.macs, r.fid if r.fid is not None else -(r.alignment or 0.0)))


def trials_frame(study: optuna.Study, *, pareto_only: bool = False) -> Any:
    """A pandas DataFrame of completed trials (or the front) with metrics and parameters."""
    import pandas as pd

    rows = pareto_rows(study) if pareto_only else trial_rows(study)
    params = {t.number: t.params for t in study.get_trials(deepcopy=False)}
    records = []
    for row in rows:
        record = asdict(row)
        record.update({f"param:{k}": v for k, v in params.get(row.trial, {}).items()})
        records.append(record)
    return pd.DataFrame.from_records(records, columns=None if records else list(COLUMNS))


#: Per-trial facts of :func:`all_trials_frame`, beside the state and the parameters.
TRIAL_FACTS = (
    TrialAttr.MACS,
    TrialAttr.TRAJECTORY_MACS,
    TrialAttr.PARAMS,
    TrialAttr.FID,
    TrialAttr.LATENCY,
    TrialAttr.SPEEDUP,
    TrialAttr.RECIPE,
    TrialAttr.DUPLICATE_OF,
    TrialAttr.FAIL_REASON,
    TrialAttr.PRUNE_REASON,
    TrialAttr.PRUNED_AT_RUNG,
    TrialAttr.RUNG_SCORES,
)


def all_trials_frame(study: optuna.Study) -> Any:
    """A pandas DataFrame of every trial, whatever its state: number, state, the metrics it has
    (empty where it has none; a text-to-image study's alignment metric too), why it was pruned or
    failed (a trial stopped early: the rung, its score at each rung, the reason), and its
    parameters (``param:<name>``)."""
    import pandas as pd

    trials = study.get_trials(deepcopy=False)
    # a trial whose worker stopped sending heartbeats is failed and retried by a new trial that
    # names it last in its retry history (Optuna's RetryHeartbeatStaleTrialCallback)
    with warnings.catch_warnings():  # experimental in Optuna
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        histories = {t.number: optuna.storages.RetryFailedTrialCallback.retry_history(t) for t in trials}
    retried_as = {history[-1]: number for number, history in histories.items() if history}
    aligned = alignment_name(study)
    records = []
    for t in trials:
        record: dict[str, Any] = {"trial": t.number, "state": t.state.name.lower()}
        record.update({k: t.user_attrs.get(k) for k in TRIAL_FACTS})
        if record[TrialAttr.MACS] is None and t.user_attrs.get(TrialAttr.RUNG_MACS) is not None:
            record[TrialAttr.MACS] = t.user_attrs[TrialAttr.RUNG_MACS]  # a trial stopped early: counted before training
        if aligned:  # a text-to-image study's alignment metric
            record[aligned] = t.user_attrs.get(aligned)
        if t.state == optuna.trial.TrialState.FAIL and t.number in retried_as and not record[TrialAttr.FAIL_REASON]:
            record[TrialAttr.FAIL_REASON] = f"no heartbeat (its worker was lost); retried as trial {retried_as[t.number]}"
        record.update({f"param:{k}": v for k, v in t.params.items()})
        records.append(record)
    frame = pd.DataFrame.from_records(records, columns=None if records else ["trial", "state", *TRIAL_FACTS])
    for column in (TrialAttr.MACS, TrialAttr.TRAJECTORY_MACS, TrialAttr.PARAMS, TrialAttr.DUPLICATE_OF, TrialAttr.PRUNED_AT_RUNG):
        frame[column] = pd.to_numeric(frame[column]).round().astype("Int64")  # integers with gaps
    return frame
