"""What DiP-GO's sparsity loss counts per unit: MACs (the paper's choice) or measured seconds."""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from automl_diff.gating import GateController, Head, Schedule
from automl_diff.metrics.latency import synchronize, unit_latencies
from automl_diff.metrics.macs import UnitCosts, example_inputs
from automl_diff.models.dataflow import UnitGraph

__all__ = ["UnitWeights", "skipped_pass_seconds"]


@dataclass(frozen=True)
class UnitWeights:
    """What DiP-GO's sparsity loss and its budget count for one forward pass: the whole model and
    each gated atom, in MACs (``kind="macs"``, the paper's choice) or in measured seconds
    (``kind="latency"``, where time on the target device does not follow MACs: memory-bound
    layers, narrow convolutions). ``idle_free``: a step that runs no atom costs nothing, not even
    ``always``. ``graph``: the dataflow between the atoms (which run under a schedule)."""

    kind: str
    total: float
    units: Mapping[str, float]
    graph: UnitGraph
    idle_free: bool = False

    @property
    def always(self) -> float:
        """What every step that runs some atom pays beyond its atoms."""
        return self.total - sum(self.units.values())

    @classmethod
    def of(cls, costs: UnitCosts | UnitWeights) -> UnitWeights:
        """MAC weights from :class:`UnitCosts`; weights are returned as they are."""
        if isinstance(costs, UnitWeights):
            return costs
        if costs.graph is None:
            raise ValueError("unit costs without their dataflow graph")
        macs = {name: float(cost.macs) for name, cost in costs.units.items()}
        return cls("macs", float(costs.total.macs), macs, costs.graph, costs.idle_free)

    @classmethod
    def measured(cls, unet: nn.Module, units: Sequence[str], *, batch_size: int, rounds: int = 25, idle_free: bool = False) -> UnitWeights:
        """Latency weights measured on ``unet``'s device at ``batch_size``: each atom's seconds
        inside whole forward passes (:func:`~automl_diff.metrics.latency.unit_latencies`; the
        head's counted in the atom that feeds it), and as the time no gate removes, a pass in
        which every atom reuses its cache but the call still runs (embeddings, ``conv_in``, the
        gates themselves), as it does at every step that runs some atom.
        ``total`` is that fixed time plus the atoms', so a schedule's expected time is what its
        steps really cost, not a pass timed with a hook around every atom.

        Both are timed in each of ``rounds`` rounds, one after the other, and every round's
        figures are taken as shares of that round's step: a unit's weight is its median share
        times the median step. Load that comes and goes on the machine then moves a round's
        figures together, not one unit's share against the others', and the weights move less from
        one measurement to the next: on 2 CPU cores, three measurements of
        the digits teacher's largest unit gave 0.107 to 0.136 of a call with 3 passes each, and
        0.106 to 0.110 in 25 rounds."""
        graph = UnitGraph.of(unet, units)
        head = Head.of(unet, graph)
        timed = [*graph.atoms, *head.layers]
        unit_latencies(unet, timed, batch_size=batch_size, repeats=1)  # warm-up
        shares, steps = [], []
        for _ in range(max(1, rounds)):
            _, seconds = unit_latencies(unet, timed, batch_size=batch_size, repeats=1, warmup=0)
            seconds = head.fold(seconds, lambda a, b: a + b)
            fixed = skipped_pass_seconds(unet, graph.units, batch_size=batch_size, repeats=1)
            step = fixed + sum(seconds.values())
            steps.append(step)
            shares.append([fixed / step, *(seconds[a] / step for a in graph.atoms)])
        median = np.median(np.array(shares), axis=0)
        total = statistics.median(steps)
        median = median / median.sum() * total
        return cls("latency", total, dict(zip(graph.atoms, (float(v) for v in median[1:]))), graph, idle_free)

    def vector(self, like: torch.Tensor) -> torch.Tensor:
        """The atoms' weights in the graph's atom order."""
        return torch.tensor([self.units[a] for a in self.graph.atoms], dtype=like.dtype, device=like.device)

    def cost(self, gates: np.ndarray) -> float:
        """The trajectory cost of binary ``gates`` (steps x units) over the full sampler's: the
        atoms the plan runs (:meth:`~automl_diff.models.dataflow.UnitGraph.plan`), and ``always``
        at every step that runs one (every step, unless idle steps are free)."""
        runs = self.graph.plan(gates).executes
        weights = np.array([self.units[a] for a in self.graph.atoms])
        busy = runs.any(axis=1) if self.idle_free else np.ones(len(runs), dtype=bool)
        return float(self.always * busy.sum() + (runs * weights).sum()) / (self.total * len(runs))


@torch.no_grad()
def skipped_pass_seconds(unet: nn.Module, units: Sequence[str], *, batch_size: int, repeats: int = 3) -> float:
    """Median seconds of a forward pass at ``batch_size`` in which every unit reuses its cache
    but the call still runs: what a sampling step costs beyond the atoms it runs (a step that
    runs none is skipped whole where :func:`idle_steps_free`; not this pass). Each
    timed pass follows an untimed one that computes every unit and fills the caches; of
    ``repeats + 1`` such rounds the first is a warm-up."""
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
