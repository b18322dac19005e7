"""DiP-GO against DeepCache on the digits teacher: trajectory MACs, FID and wall-clock, side by side.

In one process, on the same teacher, DDIM steps, noise and FID setup:

1. the teacher (full sampler);
2. DeepCache (the ``DeepCache`` package's ``DeepCacheSDHelper`` applied to a ``DDIMPipeline`` of
   the teacher) at each ``--deepcache-intervals`` (uniform caching, branch 0);
3. DiP-GO matched to each DeepCache level: the threshold whose schedule executes the most MACs
   not above the level, from the pruner trained toward ``--target`` (as a study tunes it), or
   with ``--per-level-pruners`` from a pruner trained toward that level;
4. DiP-GO at ``--target`` for the headline trade-off (thresholds ``--thresholds``).

Trajectory MACs of every variant are counted the same way, on the computation that really runs
(torch's ``FlopCounterMode`` over one image's trajectory), and reported as a fraction of the
teacher's; fvcore's analytic count of each DiP-GO schedule is printed beside it. Latency is per
image, batches of ``--latency-batch``, in lockstep with the teacher's (each on its own copy of the model).

    python bench/dipgo_digits.py --steps 100 --fid-samples 1000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from typing import Any

import numpy as np
import torch

from automl_diff.bench.peers import deepcache as deepcache_context
from automl_diff.methods.dipgo import Schedule, apply_schedule, prunable_units, unit_costs
from automl_diff.methods.dipgo.optimise import optimise_pruner
from automl_diff.methods.dipgo.schedule import model_fingerprint
from automl_diff.metrics.fid import fid_from_images, get_extractor, reference_statistics
from automl_diff.metrics.latency import measure_latencies
from automl_diff.metrics.macs import executed_macs
from automl_diff.models import load_teacher
from automl_diff.sampling import sample_images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--fid-samples", type=int, default=1000)
    parser.add_argument("--deepcache-intervals", type=int, nargs="*", default=[3, 5])
    parser.add_argument("--target", type=float, default=0.23, help="DiP-GO target for the headline schedule")
    parser.add_argument("--per-level-pruners", action="store_true", help="train one pruner per DeepCache level")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2, 0.5])
    parser.add_argument("--iterations", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--sparsity-weight", type=float, default=5.0)
    parser.add_argument("--granularity", default="layer", choices=("block", "layer"))
    parser.add_argument("--latency-batch", type=int, default=64)
    parser.add_argument("--latency-repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    import platform

    import diffusers

    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, diffusers {diffusers.__version__}", flush=True)
    teacher = load_teacher("digits")
    unet, scheduler_config = teacher.unet, teacher.scheduler_config
    extractor = get_extractor("digits")
    reference = reference_statistics("digits", extractor, resolution=16, channels=1)
    units = tuple(prunable_units(unet, args.granularity))
    costs = unit_costs(unet, units)
    fingerprint = model_fingerprint(unet)

    def one_trajectory() -> None:
        sample_images(unet, scheduler_config, num_images=1, steps=args.steps, batch_size=1)

    def fid(context: Any) -> float:
        with context(unet):
            images = sample_images(unet, scheduler_config, num_images=args.fid_samples, steps=args.steps, batch_size=250, seed=args.seed)
        return fid_from_images(images, reference, extractor)

    def executed(context: Any) -> int:
        with context(unet):
            return executed_macs(one_trajectory)

    def latency(context: Any) -> tuple[float, float]:
        times = measure_latencies(
            unet, scheduler_config, {"teacher": contextlib.nullcontext, "variant": context},
            steps=args.steps, batch_size=args.latency_batch, repeats=args.latency_repeats,
        )
        return times["variant"], times["teacher"]

    def deepcache(interval: int) -> Any:
        return lambda model: deepcache_context(model, scheduler_config, args.steps, interval)()

    def scheduled(schedule: Schedule) -> Any:
        return lambda model: apply_schedule(model, schedule)

    full_executed = executed(contextlib.nullcontext)
    full_analytic = costs.total.macs * args.steps
    rows: list[dict[str, Any]] = []

    def measure(name: str, context: Any, *, schedule: Schedule | None = None, search_seconds: float = 0.0) -> dict[str, Any]:
        start = time.perf_counter()
        row = {"variant": name, "executed_ratio": executed(context) / full_executed}
        if schedule is not None:
            row["analytic_ratio"] = schedule.trajectory_macs(costs) / full_analytic
            row["threshold"] = schedule.info.get("threshold")
        row["trajectory_macs"] = round(row["executed_ratio"] * full_analytic)
        row["fid"] = fid(context)
        row["latency"], row["teacher_latency"] = latency(context)
        row["speedup"] = row["teacher_latency"] / row["latency"]
        row["macs_reduction"] = 1 / row["executed_ratio"]
        row["speedup_per_macs_reduction"] = row["speedup"] / row["macs_reduction"]
        row["search_seconds"] = round(search_seconds, 1)
        row["eval_seconds"] = round(time.perf_counter() - start, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
        return row

    teacher_row = measure("teacher", contextlib.nullcontext)

    pruners: dict[float, Any] = {}

    def pruner(target: float) -> Any:
        if target not in pruners:
            start = time.perf_counter()
            result = optimise_pruner(
                unet, scheduler_config, units=units, costs=costs, steps=args.steps, iterations=args.iterations,
                batch_size=args.batch_size, lr=args.lr, target_ratio=target, sparsity_weight=args.sparsity_weight,
                seed=args.seed + 1000, progress=True,
            )
            pruners[target] = (result, time.perf_counter() - start)
        return pruners[target]

    def schedule_at(result: Any, threshold: float, target: float) -> Schedule:
        return Schedule.from_scores(result.scores, threshold, units=units, model=fingerprint, info={"target_macs_ratio": target})

    for interval in args.deepcache_intervals:
        level = measure(f"DeepCache interval {interval}", deepcache(interval))
        result, seconds = pruner(round(level["executed_ratio"], 3) if args.per_level_pruners else args.target)
        # the threshold whose schedule executes the most MACs not above the DeepCache level
        best, seen = None, set()
        for threshold in np.geomspace(1e-6, 0.5, 40):
            schedule = schedule_at(result, float(threshold), level["executed_ratio"])
            if schedule.key() in seen:
                continue
            seen.add(schedule.key())
            ratio = executed(scheduled(schedule)) / full_executed
            if ratio <= level["executed_ratio"] and (best is None or ratio > best[0]):
                best = (ratio, schedule)
        if best is None:
            print(f"no DiP-GO schedule at or below DeepCache interval {interval}'s MACs", flush=True)
            continue
        measure(f"DiP-GO matched to interval {interval}", scheduled(best[1]), schedule=best[1], search_seconds=seconds)

    result, seconds = pruner(args.target)
    seen = set()
    for threshold in args.thresholds:
        schedule = schedule_at(result, threshold, args.target)
        if schedule.key() in seen:
            continue
        seen.add(schedule.key())
        measure(f"DiP-GO target {args.target} threshold {threshold:g}", scheduled(schedule), schedule=schedule, search_seconds=seconds)

    print("\n| variant | trajectory MACs (fraction of teacher) | fvcore fraction | MACs reduction | FID | FID / teacher | latency per image | speedup | speedup / MACs reduction | search |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        analytic = f"{r['analytic_ratio']:.3f}" if "analytic_ratio" in r else "-"
        print(
            f"| {r['variant']} | {r['trajectory_macs'] / 1e6:.0f}M ({r['executed_ratio']:.3f}) | {analytic} | {r['macs_reduction']:.2f}x | "
            f"{r['fid']:.2f} | {r['fid'] / teacher_row['fid']:.2f} | {r['latency'] * 1e3:.1f} ms | {r['speedup']:.2f}x | "
            f"{r['speedup_per_macs_reduction']:.2f} | {r['search_seconds']:.0f} s |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
