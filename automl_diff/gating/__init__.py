"""The gating layer: which unit of a UNet computes at which sampling step, and the hooks that obey.

* :mod:`~automl_diff.gating.units`: prunable units, the head, and their MACs (which unit reads
  which is :class:`~automl_diff.models.dataflow.UnitGraph`'s).
* :mod:`~automl_diff.gating.schedule`: :class:`Schedule` (binary gates, JSON, trajectory MACs).
* :mod:`~automl_diff.gating.hooks`: :func:`apply_schedule` and :class:`GateController`.

DiP-GO learns schedules; evaluation, export, reports and the benchmark apply them. The layer
knows nothing of how a schedule was made.
"""

from __future__ import annotations

from automl_diff.gating.hooks import GateController, ScheduleMismatch, apply_schedule
from automl_diff.gating.schedule import FORMAT, Schedule
from automl_diff.gating.units import (
    GRANULARITIES,
    HEAD,
    Head,
    head_input_atom,
    head_modules,
    idle_steps_free,
    model_fingerprint,
    output_is_head,
    prunable_units,
    unit_costs,
)

__all__ = [
    "FORMAT",
    "GRANULARITIES",
    "HEAD",
    "GateController",
    "Head",
    "Schedule",
    "ScheduleMismatch",
    "apply_schedule",
    "head_input_atom",
    "head_modules",
    "idle_steps_free",
    "model_fingerprint",
    "output_is_head",
    "prunable_units",
    "unit_costs",
]
