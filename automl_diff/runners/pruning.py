"""Early stopping of hopeless trials in a multi-objective study: MO-ASHA at rungs.

Optuna's pruners need ``trial.report``, which multi-objective studies refuse, and Ray Tune's
schedulers rank by one metric, so both backends (the local runner and Ray's trainables) ask the
same decision here, in the spirit of multi-objective asynchronous successive halving (MO-ASHA,
Schmucker et al. 2021):

* a trial reports a score at each rung (DKDM: the distillation loss of its weights on a fixed
  held-out batch of the teacher's trajectories, see ``TrainingInputs.held_out``); its MACs are
  known before training;
* at rung ``k`` the trials that reached it (finished, stopped or running, this one included) are
  ranked by non-dominated sorting on (MACs, score), ties in a front broken by crowding distance
  (NSGA-II's order);
* the trial goes on while it is on the rung's first front or among the best
  ``ceil(n / reduction_factor)`` of the ``n`` trials; otherwise it is stopped, once at least
  ``min_trials`` trials have reached the rung.

Why the held-out loss and not a small-sample FID: it costs one forward pass over a fixed batch,
it is what the student is trained to lower (so it falls monotonically for a healthy run), and it
has no sampling noise; an FID of a few hundred samples at 10% of training would cost more than the
training it saves and rank trials by noise.

A stopped trial is PRUNED with its rung scores, the rung it stopped at and the reason as user
attributes (``trials`` and the report show them); Optuna's Pareto front holds COMPLETE trials only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import optuna

from automl_diff.config.study import PrunerSettings
from automl_diff.records import TrialAttr
from automl_diff.runners.artifacts import note_stopped

__all__ = ["MOASHA", "RungRecorder", "crowding_distance", "non_dominated_fronts", "rank_order"]

_KEEP_STATES = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.RUNNING)


def _dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def non_dominated_fronts(points: Sequence[Sequence[float]]) -> list[int]:
    """The front index of each point (0: not dominated by any; minimisation)."""
    fronts = [-1] * len(points)
    left = set(range(len(points)))
    front = 0
    while left:
        current = {i for i in left if not any(_dominates(points[j], points[i]) for j in left if j != i)}
        for i in current:
            fronts[i] = front
        left -= current
        front += 1
    return fronts


def crowding_distance(points: Sequence[Sequence[float]]) -> list[float]:
    """NSGA-II's crowding distance of each point within its set (extremes: infinite)."""
    n = len(points)
    distance = [0.0] * n
    if n <= 2:
        return [math.inf] * n
    for m in range(len(points[0])):
        order = sorted(range(n), key=lambda i: points[i][m])
        low, high = points[order[0]][m], points[order[-1]][m]
        distance[order[0]] = distance[order[-1]] = math.inf
        if high == low:
            continue
        for a, i, b in zip(order, order[1:], order[2:]):
            distance[i] += (points[b][m] - points[a][m]) / (high - low)
    return distance


def rank_order(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices of ``points`` best first: by front, then by crowding distance (larger first)."""
    fronts = non_dominated_fronts(points)
    crowding = [0.0] * len(points)
    for front in set(fronts):
        members = [i for i, f in enumerate(fronts) if f == front]
        for i, d in zip(members, crowding_distance([points[i] for i in members])):
            crowding[i] = d
    return sorted(range(len(points)), key=lambda i: (fronts[i], -crowding[i], i))


class RungRecorder:
    """Records a trial's rung scores on its Optuna trial: the MACs it is ranked by (counted at the
    first rung, before any stopping), the score and the iteration of each rung reached.

    Args:
        trial: the running Optuna trial.
        macs_of: the MACs the evaluator would count for a model (per denoising step).
    """

    def __init__(self, trial: optuna.Trial, macs_of: Callable[[Any], int]) -> None:
        self.trial = trial
        self.macs_of = macs_of
        self.macs: int | None = None
        self.scores: dict[str, float] = {}
        self.iterations: dict[str, int] = {}
        self.last: tuple[int, int, float] | None = None

    def record(self, rung: int, iteration: int, score: float, model: Any) -> None:
        if self.macs is None:
            self.macs = int(self.macs_of(model))
            self.trial.set_user_attr(TrialAttr.RUNG_MACS, self.macs)
        self.scores[str(rung)] = float(score)
        self.iterations[str(rung)] = int(iteration)
        self.last = (rung, iteration, float(score))
        self.trial.set_user_attr(TrialAttr.RUNG_SCORES, dict(self.scores))
        self.trial.set_user_attr(TrialAttr.RUNG_ITERATIONS, dict(self.iterations))

    def stopped(self, reason: str) -> None:
        """Record that the trial stops at its last rung, and why (attributes and dashboard note)."""
        rung = self.last[0] if self.last is not None else None
        self.trial.set_user_attr(TrialAttr.PRUNED_AT_RUNG, rung)
        self.trial.set_user_attr(TrialAttr.PRUNE_REASON, reason)
        note_stopped(self.trial, reason, self.scores, self.iterations)


class MOASHA(RungRecorder):
    """A trial's rung reporter on every backend: records each score and stops the trial when
    MO-ASHA says so. It reads the other trials' rung scores from the study's storage, so trials
    run by several workers or Ray nodes are ranked together.

    Args:
        settings: the study's ``pruner:``.
        trial: the running Optuna trial.
        macs_of: the MACs the evaluator would count for a model (per denoising step).

    Raises ``optuna.TrialPruned`` to stop the trial.
    """

    def __init__(self, settings: PrunerSettings, trial: optuna.Trial, macs_of: Callable[[Any], int]) -> None:
        super().__init__(trial, macs_of)
        self.settings = settings

    def __call__(self, rung: int, iteration: int, score: float, model: Any) -> None:
        self.record(rung, iteration, score, model)
        key = str(rung)
        trial = self.trial
        others = []
        for other in trial.study.get_trials(deepcopy=False, states=_KEEP_STATES):
            if other.number == trial.number:
                continue
            scores, macs = other.user_attrs.get(TrialAttr.RUNG_SCORES) or {}, other.user_attrs.get(TrialAttr.RUNG_MACS)
            if key in scores and macs is not None:
                others.append((float(macs), float(scores[key])))
        points = [(float(self.macs), float(score)), *others]
        n = len(points)
        if n < self.settings.min_trials:
            return
        order = rank_order(points)
        position = order.index(0)
        keep = math.ceil(n / self.settings.reduction_factor)
        if non_dominated_fronts(points)[0] == 0 or position < keep:
            return
        reason = (
            f"stopped at rung {rung} (iteration {iteration}): held-out loss {score:.4g} at {self.macs / 1e6:.3g}M MACs "
            f"ranks {position + 1} of {n} trials at this rung, past the best {keep} and off their front"
        )
        self.stopped(reason)
        raise optuna.TrialPruned(reason)
