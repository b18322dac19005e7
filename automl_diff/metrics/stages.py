"""What a study will cost before it runs: its stages timed at their shapes, and projected.

A :class:`Stage` is one kind of work a study repeats (a sampling batch's model call, a training
step, a pruner iteration's step): the call that runs one unit of it at a batch size, the batch
size the study runs it at and how many units a trial (or the study, once) runs. :func:`measure`
times one unit after an untimed one and records the peak memory it reached; a unit whose
full batch would take too long here (a CPU standing in for the GPU the study is meant for) is timed
at batches 1 and 2 and projected linearly in the batch size, time and memory alike, and marked so.
"""

from __future__ import annotations

import math
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Stage", "StageCost", "human_bytes", "human_seconds", "measure", "peak_memory", "reset_peak_memory", "timed_call"]


@dataclass(frozen=True)
class Stage:
    """One kind of work a study repeats.

    Attributes:
        name: what one unit is (``pruner iteration: one step, forward and checkpointed backward``).
        per: ``trial`` (every trial runs it) or ``study`` (once per study, shared by its trials).
        count: units per trial (or per study).
        batch: the batch size a unit runs at.
        run: ``run(batch)`` runs one unit at ``batch``.
        held: ``held(batch)``, the memory one unit leaves held for later units (DiP-GO keeps
            every step's inputs for the backward pass through the trajectory) ...
        held_units: ... and how many units hold it at once: ``held(batch) * (held_units - 1)``
            is added to the peak.
        note: how the stage stands for the real work (an upper bound, an approximation).
        key: stages with equal keys run the same work (the same model's call at the same batch):
            one measurement serves them all.
    """

    name: str
    per: str
    count: int
    batch: int
    run: Callable[[int], Any]
    held: Callable[[int], int] | None = None
    held_units: int = 1
    note: str = ""
    key: Any = None


@dataclass(frozen=True)
class StageCost:
    """A stage's measured (or projected) cost.

    Attributes:
        seconds: one unit at the stage's batch.
        peak_bytes: the memory in use at the unit's peak (device memory on a GPU, the process's
            resident set on a CPU), with what the stage holds across units.
        projected: timed at batches 1 and 2 and projected linearly to the stage's batch.
    """

    stage: Stage
    seconds: float
    peak_bytes: int
    projected: bool = False

    @property
    def total_seconds(self) -> float:
        return self.seconds * self.stage.count


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak (a GPU's allocator; a CPU's resident set cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> int:
    """Bytes at the peak since the last reset: the GPU allocator's, or the process's resident set
    high-water mark on a CPU (which only ever grows)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def timed_call(run: Callable[[], Any], device: torch.device) -> float:
    """Seconds one ``run()`` takes, a GPU synchronised before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _timed(stage: Stage, batch: int, device: torch.device) -> tuple[float, int]:
    """Seconds of one unit at ``batch`` after an untimed one, and the peak memory of both."""
    reset_peak_memory(device)
    stage.run(batch)
    times: list[float] = []
    while not times or (sum(times) < 1.0 and len(times) < 3):
        times.append(timed_call(lambda: stage.run(batch), device))
    return statistics.median(times), peak_memory(device)


def measure(stage: Stage, device: torch.device, *, limit: float = 60.0) -> StageCost:
    """Time one unit of ``stage`` at its batch, or, where a unit at batch 1 says the full batch
    would take longer than ``limit`` seconds, at batches 1 and 2, projected linearly."""
    one, one_peak = _timed(stage, 1, device)
    if stage.batch <= 1:
        seconds, peak, projected = one, one_peak, False
    elif one * stage.batch <= limit:
        seconds, peak = _timed(stage, stage.batch, device)
        projected = False
    else:
        two, two_peak = _timed(stage, 2, device)
        slope = max(two - one, 0.0)
        seconds = one + slope * (stage.batch - 1)
        peak = one_peak + max(two_peak - one_peak, 0) * (stage.batch - 1)
        projected = True
    if stage.held is not None and stage.held_units > 1:
        peak += stage.held(stage.batch) * (stage.held_units - 1)
    return StageCost(stage, seconds, int(peak), projected)


def human_bytes(value: float) -> str:
    """``1.5 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.3g} {unit}"
        value /= 1024
    return f"{value:.3g} TiB"


def human_seconds(value: float) -> str:
    """``42 s``, ``3.5 min``, ``2.1 h``, ``4.2 d``."""
    if not math.isfinite(value):
        return "?"
    if value < 120:
        return f"{value:.3g} s"
    if value < 7200:
        return f"{value / 60:.3g} min"
    if value < 172800:
        return f"{value / 3600:.3g} h"
    return f"{value / 86400:.3g} d"
