"""Gate schedules: which prunable unit computes at which sampling step.

For ``steps`` model calls of a sampler and the prunable ``units`` of a UNet
(:func:`~automl_diff.models.dataflow.prunable_units`), ``gates[i][u]`` says whether unit ``u``
computes at call ``i`` or reuses its output from the last call that computed it; call 0 computes
every unit. A step is one model call: most samplers call the model once per inference step,
PNDM (PLMS) once more (it evaluates its second timestep twice), and the schedule has a row per
call. A unit whose gate is on still runs only where its output is read
(:meth:`~automl_diff.models.dataflow.UnitGraph.plan`). DiP-GO learns schedules; a DeepCache-style uniform schedule is just another one. A
schedule knows the model it was made for, so applying it to another architecture is an error.

On disk (``schedule.json``) the gates are one string of ``1``/``0`` per step, in unit order::

    {"format": "automl_diff.schedule/1", "steps": 20, "units": ["down.0", ...],
     "gates": ["1111111", "0100110", ...], "model": {...}, "info": {"threshold": 0.4}}
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from automl_diff.errors import UserError
from automl_diff.gating.units import idle_steps_free, model_fingerprint, prunable_units
from automl_diff.metrics.macs import UnitCosts, trajectory_macs
from automl_diff.models.blocks import name_to_module_path
from automl_diff.models.dataflow import unit_atoms
from automl_diff.records import stable_key

__all__ = ["FORMAT", "Schedule"]

FORMAT = "automl_diff.schedule/1"


@dataclass(frozen=True)
class Schedule:
    """A binary gate schedule for ``steps`` sampling steps over ``units``.

    Attributes:
        steps: model calls of the sampler the schedule is for (``info["num_inference_steps"]``
            says how many inference steps they are, where it differs).
        units: prunable unit names, in execution order.
        gates: ``gates[i][u]``: unit ``u`` computes at step ``i`` (row 0 is all True).
        model: :func:`model_fingerprint` of the model it was made for.
        info: provenance (threshold, target ratio, ...), JSON-safe.
    """

    steps: int
    units: tuple[str, ...]
    gates: tuple[tuple[bool, ...], ...]
    model: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.gates) != self.steps or any(len(row) != len(self.units) for row in self.gates):
            raise ValueError(f"gates must be {self.steps} rows of {len(self.units)} values")
        if self.steps and not all(self.gates[0]):
            raise ValueError("step 0 must compute every unit (nothing is cached yet)")

    # construction -------------------------------------------------------------------------------
    @classmethod
    def full(cls, unet: nn.Module, steps: int, granularity: str = "block") -> Schedule:
        """Every unit at every step: the plain sampler."""
        units = tuple(prunable_units(unet, granularity))
        return cls(steps, units, tuple(tuple(True for _ in units) for _ in range(steps)), model_fingerprint(unet))

    @classmethod
    def from_scores(
        cls,
        scores: np.ndarray | Sequence[Sequence[float]],
        threshold: float,
        *,
        units: Sequence[str],
        model: dict[str, Any],
        info: dict[str, Any] | None = None,
    ) -> Schedule:
        """Binarise gate scores (probability of computing): a unit computes where its score is
        above ``threshold``; step 0 always computes. A higher threshold never keeps more units."""
        scores = np.asarray(scores, dtype=np.float64)
        keep = scores > threshold
        keep[0, :] = True
        gates = tuple(tuple(bool(v) for v in row) for row in keep)
        return cls(int(scores.shape[0]), tuple(units), gates, dict(model), {"threshold": float(threshold), **(info or {})})

    @classmethod
    def uniform_cache(
        cls, unet: nn.Module, steps: int, interval: int, *, units: Sequence[str], info: dict[str, Any] | None = None
    ) -> Schedule:
        """DeepCache's uniform schedule over ``units``: every ``interval``-th call computes every
        unit; the calls between compute only the last up block's last resnet and its attention
        (skip branch 0), from ``conv_in``'s features and the output of the layer before it, cached
        at the last full call, as DeepCache's helper does at cache branch 0 (everything deeper is
        reused; the down path's first layers feed only cached layers, so they are not run either).

        Raises:
            UserError: that branch is not a unit of its own (``block`` units: DeepCache needs
                ``layer`` or ``branch`` ones).
        """
        up = unet.up_blocks[-1]
        last = len(up.resnets) - 1
        shallow = {f"up.{len(unet.up_blocks) - 1}.resnets.{last}"}
        if getattr(up, "attentions", None):
            shallow.add(f"up.{len(unet.up_blocks) - 1}.attentions.{last}")
        atoms = [set(unit_atoms(u)) for u in units]
        inside = [a <= shallow for a in atoms]
        straddles = [u for u, a in zip(units, atoms) if a & shallow and not a <= shallow]
        if straddles or not any(inside):
            raise UserError(
                f"a uniform cache schedule needs the last up branch ({', '.join(sorted(shallow))}) as units of its own; "
                f"{straddles[0] if straddles else 'no unit'} is not: use granularity layer or branch"
            )
        gates = tuple(tuple(True if i % interval == 0 else keep for keep in inside) for i in range(steps))
        return cls(steps, tuple(units), gates, model_fingerprint(unet), {"uniform_cache_interval": interval, **(info or {})})

    @classmethod
    def uniform_steps(
        cls, unet: nn.Module, steps: int, calls: int, *, units: Sequence[str], info: dict[str, Any] | None = None
    ) -> Schedule:
        """Fewer sampling steps as a schedule: ``calls`` evenly spaced calls of the ``steps``
        (the first among them) compute every unit; the calls between compute none, so the model
        returns its last output again (a call that runs no unit is skipped whole where
        :func:`~automl_diff.gating.units.idle_steps_free`). With DDIM at eta 0, a repeated noise
        prediction moves the sample straight on to the next computed timestep: the schedule samples
        exactly as DDIM on those ``calls`` timesteps of the ``steps`` does.

        Raises:
            UserError: the model's idle calls are not skipped whole (a transformer's blocks reuse
                their residual updates on new inputs, which is not a repeated output), or
                ``calls`` is not between 1 and ``steps``.
        """
        if not 1 <= calls <= steps:
            raise UserError(f"a schedule of {calls} computed calls needs between 1 and {steps} (the sampler's calls)")
        if not idle_steps_free(unet, units):
            raise UserError(
                "fewer steps as a schedule needs a model whose calls that run nothing return their last output; "
                f"{type(unet).__name__} does not"
            )
        computed = {int(i) for i in np.floor(np.arange(calls) * steps / calls)}
        gates = tuple(tuple(i in computed for _ in units) for i in range(steps))
        return cls(steps, tuple(units), gates, model_fingerprint(unet), {"computed_calls": calls, **(info or {})})

    @property
    def inference_steps(self) -> int:
        """The ``num_inference_steps`` to sample with: as many as model calls, except where the
        sampler calls the model more often than it steps (PNDM), recorded in ``info``."""
        return int(self.info.get("num_inference_steps", self.steps))

    # costs ----------------------------------------------------------------------------------------
    @property
    def computed_fraction(self) -> float:
        """Fraction of (step, unit) gates that compute."""
        total = self.steps * len(self.units)
        return sum(map(sum, self.gates)) / total if total else 1.0

    def trajectory_macs(self, costs: UnitCosts, *, attention: bool = True) -> int:
        """MACs of one image's whole sampling trajectory under this schedule: the atoms its plan
        runs (:func:`~automl_diff.metrics.macs.trajectory_macs`)."""
        graph = costs.graph
        if graph is None or graph.units != self.units:
            raise ValueError("the costs were counted for other units than the schedule's")
        return trajectory_macs(graph.plan(self.gates).executes, graph.atoms, costs, attention=attention)

    def key(self) -> str:
        """A short hash of units and gates: equal schedules have equal keys."""
        return stable_key([list(self.units), self._rows()])

    # validation -----------------------------------------------------------------------------------
    def check_model(self, unet: nn.Module, *, source: str = "schedule") -> None:
        """Raise a one-line :class:`UserError` if this schedule was made for another model."""
        mine = model_fingerprint(unet)
        if self.model and self.model != mine:
            diff = [k for k in mine if self.model.get(k) != mine[k]]
            key = diff[0] if diff else "class"
            raise UserError(f"{source}: made for another model ({key} {self.model.get(key)!r}; this model has {mine.get(key)!r})")
        modules = dict(unet.named_modules())
        for name in self.units:
            if any(name_to_module_path(atom) not in modules for atom in unit_atoms(name)):
                raise UserError(f"{source}: units: unknown unit '{name}' for this {type(unet).__name__}")

    # (de)serialisation ----------------------------------------------------------------------------
    def _rows(self) -> list[str]:
        return ["".join("1" if g else "0" for g in row) for row in self.gates]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "steps": self.steps,
            "units": list(self.units),
            "gates": self._rows(),
            "model": self.model,
            "info": self.info,
        }

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "schedule") -> Schedule:
        """Validate a schedule's JSON object; errors name ``source`` and the key."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise UserError(f"{source}: not an automl_diff schedule (format must be {FORMAT!r})")
        steps, units, rows = data.get("steps"), data.get("units"), data.get("gates")
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise UserError(f"{source}: steps: expected a positive integer (got {steps!r})")
        if not isinstance(units, list) or not units or not all(isinstance(u, str) for u in units):
            raise UserError(f"{source}: units: expected a non-empty list of unit names (got {units!r})")
        if not isinstance(rows, list) or len(rows) != steps:
            raise UserError(f"{source}: gates: expected {steps} rows, one per step (got {len(rows) if isinstance(rows, list) else rows!r})")
        for i, row in enumerate(rows):
            if not isinstance(row, str) or len(row) != len(units) or set(row) - {"0", "1"}:
                raise UserError(f"{source}: gates[{i}]: expected a string of {len(units)} 0/1 characters (got {row!r})")
        if set(rows[0]) != {"1"}:
            raise UserError(f"{source}: gates[0]: step 0 must compute every unit (got {rows[0]!r})")
        model, info = data.get("model", {}), data.get("info", {})
        if not isinstance(model, dict) or not isinstance(info, dict):
            raise UserError(f"{source}: model and info must be objects")
        gates = tuple(tuple(c == "1" for c in row) for row in rows)
        return cls(steps, tuple(units), gates, model, info)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Schedule:
        """Read ``schedule.json``; a missing or malformed file is a one-line :class:`UserError`."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"schedule file '{path}' does not exist")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"{path}: not valid JSON ({exc})") from None
        return cls.from_dict(data, source=str(path))
