"""One benchmark run: every method and peer on one teacher, measured the same way in one process.

Rows (each with the same DDIM sampler, steps, FID noise and FID features):

1. the teacher;
2. a DKDM student (data-free distillation into a fixed architecture of the search space);
3. a DiffNAS student (supernets, local search, the smallest tolerance within ``max_ratio`` of the
   teacher's MACs and params, each block its cheapest candidate within the tolerance in MACs or
   measured seconds (``diffnas_block_cost``), retrained with the dynamic joint loss);
4. a Torch-Pruning peer: the teacher pruned (L2 magnitude, as Diff-Pruning) at the ratio whose
   MACs are closest to the DiffNAS student's, fine-tuned with the same data-free batches and budget;
5. DiP-GO schedules of the teacher (one pruner, several thresholds);
6. a DeepCache peer: the caching interval whose trajectory MACs are closest to DiP-GO's first
   schedule at or below 1/4 of the teacher's (else its sparsest);
7. DiffNAS + DiP-GO (stacked): the DiffNAS student as the starting model of a DiP-GO run whose
   yardstick is the original teacher, through the same ``DiPGO(reference=...)`` code path as a
   stacked study (the student stays in memory instead of being exported and loaded again).

The methods run through the same :class:`~automl_diff.methods.base.Method` classes as studies do
(with a fixed trial instead of an Optuna one). One data-free pool of the teacher's generations
feeds DKDM, DiffNAS and the Torch-Pruning fine-tune; its warm-up is counted in each of their
search costs. Trajectory MACs are counted on what really executes (torch's ``FlopCounterMode``
over one image's trajectory, so cached or skipped work costs nothing); latencies are measured at
the end, per image in batches of ``latency_batch``, all rows in lockstep: step by step, each row
on its own copy of its model (:func:`~automl_diff.metrics.latency.sampler_latencies`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from automl_diff.bench.presets import BenchPreset

__all__ = ["BenchResult", "Row", "bench_study_config", "run_bench"]

logger = logging.getLogger("automl_diff.bench")

#: The peers' packages: import name -> distribution name (the ``bench`` extra).
_PEERS = {"torch_pruning": "torch-pruning", "DeepCache": "DeepCache"}


@dataclass
class Row:
    """One model of the benchmark.

    Attributes:
        name: what it is.
        kind: ``teacher``, ``method``, ``peer`` or ``stacked``.
        params: parameters of the network that runs.
        trajectory_macs: MACs one image's ``steps``-step trajectory executes.
        macs_per_step: ``trajectory_macs / steps``.
        fid: FID (same noise, features and reference for every row).
        latency: seconds per image (median of batches timed in lockstep with every other row).
        search_seconds: wall time of everything that made the model (pool warm-up, supernets,
            searches, training, pruner optimisation); 0 for the teacher and DeepCache.
        notes: what was chosen (architecture, threshold, interval, ...).
    """

    name: str
    kind: str
    params: int
    trajectory_macs: int
    macs_per_step: float
    fid: float
    search_seconds: float
    latency: float = float("nan")
    notes: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class BenchResult:
    """All rows, the teacher first, and where they were measured."""

    preset: BenchPreset
    rows: list[Row]
    machine: dict[str, str]
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def teacher(self) -> Row:
        return self.rows[0]

    def macs_reduction(self, row: Row) -> float:
        return self.teacher.trajectory_macs / row.trajectory_macs

    def speedup(self, row: Row) -> float:
        return self.teacher.latency / row.latency

    def fid_ratio(self, row: Row) -> float:
        return row.fid / self.teacher.fid

    def stacked_goal(self) -> tuple[Row | None, bool]:
        """The stacked row that meets the goal with the most MACs reduction (else the stacked row
        with the lowest FID), and whether it meets the goal."""
        reduction, fid_ratio, efficiency = self.preset.goal
        stacked = [r for r in self.rows if r.kind == "stacked"]
        meets = [
            r for r in stacked
            if self.macs_reduction(r) >= reduction and self.fid_ratio(r) <= fid_ratio and self.speedup(r) >= efficiency * self.macs_reduction(r)
        ]
        if meets:
            return max(meets, key=self.macs_reduction), True
        return (min(stacked, key=lambda r: r.fid) if stacked else None), False


def machine_info(device: torch.device) -> dict[str, str]:
    """The machine and the versions a run measured on."""
    import diffusers
    import optuna

    info = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, {_cpu_count()} CPUs",
        "device": str(device) if device.type != "cuda" else f"{device} ({torch.cuda.get_device_name(device)})",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "optuna": optuna.__version__,
    }
    from importlib.metadata import PackageNotFoundError, version

    for module, distribution in _PEERS.items():
        try:
            info[module] = version(distribution)
        except PackageNotFoundError:  # a missing peer package is reported by run_bench itself
            info[module] = "-"
    return info


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def bench_study_config(preset: BenchPreset, method: str, *, search_space: str | None, iterations: int, batch_size: int, lr: float, options: dict[str, Any]) -> Any:
    """The in-memory study config a method of the benchmark runs with."""
    from automl_diff.config.study import Budgets, FidSettings, Objective, SamplerSettings, SamplingSettings, StudyConfig

    return StudyConfig(
        path=f"bench preset {preset.name}",
        name=f"bench-{preset.name}-{method}",
        method=method,
        teacher=preset.teacher,
        search_space=search_space,
        objectives=(Objective("trajectory_macs"), Objective("fid")),
        sampler=SamplerSettings("random", preset.seed),
        n_trials=1,
        budgets=Budgets(
            train_iterations=iterations, batch_size=batch_size, lr=lr, fid_samples=preset.fid_samples,
            sampling_steps=preset.steps, latency_repeats=preset.latency_repeats, latency_batch_size=preset.latency_batch,
        ),
        sampling=SamplingSettings("ddim", 0.0),
        fid=FidSettings(preset.fid_dataset, preset.fid_features, preset.fid_batch),
        storage="sqlite:///:memory:",
        output_dir="runs",
        device=preset.device,
        seed=preset.seed,
        method_options=dict(options),
    )


def _check_inputs(preset: BenchPreset) -> None:
    """Fail early, with one line, on a missing peer package or search space."""
    from pathlib import Path

    from automl_diff.errors import UserError

    for module, distribution in _PEERS.items():
        try:
            __import__(module)
        except ImportError:
            raise UserError(f"the benchmark's peers need the {distribution} package: pip install -e '.[bench]'") from None
    for what, path in (("dkdm_space", preset.dkdm_space), ("diffnas_space", preset.diffnas_space)):
        if not Path(path).is_file():
            raise UserError(f"preset {preset.name}: {what}: the file {path} does not exist (run the benchmark from a checkout)")


def run_bench(preset: BenchPreset, *, log: Callable[[str], None] = print) -> BenchResult:
    """Run every row of ``preset`` in this process and measure them side by side.

    Raises:
        UserError: a peer package, a search space or the teacher is missing.
    """
    import optuna

    from automl_diff.bench.peers import deepcache, torch_pruning_peer
    from automl_diff.config.study import resolve_device
    from automl_diff.errors import UserError
    from automl_diff.methods.diffnas import DiffNAS
    from automl_diff.methods.dipgo import apply_schedule
    from automl_diff.methods.dipgo.method import DiPGO
    from automl_diff.methods.dkdm import DKDM
    from automl_diff.methods.dkdm.method import TrainingInputs
    from automl_diff.methods.training import fit
    from automl_diff.metrics.evaluate import Evaluator
    from automl_diff.metrics.latency import sampler_latencies
    from automl_diff.metrics.macs import count_macs, executed_macs
    from automl_diff.models.loading import Teacher, load_teacher
    from automl_diff.sampling import sample_images

    _check_inputs(preset)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    begin = time.perf_counter()
    device = torch.device(resolve_device(preset.device, source=f"bench preset {preset.name}"))
    torch.manual_seed(preset.seed)
    try:
        teacher = load_teacher(preset.teacher, device=device)
    except UserError as exc:
        raise UserError(f"preset {preset.name}: teacher: {exc}") from None
    unet, scheduler_config = teacher.unet, teacher.scheduler_config
    steps = preset.steps
    machine = machine_info(device)
    log(f"# {preset.name}: {machine['machine']}, device {machine['device']}, torch {machine['torch']}, diffusers {machine['diffusers']}")

    base = bench_study_config(preset, "dkdm", search_space=preset.dkdm_space, iterations=preset.dkdm_iterations, batch_size=preset.batch_size, lr=preset.lr, options={})
    evaluator = Evaluator(
        base, scheduler_config=scheduler_config, teacher_dataset=teacher.dataset, resolution=teacher.resolution, channels=teacher.channels, device=device,
    )

    # -- measuring: the same noise, features, counting and timing for every row ------------------
    rows: list[Row] = []
    timed: dict[str, nn.Module] = {}  # each row's own copy of its model
    contexts: dict[str, Callable[[nn.Module], Any]] = {}

    def measure(
        name: str, kind: str, model: nn.Module, *, context: Callable[[nn.Module], Any] = contextlib.nullcontext, search_seconds: float = 0.0,
        notes: str = "",
    ) -> Row:
        """FID and trajectory MACs of ``model`` under ``context(model)``; the row is timed at the end
        on a copy of the model as it is now, under the same context."""
        start = time.perf_counter()
        model.eval()
        with context(model):
            trajectory = executed_macs(lambda: sample_images(model, scheduler_config, num_images=1, steps=steps, batch_size=1))
            images = sample_images(model, scheduler_config, num_images=preset.fid_samples, steps=steps, batch_size=preset.fid_batch, seed=preset.seed)
        from automl_diff.metrics.fid import fid_from_images

        fid = fid_from_images(images, evaluator.reference, evaluator.extractor)
        params = sum(p.numel() for p in model.parameters())
        row = Row(name, kind, params, trajectory, trajectory / steps, fid, round(search_seconds, 1), notes=notes)
        rows.append(row)

        timed[name] = copy.deepcopy(model)
        contexts[name] = context
        log(f"{name}: {trajectory / 1e6:.1f}M trajectory MACs, FID {fid:.3f}, made in {search_seconds:.0f} s, measured in {time.perf_counter() - start:.0f} s")
        return row

    teacher_row = measure("teacher", "teacher", unet)
    teacher_cost = count_macs(unet)

    # -- one data-free pool for DKDM, DiffNAS and the Torch-Pruning fine-tune -------------------
    pool_options = {"source": "teacher", "pool_size": preset.pool_size, "pool_steps": preset.pool_steps}
    dkdm_config = replace(base, method_options={**pool_options, "ema_decay": preset.ema_decay})
    start = time.perf_counter()
    inputs = TrainingInputs(dkdm_config, teacher, DKDM.options_from(dkdm_config), device=device)
    inputs.prepare()
    pool_seconds = time.perf_counter() - start
    log(f"pool of {preset.pool_size} teacher generations: {pool_seconds:.0f} s")

    # -- DKDM --------------------------------------------------------------------------------------
    dkdm = DKDM(dkdm_config, teacher, device=device)
    dkdm.inputs = inputs
    start = time.perf_counter()
    candidate = dkdm.run_trial(optuna.trial.FixedTrial(dict(preset.dkdm_params)))
    measure("DKDM student", "method", candidate.unet, search_seconds=pool_seconds + time.perf_counter() - start,
            notes=f"{preset.dkdm_iterations} steps, {_json(preset.dkdm_params)}")

    # -- DiffNAS -------------------------------------------------------------------------------------
    nas_config = bench_study_config(
        preset, "diffnas", search_space=preset.diffnas_space, iterations=preset.retrain_iterations, batch_size=preset.batch_size, lr=preset.lr,
        options={**pool_options, "supernet_iterations": preset.supernet_iterations, "subnets_per_step": preset.subnets_per_step,
                 "search_samples": preset.search_samples, "retrain_iterations": [preset.retrain_iterations], "ema_decay": preset.ema_decay,
                 "block_trials": 10_000, "tolerance_low": 1e-9, "tolerance_high": 1e9, "block_cost": preset.diffnas_block_cost},
    )
    nas = DiffNAS(nas_config, teacher, device=device)
    nas.inputs = inputs
    start = time.perf_counter()
    nas.prepare()
    tolerance, choice = _smallest_tolerance(nas, teacher_cost, preset.max_ratio)
    searched = time.perf_counter() - start
    nas_candidate = nas.run_trial(optuna.trial.FixedTrial({"tolerance": tolerance}))
    nas_seconds = pool_seconds + time.perf_counter() - start
    student = nas_candidate.unet
    student_cost = count_macs(student)
    measure("DiffNAS student", "method", student, search_seconds=nas_seconds,
            notes=f"tolerance {tolerance:.3g}{_block_cost(preset)}, supernets + search {searched:.0f} s, retrained {preset.retrain_iterations} steps; {_json(choice)}")

    # -- Torch-Pruning at the DiffNAS student's MACs, same fine-tune ------------------------------
    start = time.perf_counter()
    pruned, ratio = torch_pruning_peer(unet, student_cost.macs, preset.prune_ratios, log=log)
    tuned = fit(pruned.requires_grad_(True), inputs.batches(preset.seed + 2), iterations=preset.retrain_iterations, batch_size=preset.batch_size,
                lr=preset.lr, ema_decay=preset.ema_decay).model.requires_grad_(False)
    measure("Torch-Pruning peer", "peer", tuned, search_seconds=pool_seconds + time.perf_counter() - start,
            notes=f"L2 magnitude, ratio {ratio}, fine-tuned {preset.retrain_iterations} steps")

    # -- DiP-GO on the teacher ----------------------------------------------------------------------
    def dipgo_config(options: dict[str, Any], iterations: int) -> Any:
        return bench_study_config(
            preset, "dipgo", search_space=None, iterations=iterations, batch_size=preset.dipgo_batch, lr=preset.dipgo_lr, options=options,
        )

    def schedules(method: Any, seconds: float, label: str, kind: str, model: nn.Module) -> list[Row]:
        o = method.options
        pruner = f"pruner ({method.config.budgets.train_iterations} iterations) target {o.target_macs_ratio:g} of the trajectory {'MACs' if o.unit_cost == 'macs' else 'time (units weighed by measured seconds)'}"
        out, seen = [], set()
        for threshold in preset.dipgo_thresholds:
            schedule = method.schedule_for(threshold)
            if schedule.key() in seen:
                continue
            seen.add(schedule.key())
            out.append(measure(
                f"{label}, threshold {threshold:g}", kind, model, context=lambda m, s=schedule: apply_schedule(m, s), search_seconds=seconds,
                notes=f"{len(schedule.units)} units x {steps} steps, {schedule.computed_fraction:.3f} of the units computed; {pruner}",
            ))
        return out

    dipgo = DiPGO(dipgo_config(preset.dipgo, preset.dipgo_iterations), teacher, device=device)
    start = time.perf_counter()
    dipgo.prepare()
    dipgo_seconds = time.perf_counter() - start
    dipgo_rows = schedules(dipgo, dipgo_seconds, "DiP-GO", "method", unet)

    # -- DeepCache at DiP-GO's trajectory MACs ------------------------------------------------------
    target_row = next((r for r in sorted(dipgo_rows, key=lambda r: -r.trajectory_macs) if r.trajectory_macs <= teacher_row.trajectory_macs / 4), None)
    target_row = target_row or min(dipgo_rows, key=lambda r: r.trajectory_macs)
    levels = {}
    for interval in preset.deepcache_intervals:
        with deepcache(unet, scheduler_config, steps, interval)():
            levels[interval] = executed_macs(lambda: sample_images(unet, scheduler_config, num_images=1, steps=steps, batch_size=1))
    interval = min(levels, key=lambda i: abs(levels[i] - target_row.trajectory_macs))
    measure("DeepCache peer", "peer", unet, context=lambda m: deepcache(m, scheduler_config, steps, interval)(),
            notes=f"interval {interval}, branch 0, matched to '{target_row.name}'")

    # -- DiffNAS + DiP-GO: the student as the starting model of a stacked DiP-GO run ---------------
    start_model = Teacher(student, scheduler_config, "DiffNAS student", dataset=teacher.dataset)
    stacked_iterations = preset.stacked_dipgo_iterations or preset.dipgo_iterations
    stacked = DiPGO(dipgo_config({**preset.dipgo, **preset.stacked_dipgo}, stacked_iterations), start_model, reference=teacher, device=device)
    start = time.perf_counter()
    stacked.prepare()
    stacked_seconds = nas_seconds + time.perf_counter() - start
    schedules(stacked, stacked_seconds, "DiffNAS + DiP-GO", "stacked", student)

    # -- latency: every row in lockstep with every other ------------------------------------------
    log(f"timing {len(timed)} rows in lockstep: {preset.latency_repeats} batches of {preset.latency_batch} each")
    seconds = sampler_latencies(
        timed, scheduler_config, contexts=contexts, steps=steps, batch_size=preset.latency_batch, repeats=preset.latency_repeats,
        warmup=preset.latency_warmup,
    )
    for row in rows:
        row.latency = seconds[row.name]
    details = {"tolerance": tolerance, "block_choices": choice, "prune_ratio": ratio, "deepcache_levels": levels, "pool_seconds": pool_seconds}
    return BenchResult(preset, rows, machine, time.perf_counter() - begin, details)


def _smallest_tolerance(nas: Any, teacher_cost: Any, max_ratio: float) -> tuple[float, dict[str, str]]:
    """The smallest tolerance whose DiffNAS student has at most ``max_ratio`` of the teacher's MACs and params."""
    from automl_diff.errors import UserError
    from automl_diff.methods.diffnas import assemble_student
    from automl_diff.metrics.macs import count_macs

    tolerances = sorted({s.loss for scores in nas.block_scores.values() for s in scores})
    for tolerance in tolerances:
        choices, _ = nas.choose(tolerance)
        candidate, _ = assemble_student(nas.teacher.unet, nas.supernets, choices)
        cost = count_macs(candidate)
        if cost.macs <= max_ratio * teacher_cost.macs and cost.params <= max_ratio * teacher_cost.params:
            return max(tolerance * (1 + 1e-9), 1e-9), {n: c.key for n, c in choices.items()}
    raise UserError(f"no DiffNAS student of the search space has at most {max_ratio} of the teacher's MACs and params")


def _block_cost(preset: BenchPreset) -> str:
    """How the DiffNAS row chose its blocks, where it is not by MACs (the paper's choice)."""
    if preset.diffnas_block_cost == "latency":
        return f", per block the fastest candidate within it (timed at batch {preset.latency_batch})"
    return ""


def _json(value: Any) -> str:
    import json

    return json.dumps(value, sort_keys=True)

