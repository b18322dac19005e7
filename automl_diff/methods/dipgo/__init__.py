"""DiP-GO: timestep-aware pruning of UNet blocks with backup connections and a learned pruner.

* :mod:`~automl_diff.methods.dipgo.schedule`: :class:`Schedule` (binary gates, trajectory MACs, JSON).
* :mod:`~automl_diff.methods.dipgo.gates`: :func:`apply_schedule` / :class:`GateController` (hooks that skip work).
* :mod:`~automl_diff.methods.dipgo.pruner`: :class:`PrunerNetwork` (queries -> MLP -> Gumbel gates).
* :mod:`~automl_diff.methods.dipgo.optimise`: :func:`optimise_pruner` (consistency + sparsity losses).
* :mod:`~automl_diff.methods.dipgo.method`: :class:`DiPGO`, the study method (Optuna tunes the threshold).
"""

from automl_diff.methods.dipgo.gates import GateController, apply_schedule
from automl_diff.methods.dipgo.schedule import Schedule, UnitCosts, prunable_units, unit_costs

__all__ = ["GateController", "Schedule", "UnitCosts", "apply_schedule", "prunable_units", "unit_costs"]
