"""What the rows of one benchmark run share, and how each row is measured.

A :class:`Bench` holds what every row shares: the preset, the teacher, the FID reference, the
data-free pool (filled on first use) and the rows measured so far. A row
(:mod:`automl_diff.bench.rows`) builds its model through the public API (a
:class:`~automl_diff.methods.base.Method`, a schedule, a peer) and hands it to :meth:`Bench.measure`,
which counts the MACs one image's trajectory executes (torch's ``FlopCounterMode``, so cached or
skipped work costs nothing) and its FID on the same noise as every other row. Latencies are
measured at the end, all rows in lockstep (:func:`~automl_diff.metrics.latency.sampler_rounds`),
each on its own copy of its model.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from automl_diff.bench.presets import BenchPreset, Goal
from automl_diff.config import Budgets, DKDMOptions, MethodSettings, load_search_space, read_options, resolve_device
from automl_diff.data import read_prompts
from automl_diff.errors import UserError
from automl_diff.evaluation import Evaluator
from automl_diff.methods import Method
from automl_diff.methods.training import TrainingInputs
from automl_diff.metrics.fid import fid_from_features
from automl_diff.metrics.intervals import Interval, Kid, Spread, across_sets, kid, paired_across_sets, spread, verdict
from automl_diff.metrics.latency import first_batch_seconds, sampler_rounds
from automl_diff.metrics.macs import executed_macs
from automl_diff.models.loading import Teacher, load_teacher

__all__ = ["PEERS", "Bench", "BenchResult", "Comparison", "Row", "check_file", "check_peer", "machine_info"]

logger = logging.getLogger("automl_diff.bench")

#: The peers' packages: import name -> distribution name (the ``bench`` extra).
PEERS = {"torch_pruning": "torch-pruning", "DeepCache": "DeepCache"}


@dataclass(frozen=True)
class Comparison:
    """A row against another sampled from the same noise: ``FID(row) - FID(other)`` and
    ``FID(row) / FID(other)`` with their 95% intervals, paired set by set
    (:func:`~automl_diff.metrics.intervals.paired_across_sets`), and what the difference says."""

    other: str
    difference: Interval
    ratio: Interval
    #: The row's text alignment minus the other's, paired set by set (higher is better).
    alignment: Interval | None = None

    @property
    def verdict(self) -> str:
        return verdict(self.difference)

    @property
    def alignment_verdict(self) -> str | None:
        return None if self.alignment is None else verdict(self.alignment, lower_is_better=False)

    def to_dict(self) -> dict[str, Any]:
        data = {"other": self.other, "difference": self.difference.to_dict(), "ratio": self.ratio.to_dict(), "verdict": self.verdict}
        if self.alignment is not None:
            data.update(alignment=self.alignment.to_dict(), alignment_verdict=self.alignment_verdict)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Comparison | None:
        if data is None:
            return None
        alignment = Interval(**data["alignment"]) if data.get("alignment") else None
        return cls(data["other"], Interval(**data["difference"]), Interval(**data["ratio"]), alignment)


def _peer_comparisons(data: dict[str, Any]) -> tuple[Comparison, ...]:
    """A row's comparisons with its peers as :meth:`Row.to_dict` wrote them (a file written
    before a row could have several holds one, or none, under ``versus_peer``)."""
    if "versus_peers" in data:
        return tuple(c for c in map(Comparison.from_dict, data["versus_peers"]) if c is not None)
    single = Comparison.from_dict(data.get("versus_peer"))
    return (single,) if single is not None else ()


@dataclass
class Row:
    """One model of the benchmark.

    Attributes:
        name: what it is.
        kind: ``teacher``, ``method``, ``peer`` or ``stacked``.
        params: parameters of the network that runs.
        trajectory_macs: MACs one image's ``steps``-step trajectory executes (exact: counted on
            what runs).
        macs_per_step: ``trajectory_macs / steps``.
        fid: the mean FID of the sample sets with its 95% interval (the same noise seeds, features
            and reference for every row).
        kid: KID of all the sets' samples together, with its standard deviation over subsets.
        search_seconds: wall time of everything that made the model (pool warm-up, supernets,
            searches, training, pruner optimisation); 0 for the teacher and DeepCache.
        notes: what was chosen (architecture, threshold, interval, ...).
        latency: per timed batch size, seconds per image over the lockstep rounds.
        speedup: per timed batch size, the teacher's time over this row's, round by round.
        versus_teacher: the paired FID comparison with the teacher.
        versus_peers: the paired FID comparisons with the peers at matched MACs (a method's row
            may have several, a peer's row has the one it was matched to).
        fid_sets: FID of each sample set, in the order of the evaluation seeds.
        alignment: text alignment (the preset's ``alignment``, higher is better): the mean over the
            sample sets with its t-interval; None for an unconditional teacher.
        alignment_sets: its value on each sample set.
        compiled: per timed batch size, seconds per image compiled (the preset's ``compiled``;
            empty: not timed compiled), in the same lockstep rounds as :attr:`latency`.
        compiled_speedup: per timed batch size, the compiled teacher's time over this row's
            compiled time, round by round.
        warmup: per timed batch size, the seconds of the compiled model's first batch
            (compilation included), timed apart before the rounds.
    """

    name: str
    kind: str
    params: int
    trajectory_macs: int
    macs_per_step: float
    fid: Interval
    kid: Kid
    search_seconds: float
    notes: str = ""
    latency: dict[int, Spread] = field(default_factory=dict)
    speedup: dict[int, Spread] = field(default_factory=dict)
    versus_teacher: Comparison | None = None
    versus_peers: tuple[Comparison, ...] = ()
    fid_sets: tuple[float, ...] = ()
    alignment: Interval | None = None
    alignment_sets: tuple[float, ...] = ()
    compiled: dict[int, Spread] = field(default_factory=dict)
    compiled_speedup: dict[int, Spread] = field(default_factory=dict)
    warmup: dict[int, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "params": self.params,
            "trajectory_macs": self.trajectory_macs,
            "macs_per_step": self.macs_per_step,
            "fid": self.fid.to_dict(),
            "kid": self.kid.to_dict(),
            "search_seconds": self.search_seconds,
            "notes": self.notes,
            "latency": {batch: s.to_dict() for batch, s in self.latency.items()},
            "speedup": {batch: s.to_dict() for batch, s in self.speedup.items()},
            "versus_teacher": self.versus_teacher.to_dict() if self.versus_teacher else None,
            "versus_peers": [c.to_dict() for c in self.versus_peers],
            "fid_sets": list(self.fid_sets),
            "alignment": self.alignment.to_dict() if self.alignment else None,
            "alignment_sets": list(self.alignment_sets),
            "compiled": {batch: s.to_dict() for batch, s in self.compiled.items()},
            "compiled_speedup": {batch: s.to_dict() for batch, s in self.compiled_speedup.items()},
            "warmup": dict(self.warmup),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Row:
        """A row as :meth:`to_dict` wrote it (JSON turns the batch sizes into strings)."""
        return cls(
            data["name"],
            data["kind"],
            data["params"],
            data["trajectory_macs"],
            data["macs_per_step"],
            Interval(**data["fid"]),
            Kid(**data["kid"]),
            data["search_seconds"],
            data["notes"],
            {int(b): Spread(**v) for b, v in data["latency"].items()},
            {int(b): Spread(**v) for b, v in data["speedup"].items()},
            Comparison.from_dict(data["versus_teacher"]),
            _peer_comparisons(data),
            tuple(data.get("fid_sets", ())),
            Interval(**data["alignment"]) if data.get("alignment") else None,
            tuple(data.get("alignment_sets", ())),
            {int(b): Spread(**v) for b, v in data.get("compiled", {}).items()},
            {int(b): Spread(**v) for b, v in data.get("compiled_speedup", {}).items()},
            {int(b): float(v) for b, v in data.get("warmup", {}).items()},
        )


@dataclass
class BenchResult:
    """All rows, the teacher first, where they were measured, and the real-data floor."""

    preset: BenchPreset
    rows: list[Row]
    machine: dict[str, str]
    seconds: float
    floor: Interval
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "preset": self.preset.name,
            "eval_seed": self.preset.eval_seed,
            "eval_seeds": list(self.preset.eval_seeds),
            "fid_samples": self.preset.evaluation.fid_samples,
            "machine": self.machine,
            "seconds": self.seconds,
            "floor": self.floor.to_dict(),
            "rows": [row.to_dict() for row in self.rows],
            "details": self.details,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], preset: BenchPreset) -> BenchResult:
        """A run as :meth:`to_dict` wrote it, measured with ``preset``."""
        rows = [Row.from_dict(row) for row in data["rows"]]
        return cls(preset, rows, data["machine"], data["seconds"], Interval(**data["floor"]), data.get("details", {}))

    @property
    def teacher(self) -> Row:
        return self.rows[0]

    @property
    def batches(self) -> tuple[int, ...]:
        """The batch sizes every row was timed at, the preset's last."""
        return tuple(self.teacher.latency)

    def macs_reduction(self, row: Row) -> float:
        """Exact: trajectory MACs are counted, not sampled."""
        return self.teacher.trajectory_macs / row.trajectory_macs

    def efficiency(self, row: Row, batch: int) -> Spread:
        """Speedup over the MACs reduction at ``batch``, round by round."""
        s, r = row.speedup[batch], self.macs_reduction(row)
        return Spread(s.median / r, s.q1 / r, s.q3 / r)

    def compiled_efficiency(self, row: Row, batch: int) -> Spread:
        """Compiled speedup (against the compiled teacher) over the MACs reduction at ``batch``."""
        s, r = row.compiled_speedup[batch], self.macs_reduction(row)
        return Spread(s.median / r, s.q1 / r, s.q3 / r)

    def compiled_goal(self, row: Row) -> tuple[bool, str]:
        """Whether ``row`` compiled meets the preset's ``compiled`` goal, each figure at its
        unfavourable end (the lower quartile of speedup / MACs reduction), and the figures."""
        at_batch, at_one, warmup = self.preset.compiled
        batch, teacher = self.preset.latency_batch, self.teacher
        figures, met = [], True
        for b, goal in ((batch, at_batch), (1, at_one)):
            if b in row.compiled_speedup:
                e = self.compiled_efficiency(row, b)
                met &= e.q1 >= goal
                figures.append(f"speedup / MACs reduction at batch {b} {e.median:.2f} (quartiles {e.q1:.2f}-{e.q3:.2f}, goal {goal:g})")
        ratio = max(row.warmup[b] / teacher.warmup[b] for b in row.warmup)
        met &= ratio <= warmup
        figures.append(f"warm-up at most {ratio:.2f}x the compiled teacher's (goal {warmup:g}x)")
        return met, "; ".join(figures)

    def meets(self, row: Row) -> bool:
        """The preset's goal at its unfavourable ends: the MACs reduction (exact), the high end of
        the FID ratio's 95% interval, the lower quartile of speedup / MACs reduction at the
        preset's batch and, with text alignment, the low end of its paired difference from the
        teacher's against ``-alignment_drop``."""
        reduction, fid_ratio, efficiency = self.preset.goal
        versus = row.versus_teacher
        assert versus is not None
        return (
            self.macs_reduction(row) >= reduction
            and versus.ratio.unfavourable() <= fid_ratio
            and self.efficiency(row, self.preset.latency_batch).q1 >= efficiency
            and (versus.alignment is None or versus.alignment.unfavourable(lower_is_better=False) >= -self.preset.alignment_drop)
        )

    def goal(self) -> tuple[Row | None, bool]:
        """The row of the goal's kind (``preset.goal_kind``) that meets the goal with the most MACs
        reduction (else the one with the lowest FID), and whether it meets the goal."""
        candidates = [r for r in self.rows if r.kind == self.preset.goal_kind]
        meets = [r for r in candidates if self.meets(r)]
        if meets:
            return max(meets, key=self.macs_reduction), True
        return (min(candidates, key=lambda r: r.fid.value) if candidates else None), False

    def judge(self, goal: Goal) -> tuple[Row | None, bool, str]:
        """The row of ``goal`` that meets it with the most MACs reduction (else the one with the
        lowest FID), whether it does, and its figures at their unfavourable ends."""
        rows = {row.name: row for row in self.rows}
        against = self.teacher if goal.against == "teacher" else rows.get(goal.against)
        candidates = [r for r in self.rows if r.name.startswith(goal.row) and r is not against]
        if against is None or not candidates:
            return None, False, f"not measured ({goal.rows_named} or {goal.against} is not a row of this run)"

        def figures(row: Row) -> tuple[bool, str]:
            versus = compare_rows(row, against)
            difference, ratio, drop = versus.difference, versus.ratio, versus.alignment
            params = self.teacher.params / row.params
            checks = [(self.macs_reduction(row) >= goal.macs, f"{self.macs_reduction(row):.2f}x fewer trajectory MACs")]
            if goal.params > 1:
                checks.append((params >= goal.params, f"{params:.2f}x fewer parameters"))
            if goal.fid_ratio is not None:
                checks.append((ratio.high <= goal.fid_ratio, f"FID / {against.name} {ratio.value:.2f} [{ratio.low:.2f}, {ratio.high:.2f}]"))
            if goal.fid_lower:
                checks.append(
                    (difference.high < 0, f"FID - {against.name} {difference.value:.2f} [{difference.low:.2f}, {difference.high:.2f}]")
                )
            if goal.alignment_drop is not None and drop is None:
                checks.append((False, "alignment not measured"))
            elif goal.alignment_drop is not None:
                checks.append(
                    (drop.low >= -goal.alignment_drop, f"alignment - {against.name} {drop.value:.4f} [{drop.low:.4f}, {drop.high:.4f}]")
                )
            if goal.efficiency is not None:
                efficiency = self.efficiency(row, self.preset.latency_batch)
                spread = f"{efficiency.median:.2f} [{efficiency.q1:.2f}-{efficiency.q3:.2f}]"
                checks.append((efficiency.q1 >= goal.efficiency, f"speedup / MACs reduction {spread}"))
            if goal.matched_macs:
                checks.append(
                    (
                        row.trajectory_macs <= against.trajectory_macs,
                        f"{row.trajectory_macs / against.trajectory_macs:.2f}x {against.name}'s MACs",
                    )
                )
            return all(ok for ok, _ in checks), "; ".join(text + ("" if ok else " (missed)") for ok, text in checks)

        judged = [(row, *figures(row)) for row in candidates]
        meets = [j for j in judged if j[1]]
        if meets:
            return max(meets, key=lambda j: self.macs_reduction(j[0]))
        return min(judged, key=lambda j: j[0].fid.value)


def compare_rows(a: Row, b: Row) -> Comparison:
    """Row ``a`` against row ``b``, paired set by set: FID difference and ratio, and the text
    alignment difference where both were measured."""
    alignment = paired_across_sets(a.alignment_sets, b.alignment_sets)[0] if a.alignment_sets and b.alignment_sets else None
    return Comparison(b.name, *paired_across_sets(a.fid_sets, b.fid_sets), alignment)


def machine_info(device: torch.device) -> dict[str, str]:
    """The machine and the versions a run measured on."""
    import os
    from importlib.metadata import PackageNotFoundError, version

    import diffusers
    import optuna

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    info = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, {cpus} CPUs",
        "device": str(device) if device.type != "cuda" else f"{device} ({torch.cuda.get_device_name(device)})",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "optuna": optuna.__version__,
    }
    for module, distribution in PEERS.items():
        try:
            info[module] = version(distribution)
        except PackageNotFoundError:  # a missing peer package is reported by the rows that need it
            info[module] = "-"
    return info


class Bench:
    """What the rows of one run share, and the rows measured so far.

    Args:
        preset: the budgets and the teacher.
        log: where progress lines go.

    Raises:
        UserError: the teacher cannot be loaded or the device is not available.
    """

    def __init__(self, preset: BenchPreset, *, log: Callable[[str], None] = print) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.preset = preset
        self.log = log
        self.begin = time.perf_counter()
        self.device = torch.device(resolve_device(preset.device, source=f"bench preset {preset.name}"))
        torch.manual_seed(preset.seed)
        try:
            self.teacher: Teacher = load_teacher(preset.teacher, device=self.device)
        except UserError as exc:
            raise UserError(f"preset {preset.name}: teacher: {exc}") from None
        self.machine = machine_info(self.device)
        self.rows: list[Row] = []
        #: What a row leaves for the rows that build on it (the DiffNAS student, DiP-GO's rows, ...).
        self.results: dict[str, Any] = {}
        #: Facts for the JSON output (tolerance, block choices, prune ratio, DeepCache levels, ...).
        self.details: dict[str, Any] = {}
        self._timed: dict[str, nn.Module] = {}
        self._contexts: dict[str, Callable[[nn.Module], Any]] = {}
        #: The rows timed compiled too: their compiled model and the context it samples under.
        self._compiled: dict[str, tuple[nn.Module, Callable[[nn.Module], Any]]] = {}
        self._peers: dict[str, list[str]] = {}  # method row -> its peers at matched MACs
        self._inputs: TrainingInputs | None = None
        where = f"preset {preset.name}"
        #: The training prompts of a text-to-image teacher (the pool's, DiP-GO's pruner's).
        self.train_prompts = read_prompts(preset.prompts_train, where=f"{where}: prompts_train") if preset.prompts_train else ()
        evaluation = preset.evaluation
        if preset.prompts_eval is not None:
            evaluation = replace(evaluation, prompts=read_prompts(preset.prompts_eval, where=f"{where}: prompts_eval"))
        self.evaluator = Evaluator(replace(evaluation, seed=preset.seed), self.teacher, device=self.device, where=where)
        #: The evaluation prompts' conditioning of a text-to-image teacher (guided, decoded).
        self.prompts = self.evaluator.prompts
        #: How every row samples (the preset's steps, the evaluation prompts).
        self.sampler = self.evaluator.sampler
        self.log(f"# {preset.name}: {self.banner}")

    @property
    def banner(self) -> str:
        """The machine and versions, in one line."""
        m = self.machine
        return f"{m['machine']}, device {m['device']}, torch {m['torch']}, diffusers {m['diffusers']}"

    @property
    def steps(self) -> int:
        return self.preset.steps

    def settings(
        self,
        *,
        iterations: int,
        batch_size: int | None = None,
        lr: float | None = None,
        search_space: str | None = None,
        **changes: Any,
    ) -> MethodSettings:
        """What a method of the benchmark is handed: the preset's training budgets (``iterations``
        steps), its sampler, its training prompts and seed (``changes``: other fields)."""
        p = self.preset
        settings = MethodSettings(
            budgets=Budgets(iterations, batch_size or p.batch_size, lr or p.lr),
            sampling=p.evaluation.sampling,
            train_prompts=self.train_prompts,
            search_space=load_search_space(search_space) if search_space else None,
            dataset=p.evaluation.fid_dataset,
            latency_batch_size=p.latency_batch,
            latency_repeats=p.evaluation.latency_repeats,
            seed=p.seed,
            where=f"preset {p.name}",
        )
        return replace(settings, **changes)

    def method(
        self, cls: type[Method], options: dict[str, Any], settings: MethodSettings, *, start: Teacher | None = None, **kwargs: Any
    ) -> Any:
        """A method of the benchmark, its options and settings checked against the teacher (and
        the starting model ``start``, for a stacked row) as a study's config would be."""
        typed = read_options(cls.options_type, options, file=settings.where)
        model = start or self.teacher
        typed.check_against(settings, model, self.teacher)
        return cls(model, typed, settings, original=self.teacher, device=self.device, **kwargs)

    @property
    def pool_options(self) -> dict[str, Any]:
        """The data-free pool every training row draws from."""
        p = self.preset
        return {"source": "teacher", "pool_size": p.pool_size, "pool_steps": p.pool_steps, **p.pool}

    @property
    def inputs(self) -> TrainingInputs:
        """One data-free pool of the teacher's generations for DKDM, DiffNAS and the fine-tunes,
        filled on first use; its warm-up time is ``details["pool_seconds"]``."""
        if self._inputs is None:
            start = time.perf_counter()
            options = read_options(DKDMOptions, self.pool_options, file=f"preset {self.preset.name}")
            self._inputs = TrainingInputs(self.settings(iterations=1), self.teacher, options, device=self.device)
            self._inputs.prepare()
            self.details["pool_seconds"] = time.perf_counter() - start
            self.log(f"pool of {self.preset.pool_size} teacher generations: {self.details['pool_seconds']:.0f} s")
        return self._inputs

    @property
    def pool_seconds(self) -> float:
        """The pool's warm-up time, counted in the search cost of every row that trains from it."""
        return self.details["pool_seconds"] if self._inputs is not None else 0.0

    @property
    def eval_seeds(self) -> tuple[int, ...]:
        """The noise seeds of the FID sample sets: the verdict's seeds, not the tuning seed."""
        return self.preset.eval_seeds

    def measure(
        self,
        name: str,
        kind: str,
        model: nn.Module,
        *,
        context: Callable[[nn.Module], Any] = contextlib.nullcontext,
        search_seconds: float = 0.0,
        notes: str = "",
        peer_of: str | None = None,
        compiled: Callable[[nn.Module], Any] | None = None,
    ) -> Row:
        """Trajectory MACs, FID (one per sample set, their mean with its interval) and KID of
        ``model`` under ``context(model)``; the row is timed at the end, on a copy of the model as
        it is now, under the same context.

        Args:
            peer_of: the row this one is a peer of at matched MACs (compared with it, paired).
            compiled: the context that samples the model compiled (a schedule's
                ``apply_schedule(..., compile=True)``), where the preset times rows compiled; the
                teacher is compiled whole (``torch.compile``).
        """
        p = self.preset
        start = time.perf_counter()
        model.eval()
        features, alignment, fids = [], [], []
        with context(model):
            trajectory = self.trajectory_macs(model)
            for seed in self.eval_seeds:
                sampled = self.evaluator.sample_set(model, seed=seed, keep_features=True)
                features.append(sampled.stats.features)
                fids.append(sampled.fid(self.evaluator.reference))
                if sampled.alignment is not None:
                    alignment.append(sampled.alignment[1].value)
        fids = tuple(fids)
        row = Row(
            name,
            kind,
            sum(q.numel() for q in model.parameters()),
            trajectory,
            trajectory / self.steps,
            across_sets(fids),
            kid(np.concatenate(features), self.evaluator.reference_set.features, seed=p.eval_seed),
            round(search_seconds, 1),
            notes=notes,
            fid_sets=fids,
            alignment=across_sets(alignment) if alignment else None,
            alignment_sets=tuple(alignment),
        )
        self.rows.append(row)
        if peer_of is not None:
            self._peers.setdefault(peer_of, []).append(name)
        self._timed[name] = copy.deepcopy(model)
        self._contexts[name] = context
        if p.compiled is not None and kind == "teacher":
            self._compiled[name] = (torch.compile(copy.deepcopy(model), dynamic=False), contextlib.nullcontext)
        elif p.compiled is not None and compiled is not None:
            self._compiled[name] = (copy.deepcopy(model), compiled)
        aligned = f", {p.evaluation.alignment} {row.alignment}" if row.alignment is not None else ""
        self.log(
            f"{name}: {trajectory / 1e6:.1f}M trajectory MACs, FID {row.fid} (sets {', '.join(f'{f:.3g}' for f in fids)}){aligned}, "
            f"KID {row.kid}, made in {search_seconds:.0f} s, measured in {time.perf_counter() - start:.0f} s"
        )
        return row

    def trajectory_macs(self, model: nn.Module) -> int:
        """MACs one image's trajectory executes (counted on what runs): for a text-to-image
        teacher both halves of every guided step, not the prompt encoding or the VAE's decoding,
        which are the same for every row."""
        prompts = replace(self.prompts, decode=None) if self.prompts is not None else None
        sampler = self.sampler.with_prompts(prompts)
        return executed_macs(lambda: sampler.sample(model, num_images=1, batch_size=1))

    def fid(self, images: torch.Tensor) -> float:
        """FID of ``images`` (in [-1, 1]) against the preset's reference (lower is better)."""
        return fid_from_features(self.evaluator.extractor(images), self.evaluator.reference)

    def floor(self) -> Interval:
        """FID of real images against the whole dataset's statistics, with its interval: one set
        of ``fid_samples`` (drawn without replacement) per evaluation seed, as the rows are
        measured. What the benchmark can resolve."""
        features = self.evaluator.reference_set.features
        n = min(self.preset.evaluation.fid_samples, len(features))
        sets = [features[np.random.default_rng(seed).permutation(len(features))[:n]] for seed in self.eval_seeds]
        return across_sets([fid_from_features(chosen, self.evaluator.reference) for chosen in sets])

    def compare(self) -> None:
        """Every row against the teacher, and each peer against the row it was matched to, paired
        set by set."""
        rows = {row.name: row for row in self.rows}
        teacher = self.rows[0]
        for row in self.rows[1:]:
            row.versus_teacher = compare_rows(row, teacher)
        for method, peers in self._peers.items():
            if method in rows:
                rows[method].versus_peers = tuple(compare_rows(rows[method], rows[peer]) for peer in peers)
                for peer in peers:
                    rows[peer].versus_peers = (compare_rows(rows[peer], rows[method]),)

    def time_rows(self) -> None:
        """Every row's latency per image at each of the preset's batch sizes, all rows in lockstep
        (step by step, each on its own copy of its model), ``latency_repeats`` rounds after
        ``latency_warmup`` untimed ones; speedups are the teacher's time over the row's, round by round."""
        p = self.preset
        teacher = self.rows[0].name
        models, contexts = dict(self._timed), dict(self._contexts)
        compiled = {f"{name}, compiled": model for name, (model, _) in self._compiled.items()}
        if set(self._compiled) <= {teacher}:  # no row to compare with the compiled teacher
            compiled = {}
        contexts.update({f"{name}, compiled": context for name, (_, context) in self._compiled.items()})
        for batch in p.timed_batches:
            repeats = p.evaluation.latency_repeats
            if compiled:
                self.log(f"compiling {len(compiled)} rows at batch {batch} (their first batch, timed apart)")
                warmups = first_batch_seconds(compiled, self.sampler, contexts=contexts, batch_size=batch)
            self.log(f"timing {len(models) + len(compiled)} rows in lockstep at batch {batch}: {p.latency_warmup} + {repeats} rounds")
            rounds = sampler_rounds(
                {**models, **compiled}, self.sampler, contexts=contexts, batch_size=batch, repeats=repeats, warmup=p.latency_warmup
            )
            for row in self.rows:
                row.latency[batch] = spread(rounds[row.name])
                row.speedup[batch] = spread([t / r for t, r in zip(rounds[teacher], rounds[row.name], strict=True)])
                mine, base = rounds.get(f"{row.name}, compiled"), rounds.get(f"{teacher}, compiled")
                if mine is not None and base is not None:
                    row.compiled[batch] = spread(mine)
                    row.compiled_speedup[batch] = spread([t / r for t, r in zip(base, mine, strict=True)])
                    row.warmup[batch] = round(warmups[f"{row.name}, compiled"], 2)

    def result(self) -> BenchResult:
        self.compare()
        return BenchResult(self.preset, self.rows, self.machine, time.perf_counter() - self.begin, self.floor(), self.details)


def check_file(preset: BenchPreset, what: str, path: str) -> None:
    """A file a preset names must exist (one line naming the preset, the field and the path)."""
    if not Path(path).is_file():
        raise UserError(f"preset {preset.name}: {what}: the file {path} does not exist (run the benchmark from a checkout)")


def check_peer(module: str) -> None:
    """A peer's package must be installed (one line naming what to install)."""
    try:
        __import__(module)
    except ImportError:
        raise UserError(f"the benchmark's peers need the {PEERS[module]} package: pip install -e '.[bench]'") from None
