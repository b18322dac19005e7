"""A dry run: what a study will cost, measured at its shapes, before it runs.

``run CONFIG --dry-run`` builds everything a trial needs (the teachers, the method, the
evaluator: every check a real run makes), times one unit of each stage the study repeats
(:meth:`~automl_diff.methods.base.Method.stages`, :meth:`~automl_diff.evaluation.Evaluator.stages`)
at the config's batch sizes, records the peak memory each reached, and projects the seconds of a
trial and of the study. It opens no storage and writes nothing.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from automl_diff.config.study import StudyConfig
from automl_diff.errors import UserError, first_line
from automl_diff.formatting import text_table
from automl_diff.metrics.stages import Stage, StageCost, human_bytes, human_seconds, measure, timed_call
from automl_diff.runners.session import StudySession

__all__ = ["CompiledCall", "DryRun", "dry_run"]


@dataclass(frozen=True)
class CompiledCall:
    """The study's teacher compiled (``torch.compile``), one model call at the latency batch:
    what its exported models would run at compiled (the study itself samples eagerly).

    Attributes:
        batch: the batch size of the call.
        warmup_seconds: the first compiled call (compilation included).
        seconds: a compiled call after it (median of 3).
        eager_seconds: the same call eager (median of 3).
        error: why it could not compile here (then the figures are 0).
    """

    batch: int
    warmup_seconds: float = 0.0
    seconds: float = 0.0
    eager_seconds: float = 0.0
    error: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("batch", "warmup_seconds", "seconds", "eager_seconds", "error")}

    def line(self) -> str:
        if self.error:
            return f"compiled: not measured ({self.error})"
        return (
            f"compiled (torch.compile, the teacher): one model call at batch {self.batch} {human_seconds(self.seconds)} after a "
            f"{human_seconds(self.warmup_seconds)} warm-up, eager {human_seconds(self.eager_seconds)} "
            f"({self.eager_seconds / self.seconds:.2f}x); not part of the projection: trials sample eagerly"
        )


def _compiled_call(unet: torch.nn.Module, sampler: Any, batch: int, device: torch.device) -> CompiledCall:
    """Time the teacher's model call compiled (first call apart) and eager at ``batch``."""

    @torch.no_grad()
    def timed(model: torch.nn.Module) -> float:
        return timed_call(lambda: sampler.first_step(model, batch), device)

    compiled = torch.compile(unet, dynamic=False)
    try:
        warmup = timed(compiled)
    except torch._dynamo.exc.TorchDynamoException as exc:  # no C++ compiler, an unsupported device, ...
        return CompiledCall(batch, error=f"{type(exc).__name__}: {first_line(exc)}")
    seconds = sorted(timed(compiled) for _ in range(3))[1]
    eager = sorted(timed(unet) for _ in range(3))[1]
    return CompiledCall(batch, warmup, seconds, eager)


@dataclass
class DryRun:
    """A study's stages, measured, and what they project.

    Attributes:
        costs: each measured stage.
        skipped: stages that could not be measured here, with why.
        trials: the study's ``n_trials``.
        seconds: how long the dry run itself took.
    """

    config: StudyConfig
    device: str
    costs: list[StageCost] = field(default_factory=list)
    skipped: list[tuple[Stage, str]] = field(default_factory=list)
    seconds: float = 0.0
    compiled: CompiledCall | None = None

    @property
    def trial_seconds(self) -> float:
        """One trial: every per-trial stage's units."""
        return sum(c.total_seconds for c in self.costs if c.stage.per == "trial")

    @property
    def study_seconds(self) -> float:
        """The study: its once-per-study stages and ``n_trials`` trials."""
        once = sum(c.total_seconds for c in self.costs if c.stage.per == "study")
        return once + self.config.n_trials * self.trial_seconds

    @property
    def peak_bytes(self) -> int:
        return max((c.peak_bytes for c in self.costs), default=0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "study": self.config.study_name,
            "device": self.device,
            "dtype": self.config.dtype,
            "n_trials": self.config.n_trials,
            "trial_seconds": self.trial_seconds,
            "study_seconds": self.study_seconds,
            "peak_bytes": self.peak_bytes,
            "dry_run_seconds": self.seconds,
            "stages": [
                {
                    "name": c.stage.name,
                    "per": c.stage.per,
                    "count": c.stage.count,
                    "batch": c.stage.batch,
                    "seconds": c.seconds,
                    "total_seconds": c.total_seconds,
                    "peak_bytes": c.peak_bytes,
                    "projected": c.projected,
                    "note": c.stage.note,
                }
                for c in self.costs
            ],
            "skipped": [{"name": s.name, "why": why} for s, why in self.skipped],
            "compiled": self.compiled.to_dict() if self.compiled is not None else None,
        }

    def table(self) -> str:
        """The stages and the projection, as printed."""
        rows = [
            [
                c.stage.name + (" *" if c.projected else ""),
                c.stage.per,
                str(c.stage.count),
                str(c.stage.batch),
                human_seconds(c.seconds),
                human_seconds(c.total_seconds),
                human_bytes(c.peak_bytes),
            ]
            for c in self.costs
        ]
        header = ["stage (one unit)", "per", "units", "batch", "one unit", "all units", "peak memory"]
        lines = [text_table(header, rows, left=2)]
        lines += [f"  {c.stage.name}: {c.stage.note}" for c in self.costs if c.stage.note]
        if any(c.projected for c in self.costs):
            lines.append("  * timed at batches 1 and 2 and projected linearly to the stage's batch (time and memory)")
        lines += [f"  not measured: {s.name} ({why})" for s, why in self.skipped]
        if self.compiled is not None:
            lines.append(f"  {self.compiled.line()}")
        lines.append(
            f"a trial: {human_seconds(self.trial_seconds)}; the study ({self.config.n_trials} trials and what runs once): "
            f"{human_seconds(self.study_seconds)}; peak memory {human_bytes(self.peak_bytes)} "
            f"({'GPU memory allocated' if self.device.startswith('cuda') else 'the process resident set'})"
        )
        return "\n".join(lines)


def dry_run(config: StudyConfig, *, study_name: str, limit: float = 60.0, progress: bool = False, compile: bool = False) -> DryRun:
    """Measure the stages of ``config``'s study (see the module docs); nothing is stored.

    Args:
        limit: seconds a stage's unit may take at its full batch before it is timed at batches 1
            and 2 and projected.
        compile: also time the teacher's model call compiled (:class:`CompiledCall`).
    """
    start = time.perf_counter()
    session = StudySession(config, study_name=study_name, progress=progress)
    device = torch.device(session.device)
    stages = [
        *session.method.stages(),
        *session.evaluator.stages(session.original.unet, per="study"),
        *session.evaluator.stages(session.teacher.unet, per="trial"),
    ]
    result = DryRun(config, session.device)
    measured: dict[Any, StageCost] = {}
    for stage in stages:
        same = measured.get((stage.key, stage.batch)) if stage.key is not None else None
        if same is not None:  # the same work at the same batch: measured once
            result.costs.append(replace(same, stage=stage))
            continue
        try:
            cost = measure(stage, device, limit=limit)
        except UserError as exc:
            result.skipped.append((stage, str(exc)))
            continue
        result.costs.append(cost)
        if stage.key is not None:
            measured[(stage.key, stage.batch)] = cost
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if compile:
        batch = session.evaluator.evaluation.latency_batch_size
        result.compiled = _compiled_call(session.teacher.unet, session.evaluator.sampler, batch, device)
    result.seconds = time.perf_counter() - start
    return result
