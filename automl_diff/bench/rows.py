"""The rows of the benchmark, one function each, over the public API.

Each row builds its model (a :class:`~automl_diff.methods.base.Method` run with fixed parameters,
a schedule applied with :func:`~automl_diff.gating.apply_schedule`, or a peer) and hands it to
:meth:`Bench.measure <automl_diff.bench.session.Bench.measure>`. A row that builds on another (the
Torch-Pruning peer at the DiffNAS student's MACs, DeepCache at DiP-GO's, the stacked schedules on
the DiffNAS student) names it in :data:`ROWS`; :func:`plan` runs it first. Every row starts from
the preset's seed, so a row measured alone gives what it gives in the full run.

1. ``teacher``: the teacher itself.
2. ``dkdm``: a DKDM student (data-free distillation into a fixed architecture of the search space).
3. ``diffnas``: a DiffNAS student (supernets, local search, the smallest tolerance within
   ``max_ratio`` of the teacher's MACs and params, each block its cheapest candidate within it in
   MACs or measured seconds, retrained with the dynamic joint loss).
4. ``torch_pruning``: the teacher pruned by Torch-Pruning (L2 magnitude, as Diff-Pruning) at the
   ratio whose MACs are closest to the DiffNAS student's, fine-tuned with the same data-free
   batches and budget.
5. ``bk_sdm``: BK-SDM's block removal (its Base and/or Small variant, a row each) of the teacher, the remaining
   weights kept, retrained with BK-SDM's own loss (task + output distillation + stage-feature
   distillation, weight 1 each; on data-free batches the task target is the teacher's prediction)
   from the same data-free batches at the DiffNAS student's budget, through the same loop. Named
   for what it is: on a teacher with one pair per down stage the rule empties every down stage.
6. ``dkdm_data``: the DKDM student's architecture trained at its budget on the dataset (real images,
   captioned for a text-to-image teacher) instead of the teacher's generations: what data-free
   distillation gives up.
7. ``dipgo``: DiP-GO schedules of the teacher (one pruner, several budgets).
8. ``deepcache``: DeepCache at the caching interval whose trajectory MACs are closest to DiP-GO's
   first schedule at or below 1/4 of the teacher's (else its sparsest).
9. ``steps``: the teacher sampling with fewer steps (evenly spaced calls computed, the calls
   between skipped), at the number of calls matched to DiP-GO's schedule as DeepCache's is: the
   recipe a schedule must beat before any cache.
10. ``fbcache`` and ``taylorseer`` (a transformer teacher): diffusers' First Block Cache at the
   threshold, and its TaylorSeer cache at the interval, whose trajectory MACs are closest to
   DiP-GO's first schedule that meets the preset's MACs goal (else its sparsest).
11. ``stacked``: DiffNAS + DiP-GO, the DiffNAS student as the starting model of a DiP-GO run whose
   yardstick is the original teacher, through the same ``DiPGO(original=...)`` code path as a
   stacked study (the student stays in memory instead of being exported and loaded again).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from automl_diff.bench.peers import deepcache, first_block_cache, retrain_bk_sdm, taylorseer_cache, torch_pruning_peer
from automl_diff.bench.presets import BenchPreset
from automl_diff.bench.session import Bench, Row, check_file, check_peer
from automl_diff.errors import UserError
from automl_diff.gating import Schedule, apply_schedule, prunable_units
from automl_diff.methods import DKDM, DiffNAS, DiPGO
from automl_diff.methods.diffnas import assemble_student
from automl_diff.methods.dipgo.method import BUDGET, DiPGOAttr
from automl_diff.methods.dkdm.method import DKDMAttr
from automl_diff.methods.training import fit
from automl_diff.metrics.macs import count_macs
from automl_diff.models.dataflow import is_transformer
from automl_diff.models.loading import Teacher
from automl_diff.models.recipes import BK_SDM_VARIANTS, bk_sdm_label

__all__ = ["ROWS", "RowSpec", "plan"]


@dataclass(frozen=True)
class RowSpec:
    """A row of the benchmark: what it runs, the rows it builds on, what it needs installed."""

    run: Callable[[Bench], Any]
    needs: tuple[str, ...] = ()
    peers: tuple[str, ...] = ()
    files: tuple[str, ...] = ()

    def check(self, preset: BenchPreset) -> None:
        """Fail before anything runs, with one line, on a missing peer package or preset file."""
        for module in self.peers:
            check_peer(module)
        for what in self.files:
            check_file(preset, what, getattr(preset, what))


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def teacher_row(bench: Bench) -> None:
    bench.measure("teacher", "teacher", bench.teacher.unet)


def dkdm_row(bench: Bench) -> None:
    p = bench.preset
    settings = bench.settings(iterations=p.dkdm_iterations, search_space=p.dkdm_space)
    options = {**bench.pool_options, "ema_decay": p.ema_decay, "init": p.dkdm_init}
    dkdm = bench.method(DKDM, options, settings, inputs=bench.inputs)
    start = time.perf_counter()
    candidate = dkdm.run_trial(dict(p.dkdm_params))
    blocks = candidate.attrs.get(DKDMAttr.INHERITED_BLOCKS)
    bench.measure(
        "DKDM student",
        "method",
        candidate.unet,
        search_seconds=bench.pool_seconds + time.perf_counter() - start,
        notes=f"{p.dkdm_iterations} steps from {'a cut of the teacher' if p.dkdm_init == 'teacher' else 'a random init'}, "
        f"{_json(p.dkdm_params)}" + (f", the teacher's blocks {blocks}" if blocks else ""),
    )


def dkdm_data_row(bench: Bench) -> None:
    p = bench.preset
    settings = bench.settings(iterations=p.dkdm_iterations, search_space=p.dkdm_space)
    if p.dkdm_dataset is not None:
        settings = replace(settings, dataset=p.dkdm_dataset)
    dkdm = bench.method(DKDM, {"source": "dataset", "ema_decay": p.ema_decay, "init": p.dkdm_init}, settings)
    start = time.perf_counter()
    dkdm.prepare()
    candidate = dkdm.run_trial(dict(p.dkdm_params))
    what = "captioned images" if bench.teacher.text is not None else "images"
    bench.measure(
        "DKDM architecture, trained on the dataset",
        "baseline",
        candidate.unet,
        search_seconds=time.perf_counter() - start,
        notes=f"the DKDM student's architecture and budget ({p.dkdm_iterations} steps), trained on the "
        f"{settings.dataset or bench.teacher.dataset} {what} (noise-prediction loss): not data-free",
        peer_of="DKDM student",
    )


def _smallest_tolerance(nas: DiffNAS, max_ratio: float, max_params_ratio: float | None = None) -> tuple[float, dict[str, str]]:
    """The smallest tolerance whose DiffNAS student has at most ``max_ratio`` of the teacher's MACs
    and params (``max_params_ratio`` of its params, where given)."""
    teacher = count_macs(nas.teacher.unet)
    tolerances = sorted({s.loss for scores in (nas.block_scores or {}).values() for s in scores})
    for tolerance in tolerances:
        choices, _ = nas.choose(tolerance)
        candidate, _ = assemble_student(nas.teacher.unet, nas.supernets, choices)
        cost = count_macs(candidate)
        params_ratio = max_ratio if max_params_ratio is None else max_params_ratio
        if cost.macs <= max_ratio * teacher.macs and cost.params <= params_ratio * teacher.params:
            return max(tolerance * (1 + 1e-9), 1e-9), {n: c.key for n, c in choices.items()}
    raise UserError(f"no DiffNAS student of the search space has at most {max_ratio} of the teacher's MACs and params")


def diffnas_row(bench: Bench) -> None:
    p = bench.preset
    options = {
        **bench.pool_options,
        "supernet_iterations": p.supernet_iterations,
        "subnets_per_step": p.subnets_per_step,
        "search_samples": p.search_samples,
        "retrain_iterations": [p.retrain_iterations],
        "ema_decay": p.ema_decay,
        "block_trials": 10_000,
        "tolerance_low": 1e-9,
        "tolerance_high": 1e9,
        "block_cost": p.diffnas_block_cost,
    }
    settings = bench.settings(iterations=p.retrain_iterations, search_space=p.diffnas_space)
    nas = bench.method(DiffNAS, options, settings, inputs=bench.inputs)
    start = time.perf_counter()
    nas.prepare()
    tolerance, choice = _smallest_tolerance(nas, p.max_ratio, p.max_params_ratio)
    searched = time.perf_counter() - start
    student = nas.run_trial({"tolerance": tolerance}).unet
    seconds = bench.pool_seconds + time.perf_counter() - start
    how = f", per block the fastest candidate within it (timed at batch {p.latency_batch})" if p.diffnas_block_cost == "latency" else ""
    bench.measure(
        "DiffNAS student",
        "method",
        student,
        search_seconds=seconds,
        notes=f"tolerance {tolerance:.3g}{how}, supernets + search {searched:.0f} s, "
        f"retrained {p.retrain_iterations} steps; {_json(choice)}",
    )
    bench.results["diffnas"] = (student, seconds)
    bench.details.update(tolerance=tolerance, block_choices=choice)


def _retrain_peer(bench: Bench, model: nn.Module, seed: int) -> nn.Module:
    """A peer retrained at the DiffNAS student's budget on the shared data-free batches."""
    p = bench.preset
    return fit(
        model.requires_grad_(True),
        bench.inputs.batches(seed),
        iterations=p.retrain_iterations,
        batch_size=p.batch_size,
        lr=p.lr,
        ema_decay=p.ema_decay,
    ).model.requires_grad_(False)


def torch_pruning_row(bench: Bench) -> None:
    p = bench.preset
    student, _ = bench.results["diffnas"]
    start = time.perf_counter()
    pruned, ratio = torch_pruning_peer(bench.teacher.unet, count_macs(student).macs, p.prune_ratios, log=bench.log)
    tuned = _retrain_peer(bench, pruned, p.seed + 2)
    bench.measure(
        "Torch-Pruning peer",
        "peer",
        tuned,
        search_seconds=bench.pool_seconds + time.perf_counter() - start,
        notes=f"L2 magnitude, ratio {ratio}, fine-tuned {p.retrain_iterations} steps",
        peer_of="DiffNAS student",
    )
    bench.details["prune_ratio"] = ratio


def bk_sdm_row(bench: Bench) -> None:
    p = bench.preset
    teacher = bench.teacher.unet
    for index, variant in enumerate(p.bk_sdm_variants):
        start = time.perf_counter()
        result, _, removed = retrain_bk_sdm(
            teacher,
            variant,
            bench.inputs.batches(p.seed + 3),
            iterations=p.retrain_iterations,
            batch_size=p.batch_size,
            lr=p.lr,
            ema_decay=p.ema_decay,
        )
        bench.measure(
            f"BK-SDM peer ({bk_sdm_label(teacher, variant)})",
            "peer",
            result.model,
            search_seconds=bench.pool_seconds + time.perf_counter() - start,
            notes=f"{BK_SDM_VARIANTS[variant]}'s block removal ({', '.join(removed)}), the teacher's remaining weights, "
            f"retrained {p.retrain_iterations} steps with BK-SDM's loss (task + output + stage-feature MSE, weight 1 each)",
            peer_of="DiffNAS student" if index == 0 else None,
        )


def _schedule_rows(bench: Bench, method: DiPGO, seconds: float, label: str, kind: str) -> list[Row]:
    """One row per distinct schedule the method's pruner gives at the preset's budgets (the
    paper's post-processing: the highest-scoring gates within each)."""
    o = method.options
    batch = method.settings.latency_batch_size
    unit = "MACs" if o.unit_cost == "macs" else f"time (units weighed by their seconds measured at batch {batch})"
    pruner = (
        f"{o.pruner} pruner ({method.settings.budgets.train_iterations} iterations) trained to {o.target_macs_ratio:g} of "
        f"the trajectory {unit}, {o.granularity} units"
    )
    rows, seen = [], set()
    for budget in bench.preset.dipgo_budgets:
        schedule = method.schedule_for({BUDGET: budget})
        if schedule.key() in seen:
            continue
        seen.add(schedule.key())
        bench.details.setdefault("schedules", {})[f"{label}, budget {budget:g}"] = schedule.to_dict()
        rows.append(
            bench.measure(
                f"{label}, budget {budget:g}",
                kind,
                method.teacher.unet,
                context=lambda m, s=schedule: apply_schedule(m, s),
                compiled=lambda m, s=schedule: apply_schedule(m, s, compile=True, plan_graphs=bench.preset.compiled_plan_graphs),
                search_seconds=seconds,
                notes=f"{len(schedule.units)} units x {schedule.steps} model calls, {schedule.computed_fraction:.3f} of the "
                f"gates on, {schedule.info[DiPGOAttr.COST_RATIO]:.3f} of the trajectory's {'MACs' if o.unit_cost == 'macs' else 'time'}; "
                f"{pruner}",
            )
        )
    return rows


def _dipgo(bench: Bench, start_model: Teacher, options: dict[str, Any], iterations: int) -> tuple[DiPGO, float]:
    p = bench.preset
    settings = bench.settings(iterations=iterations, batch_size=p.dipgo_batch, lr=p.dipgo_lr)
    if p.dipgo_weights_batch is not None:  # latency weights measured at the batch its schedules are for
        settings = replace(settings, latency_batch_size=p.dipgo_weights_batch)
    method = bench.method(DiPGO, options, settings, start=start_model)
    start = time.perf_counter()
    method.prepare()
    return method, time.perf_counter() - start


def dipgo_row(bench: Bench) -> None:
    method, seconds = _dipgo(bench, bench.teacher, bench.preset.dipgo, bench.preset.dipgo_iterations)
    bench.results["dipgo"] = _schedule_rows(bench, method, seconds, "DiP-GO", "method")


def _matched(
    bench: Bench, model: nn.Module, peer: Callable[[Any], Callable[[], Any]], settings: Sequence[Any], reduction: float
) -> tuple[Row, Any, dict[Any, int]]:
    """What a caching peer is matched to: the DiP-GO schedule with the most trajectory MACs among
    those at least ``reduction`` times below the teacher's (else the cheapest), the peer's setting
    whose trajectory MACs (under ``peer(setting)()``) are closest to it, and every setting's MACs."""
    dipgo_rows: list[Row] = bench.results["dipgo"]
    teacher_macs = next(r.trajectory_macs for r in bench.rows if r.kind == "teacher")
    target = next((r for r in sorted(dipgo_rows, key=lambda r: -r.trajectory_macs) if r.trajectory_macs <= teacher_macs / reduction), None)
    target = target or min(dipgo_rows, key=lambda r: r.trajectory_macs)
    levels = {}
    for setting in settings:
        with peer(setting)():
            levels[setting] = bench.trajectory_macs(model)
    return target, min(levels, key=lambda k: abs(levels[k] - target.trajectory_macs)), levels


def deepcache_row(bench: Bench) -> None:
    unet, sampler = bench.teacher.unet, bench.sampler
    target, interval, levels = _matched(bench, unet, lambda i: deepcache(unet, sampler, i), bench.preset.deepcache_intervals, 4)
    bench.measure(
        "DeepCache peer",
        "peer",
        unet,
        context=lambda m: deepcache(m, sampler, interval)(),
        notes=f"interval {interval}, branch 0, matched to '{target.name}'",
        peer_of=target.name,
    )
    bench.details["deepcache_levels"] = levels


def steps_row(bench: Bench) -> None:
    """The teacher sampling with fewer steps (:meth:`~automl_diff.gating.Schedule.uniform_steps`:
    that many evenly spaced calls of the sampler's, the calls between skipped; with DDIM at eta 0,
    DDIM on those timesteps), at the number of calls whose trajectory MACs are closest to DiP-GO's
    first schedule at or below 1/4 of the teacher's, as DeepCache's."""
    unet, calls = bench.teacher.unet, bench.sampler.model_calls
    units = prunable_units(unet, "block")

    def schedule(n: int) -> Schedule:
        return Schedule.uniform_steps(unet, calls, n, units=units)

    counts = [n for n in bench.preset.step_counts if n <= calls]
    target, n, levels = _matched(bench, unet, lambda n: lambda: apply_schedule(unet, schedule(n)), counts, 4)
    chosen = schedule(n)
    bench.measure(
        "Fewer steps peer",
        "peer",
        unet,
        context=lambda m: apply_schedule(m, chosen),
        compiled=lambda m: apply_schedule(m, chosen, compile=True, plan_graphs=bench.preset.compiled_plan_graphs),
        notes=f"{n} evenly spaced of the {calls} model calls computed, the calls between skipped, matched to '{target.name}'",
        peer_of=target.name,
    )
    bench.details["steps_levels"] = levels


def _cache_row(bench: Bench, row: str, peer: Callable[[nn.Module, Any], Callable[[], Any]], settings: Sequence[Any], notes: str) -> Any:
    """A diffusers cache on a transformer teacher, at the setting (of ``settings``) whose
    trajectory MACs are closest to the DiP-GO schedule that meets the MACs goal with the fewest
    savings; ``notes`` describes it (``{setting}`` and ``{target}`` filled in). Returns the
    trajectory MACs of every setting."""
    model = bench.teacher.unet
    if not is_transformer(model):
        raise UserError(f"bench preset {bench.preset.name}: row {row}: diffusers' caches gate transformer blocks; the teacher is a UNet")
    target, setting, levels = _matched(bench, model, lambda s: peer(model, s), settings, bench.preset.goal[0])
    bench.measure(
        row,
        "peer",
        model,
        context=lambda m: peer(m, setting)(),
        notes=notes.format(setting=setting, target=target.name),
        peer_of=target.name,
    )
    return levels


def fbcache_row(bench: Bench) -> None:
    """diffusers' First Block Cache, at the threshold matched to DiP-GO (:func:`_cache_row`)."""
    bench.details["fbcache_levels"] = _cache_row(
        bench,
        "FirstBlockCache peer",
        first_block_cache,
        bench.preset.fbcache_thresholds,
        "diffusers' First Block Cache, threshold {setting:g}, matched to '{target}' (its MACs depend on the images)",
    )


def taylorseer_row(bench: Bench) -> None:
    """diffusers' TaylorSeer cache, at the interval matched to DiP-GO (:func:`_cache_row`)."""
    bench.details["taylorseer_levels"] = _cache_row(
        bench,
        "TaylorSeer peer",
        taylorseer_cache,
        bench.preset.taylorseer_intervals,
        "diffusers' TaylorSeer cache, the first 3 steps computed, then one in {setting}, each block's attention and "
        "feed-forward forecast between them (first order), matched to '{target}'",
    )


def stacked_row(bench: Bench) -> None:
    p = bench.preset
    student, student_seconds = bench.results["diffnas"]
    start_model = replace(bench.teacher, unet=student, source="DiffNAS student", weights_dir=None)
    method, seconds = _dipgo(bench, start_model, {**p.dipgo, **p.stacked_dipgo}, p.stacked_dipgo_iterations or p.dipgo_iterations)
    _schedule_rows(bench, method, student_seconds + seconds, "DiffNAS + DiP-GO", "stacked")


#: Every row, in the order a full run measures them.
ROWS: dict[str, RowSpec] = {
    "teacher": RowSpec(teacher_row),
    "dkdm": RowSpec(dkdm_row, files=("dkdm_space",)),
    "diffnas": RowSpec(diffnas_row, files=("diffnas_space",)),
    "torch_pruning": RowSpec(torch_pruning_row, needs=("diffnas",), peers=("torch_pruning",)),
    "bk_sdm": RowSpec(bk_sdm_row, needs=("diffnas",)),
    "dkdm_data": RowSpec(dkdm_data_row, needs=("dkdm",), files=("dkdm_space",)),
    "dipgo": RowSpec(dipgo_row),
    "deepcache": RowSpec(deepcache_row, needs=("dipgo",), peers=("DeepCache",)),
    "steps": RowSpec(steps_row, needs=("dipgo",)),
    "fbcache": RowSpec(fbcache_row, needs=("dipgo",)),
    "taylorseer": RowSpec(taylorseer_row, needs=("dipgo",)),
    "stacked": RowSpec(stacked_row, needs=("diffnas",)),
}


def plan(names: Sequence[str] | None, preset: BenchPreset | None = None) -> list[str]:
    """The rows to run for ``names`` (None: the preset's rows, else all): the teacher, the rows
    asked for and the rows they build on, in :data:`ROWS` order.

    Raises:
        UserError: a name is not a row.
    """
    if names is None and preset is not None and preset.rows is not None:
        names = preset.rows
    if names is None:
        return list(ROWS)
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        raise UserError(f"--rows: unknown row '{unknown[0]}'; rows: {', '.join(ROWS)}")
    wanted = {"teacher"}
    todo = list(names)
    while todo:
        name = todo.pop()
        if name not in wanted:
            wanted.add(name)
            todo += ROWS[name].needs
    return [name for name in ROWS if name in wanted]
