"""Gate schedules: which prunable unit computes at which sampling step.

A :class:`Schedule` is the product of DiP-GO: for ``steps`` sampling steps and the prunable
``units`` of a UNet (blocks such as ``up.1``, or layers such as ``up.1.resnets.0``), ``gates[i][u]``
says whether unit ``u`` computes at step ``i`` or reuses its output from the last step that
computed it. Step 0 computes every unit. A schedule knows the model it was made for, so applying
it to another architecture is an error, and it knows its exact trajectory MACs.

The UNet's output layers (the *head*: ``conv_norm_out``, ``conv_act``, ``conv_out``) read the
output of the last unit and nothing else. At a step where that unit reuses its cache, the head
would compute exactly what it computed at the step that filled the cache, so it reuses its output
too (:func:`head_input_unit`). Its MACs and seconds count as the last unit's. Where the UNet
returns the head's output as it is (:func:`output_is_head`), a step at which no unit computes
runs nothing at all, not even the time embedding or ``conv_in``: the whole call returns the
previous step's output (:func:`idle_steps_free`).

On disk (``schedule.json``) the gates are one string of ``1``/``0`` per step, in unit order::

    {"format": "automl_diff.schedule/1", "steps": 20, "units": ["down.0", ...],
     "gates": ["1111111", "0100110", ...], "model": {...}, "info": {"threshold": 0.4}}
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from automl_diff.errors import UserError
from automl_diff.metrics.macs import BlockCost, count_unit_macs
from automl_diff.models.blocks import block_names, get_block, name_to_module_path

__all__ = [
    "FORMAT",
    "HEAD",
    "Schedule",
    "UnitCosts",
    "UnitWeights",
    "head_input_unit",
    "idle_steps_free",
    "output_is_head",
    "head_modules",
    "model_fingerprint",
    "prunable_units",
    "skipped_pass_seconds",
    "unit_costs",
]

FORMAT = "automl_diff.schedule/1"
_FINGERPRINT_KEYS = ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types", "in_channels", "out_channels")


def prunable_units(unet: nn.Module, granularity: str = "block") -> list[str]:
    """The units a schedule gates, in execution order.

    ``block``: ``down.0 … mid … up.K``. ``layer``: every resnet, attention, downsampler and
    upsampler inside those blocks (``up.2.resnets.1``), as DeepCache caches layers.
    """
    blocks = block_names(unet)
    if granularity == "block":
        return blocks
    if granularity != "layer":
        raise ValueError(f"granularity must be 'block' or 'layer', got {granularity!r}")
    units = []
    for block in blocks:
        module = get_block(unet, block)
        # execution order inside diffusers blocks: resnet i then attention i, then the resampler
        resnets = getattr(module, "resnets", None) or []
        attentions = getattr(module, "attentions", None) or []
        if block == "mid" and resnets:
            units.append(f"{block}.resnets.0")
            for i in range(len(attentions)):
                units.append(f"{block}.attentions.{i}")
                units.append(f"{block}.resnets.{i + 1}")
            units += [f"{block}.resnets.{i}" for i in range(len(attentions) + 1, len(resnets))]
            continue
        for i in range(len(resnets)):
            units.append(f"{block}.resnets.{i}")
            if i < len(attentions):
                units.append(f"{block}.attentions.{i}")
        for kind in ("downsamplers", "upsamplers"):
            units += [f"{block}.{kind}.{i}" for i in range(len(getattr(module, kind, None) or []))]
    return units


#: The UNet's output layers, in order, as diffusers names them.
HEAD = ("conv_norm_out", "conv_act", "conv_out")


def head_modules(unet: nn.Module) -> list[str]:
    """The head layers this UNet has (``conv_norm_out`` is None without output norm)."""
    return [name for name in HEAD if isinstance(getattr(unet, name, None), nn.Module)]


def head_input_unit(unet: nn.Module, units: Sequence[str]) -> str | None:
    """The unit whose output is the head's whole input, if it is among ``units``: the last up
    block, or its last layer (at layer granularity). None where something else reaches the head:
    another unit last, or up blocks that also pass a skip sample (``SkipUpBlock2D``)."""
    if not units or "conv_out" not in head_modules(unet):
        return None
    up_types = getattr(unet.config, "up_block_types", None) or ()
    if any("Skip" in kind for kind in up_types):
        return None
    last = units[-1]
    finals = {block_names(unet)[-1], prunable_units(unet, "layer")[-1]}
    return last if last in finals and last.startswith("up.") else None


def output_is_head(unet: nn.Module) -> bool:
    """Whether the UNet returns ``conv_out``'s output as it is: a ``UNet2DConditionModel``, or a
    ``UNet2DModel`` without Fourier time embedding (which divides its output by the timestep),
    either with diffusers' own ``forward`` (a subclass may transform the output further)."""
    from diffusers import UNet2DConditionModel, UNet2DModel

    if isinstance(unet, UNet2DConditionModel):
        return type(unet).forward is UNet2DConditionModel.forward
    return isinstance(unet, UNet2DModel) and type(unet).forward is UNet2DModel.forward and unet.config.time_embedding_type != "fourier"


def idle_steps_free(unet: nn.Module, units: Sequence[str]) -> bool:
    """Whether a step at which none of ``units`` computes costs nothing: the head reuses its output
    (:func:`head_input_unit`) and the UNet returns it as it is (:func:`output_is_head`), so the
    whole call returns the previous step's output, exactly."""
    return head_input_unit(unet, units) is not None and output_is_head(unet)


def model_fingerprint(unet: nn.Module) -> dict[str, Any]:
    """What identifies an architecture for a schedule: its class and block layout."""
    config = unet.config
    data: dict[str, Any] = {"class": type(unet).__name__}
    for key in _FINGERPRINT_KEYS:
        value = config.get(key) if hasattr(config, "get") else getattr(config, key, None)
        data[key] = list(value) if isinstance(value, (tuple, list)) else value
    return data


@dataclass(frozen=True)
class UnitCosts:
    """MACs of one forward pass (batch 1): the whole model and each prunable unit; ``idle_free``:
    a step at which no unit computes costs nothing (:func:`idle_steps_free`)."""

    total: BlockCost
    units: Mapping[str, BlockCost]
    idle_free: bool = False

    @property
    def always(self) -> int:
        """MACs outside every unit (embedding, ``conv_in``, the head where no unit feeds it alone,
        ...): computed every step."""
        return self.total.macs - sum(c.macs for c in self.units.values())


@dataclass(frozen=True)
class UnitWeights:
    """What DiP-GO's sparsity loss counts for one forward pass: the whole model and each unit, in
    MACs (``kind="macs"``, the paper's choice) or in measured seconds (``kind="latency"``, where
    time on the target device does not follow MACs: memory-bound layers, narrow convolutions).
    ``idle_free``: a step that computes no unit costs nothing, not even ``always``."""

    kind: str
    total: float
    units: Mapping[str, float]
    idle_free: bool = False

    @property
    def always(self) -> float:
        """What every step that computes some unit pays beyond its units."""
        return self.total - sum(self.units.values())

    @classmethod
    def of(cls, costs: UnitCosts | UnitWeights) -> UnitWeights:
        """MAC weights from :class:`UnitCosts`; weights are returned as they are."""
        if isinstance(costs, UnitWeights):
            return costs
        return cls("macs", float(costs.total.macs), {name: float(cost.macs) for name, cost in costs.units.items()}, costs.idle_free)

    @classmethod
    def measured(cls, unet: nn.Module, units: Sequence[str], *, batch_size: int, repeats: int = 3, idle_free: bool = False) -> UnitWeights:
        """Latency weights measured on ``unet``'s device at ``batch_size``: each unit's seconds
        inside whole forward passes (:func:`~automl_diff.metrics.latency.unit_latencies`; the
        head's counted in the unit that feeds it), and as the time no unit's gate removes, a pass
        in which every unit reuses its cache but the call still runs (embeddings, ``conv_in``, the
        gates themselves), as it does at every step that computes some unit.
        ``total`` is that fixed time plus the units', so a schedule's expected time is what its
        steps really cost, not a pass timed with a hook around every unit."""
        from automl_diff.metrics.latency import unit_latencies

        units = tuple(units)
        head = _Head.of(unet, units)
        _, seconds = unit_latencies(unet, [*units, *head.layers], batch_size=batch_size, repeats=repeats)
        seconds = head.fold(seconds, lambda a, b: a + b)
        total = skipped_pass_seconds(unet, units, batch_size=batch_size, repeats=repeats) + sum(seconds.values())
        return cls("latency", total, seconds, idle_free)


@torch.no_grad()
def skipped_pass_seconds(unet: nn.Module, units: Sequence[str], *, batch_size: int, repeats: int = 3) -> float:
    """Median seconds of a forward pass at ``batch_size`` in which every unit returns its cached
    output but the call still runs: what a sampling step costs beyond the units it computes (a
    step that computes none is skipped whole where :func:`idle_steps_free`; not this pass). Each
    timed pass follows an untimed one that computes every unit and fills the caches; of
    ``repeats + 1`` such rounds the first is a warm-up."""
    import statistics
    import time

    from automl_diff.methods.dipgo.gates import GateController
    from automl_diff.metrics.latency import synchronize
    from automl_diff.metrics.macs import example_inputs

    units = tuple(units)
    sample, timestep, *context = example_inputs(unet, batch_size=batch_size)
    schedule = Schedule(2, units, (tuple(True for _ in units), tuple(False for _ in units)))
    times = []
    with GateController(unet, units, 2).use(schedule) as controller:
        controller.idle_free = False  # time the call itself, not its skipping
        for _ in range(max(1, repeats) + 1):
            unet(sample, timestep, *context)  # step 0: computes every unit, fills the caches
            synchronize(unet)
            start = time.perf_counter()
            unet(sample, timestep - 1, *context)  # step 1: every unit reuses its cache
            synchronize(unet)
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


@dataclass(frozen=True)
class _Head:
    """The head layers counted as part of the unit that feeds them (none where no unit does)."""

    feeder: str | None
    layers: tuple[str, ...]

    @classmethod
    def of(cls, unet: nn.Module, units: Sequence[str]) -> _Head:
        feeder = head_input_unit(unet, units)
        return cls(feeder, tuple(head_modules(unet)) if feeder else ())

    def fold(self, values: Mapping[str, Any], add: Any) -> dict[str, Any]:
        """Per-unit values (measured for the units and the head layers) with the head's added to
        its feeder's."""
        out = {name: value for name, value in values.items() if name not in self.layers}
        for name in self.layers:
            out[self.feeder] = add(out[self.feeder], values[name])
        return out


def unit_costs(unet: nn.Module, units: Sequence[str]) -> UnitCosts:
    """Count the MACs of the whole model and of each unit with fvcore (attention included); the
    head's MACs count as those of the unit that feeds it (:func:`head_input_unit`)."""
    head = _Head.of(unet, units)
    total, per_unit = count_unit_macs(unet, [*units, *head.layers])

    def add(a: BlockCost, b: BlockCost) -> BlockCost:
        return BlockCost(a.name, a.params + b.params, a.macs + b.macs, a.macs_no_attention + b.macs_no_attention)

    return UnitCosts(total, head.fold(per_unit, add), idle_steps_free(unet, units))


@dataclass(frozen=True)
class Schedule:
    """A binary gate schedule for ``steps`` sampling steps over ``units``.

    Attributes:
        steps: sampling steps the schedule is for.
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

    # costs ----------------------------------------------------------------------------------------
    @property
    def computed_fraction(self) -> float:
        """Fraction of (step, unit) gates that compute."""
        total = self.steps * len(self.units)
        return sum(map(sum, self.gates)) / total if total else 1.0

    def trajectory_macs(self, costs: UnitCosts, *, attention: bool = True) -> int:
        """MACs of one image's whole sampling trajectory: every step pays for the parts outside
        the units and for the units it computes, except a step that computes no unit where such
        a step is free (``costs.idle_free``)."""
        def macs(cost: BlockCost) -> int:
            return cost.macs if attention else cost.macs_no_attention

        total = macs(costs.total)
        unit = [macs(costs.units[name]) for name in self.units]
        return sum(
            0 if costs.idle_free and not any(row) else total - sum(m for m, on in zip(unit, row) if not on) for row in self.gates
        )

    def key(self) -> str:
        """A short hash of units and gates: equal schedules have equal keys."""
        payload = json.dumps([list(self.units), self._rows()])
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    # validation -----------------------------------------------------------------------------------
    def check_model(self, unet: nn.Module, *, source: str = "schedule") -> None:
        """Raise a one-line :class:`UserError` if this schedule was made for another model."""
        mine = model_fingerprint(unet)
        if self.model and self.model != mine:
            diff = [k for k in mine if self.model.get(k) != mine[k]]
            key = diff[0] if diff else "class"
            raise UserError(
                f"{source}: made for another model ({key} {self.model.get(key)!r}; this model has {mine.get(key)!r})"
            )
        modules = dict(unet.named_modules())
        for name in self.units:
            if name_to_module_path(name) not in modules:
                raise UserError(f"{source}: units: unknown unit '{name}' for this {type(unet).__name__}")

    # (de)serialisation ----------------------------------------------------------------------------
    def _rows(self) -> list[str]:
        return ["".join("1" if g else "0" for g in row) for row in self.gates]

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "steps": self.steps, "units": list(self.units), "gates": self._rows(), "model": self.model, "info": self.info}

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
