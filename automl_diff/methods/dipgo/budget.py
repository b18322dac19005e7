"""DiP-GO's post-processing (the paper's Algorithm 1): the pruner's scores to a schedule that fits
a compute budget.

The gates are ranked by their score (the probability that the pruner computes them); a schedule
keeps the best-ranked ones, as many as fit: the largest prefix of the ranking whose trajectory
cost, counted on what the schedule really runs (:meth:`UnitWeights.cost`: a unit nothing reads
costs nothing), is within the budget. Step 0 always computes. A trial's budget is thus a point on
the cost axis, whatever the scores' scale.
"""

from __future__ import annotations

import numpy as np

from automl_diff.methods.dipgo.weights import UnitWeights

__all__ = ["gates_within_budget"]


def gates_within_budget(scores: np.ndarray, budget: float, weights: UnitWeights) -> np.ndarray:
    """Binary gates (steps x units) keeping the highest-scoring gates whose trajectory cost is at
    most ``budget`` times the full sampler's (in ``weights``' unit: MACs or measured seconds).
    Where even step 0 alone exceeds the budget, that is the schedule.

    The cost grows with the prefix of the ranking almost everywhere (a gate turned on can end
    another's carry, so not strictly); the prefix is found by bisection and checked."""
    scores = np.asarray(scores, dtype=np.float64)
    steps, units = scores.shape
    later = scores[1:].ravel()
    order = np.lexsort((np.arange(later.size), -later))  # best score first, ties in step order

    def gates(k: int) -> np.ndarray:
        on = np.zeros(later.size, dtype=bool)
        on[order[:k]] = True
        return np.vstack([np.ones((1, units), dtype=bool), on.reshape(steps - 1, units)])

    low, high = 0, later.size
    if weights.cost(gates(high)) <= budget:
        return gates(high)
    if weights.cost(gates(low)) > budget:
        return gates(low)
    while high - low > 1:  # cost(low) <= budget < cost(high)
        middle = (low + high) // 2
        if weights.cost(gates(middle)) <= budget:
            low = middle
        else:
            high = middle
    return gates(low)
