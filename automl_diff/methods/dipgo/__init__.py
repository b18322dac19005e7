"""DiP-GO: timestep-aware pruning of UNet units with backup connections and a learned pruner.

* :mod:`~automl_diff.methods.dipgo.pruner`: the pruner networks (queries -> MLP, or the paper's
  queries -> self-attention -> linear head; Gumbel gates).
* :mod:`~automl_diff.methods.dipgo.weights`: :class:`UnitWeights`, what the sparsity loss and the budget count.
* :mod:`~automl_diff.methods.dipgo.optimise`: :func:`optimise_pruner` (consistency + sparsity losses).
* :mod:`~automl_diff.methods.dipgo.budget`: the paper's post-processing, scores to a schedule within a budget.
* :mod:`~automl_diff.methods.dipgo.method`: :class:`DiPGO`, the study method (Optuna tunes the budget).

The schedules it produces, and the hooks that execute them, are the shared gating layer
(:mod:`automl_diff.gating`); their names are re-exported here, where they were first published.
"""

from automl_diff.config.options import DiPGOOptions
from automl_diff.gating import GateController, Schedule, apply_schedule, prunable_units, unit_costs
from automl_diff.methods.dipgo.method import DiPGO
from automl_diff.methods.dipgo.weights import UnitWeights
from automl_diff.metrics.macs import UnitCosts

__all__ = [
    "DiPGO",
    "DiPGOOptions",
    "GateController",
    "Schedule",
    "UnitCosts",
    "UnitWeights",
    "apply_schedule",
    "prunable_units",
    "unit_costs",
]
