"""DiP-GO with MAC weights against latency weights: which units a pruner skips decides how much of
the MACs it saves shows up on the clock.

In one process, on one model (the digits teacher, or ``--model``: any diffusers folder, such as a
DiffNAS export), the same DDIM steps, noise and FID setup: two pruners trained alike except for what
their sparsity loss counts per unit, fvcore MACs (``unit_cost: macs``) or seconds measured on this
machine at ``--latency-batch`` (``unit_cost: latency``), each toward ``--target`` of the full
sampler's cost in its own unit. For each pruner, the schedules at ``--thresholds``. Trajectory MACs
are counted on what executes; latencies of every schedule and the full sampler are measured at the
end, interleaved.

    python bench/dipgo_unit_cost.py --steps 50 --fid-samples 500
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import time
from typing import Any

import torch

from automl_diff.methods.dipgo import Schedule, apply_schedule, prunable_units, unit_costs
from automl_diff.methods.dipgo.optimise import optimise_pruner
from automl_diff.methods.dipgo.schedule import UnitWeights, model_fingerprint
from automl_diff.metrics.fid import fid_from_images, get_extractor, reference_statistics
from automl_diff.metrics.latency import time_interleaved
from automl_diff.metrics.macs import executed_macs
from automl_diff.models import load_teacher
from automl_diff.sampling import sample_images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="digits", help="the model to prune: digits or a diffusers folder of 16x16 digits")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--fid-samples", type=int, default=500)
    parser.add_argument("--target", type=float, default=0.25)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.05, 0.5])
    parser.add_argument("--iterations", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--sparsity-weight", type=float, default=5.0)
    parser.add_argument("--granularity", default="layer", choices=("block", "layer"))
    parser.add_argument("--latency-batch", type=int, default=256)
    parser.add_argument("--latency-repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = parser.parse_args()

    import diffusers

    begin = time.perf_counter()
    print(f"# {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, diffusers {diffusers.__version__}", flush=True)
    torch.manual_seed(args.seed)
    model = load_teacher(args.model)
    unet, scheduler_config = model.unet, model.scheduler_config
    unet.requires_grad_(False)
    extractor = get_extractor("digits")
    reference = reference_statistics("digits", extractor, resolution=16, channels=1)
    units = tuple(prunable_units(unet, args.granularity))
    costs = unit_costs(unet, units)
    latency = UnitWeights.measured(unet, units, batch_size=args.latency_batch, repeats=max(3, args.latency_repeats))
    total, seconds = latency.total, latency.units
    weights = {"macs": UnitWeights.of(costs), "latency": latency}
    print("| unit | share of the MACs | share of the time |\n|---|---|---|")
    for name in units:
        print(f"| {name} | {costs.units[name].macs / costs.total.macs:.3f} | {seconds[name] / total:.3f} |")
    print(f"| outside the units | {costs.always / costs.total.macs:.3f} | {1 - sum(seconds.values()) / total:.3f} |", flush=True)

    def trajectory(context: Any) -> int:
        with context():
            return executed_macs(lambda: sample_images(unet, scheduler_config, num_images=1, steps=args.steps, batch_size=1))

    def fid(context: Any) -> float:
        with context():
            images = sample_images(unet, scheduler_config, num_images=args.fid_samples, steps=args.steps, batch_size=250, seed=args.seed)
        return fid_from_images(images, reference, extractor)

    rows: list[dict[str, Any]] = [{"variant": "full sampler", "trajectory_macs": trajectory(contextlib.nullcontext), "fid": fid(contextlib.nullcontext)}]
    contexts: dict[str, Any] = {"full sampler": contextlib.nullcontext}
    for kind, unit_weights in weights.items():
        start = time.perf_counter()
        result = optimise_pruner(
            unet, scheduler_config, units=units, costs=unit_weights, steps=args.steps, iterations=args.iterations,
            batch_size=args.batch_size, lr=args.lr, target_ratio=args.target, sparsity_weight=args.sparsity_weight, seed=args.seed + 1000,
        )
        pruner_seconds = time.perf_counter() - start
        seen = set()
        for threshold in args.thresholds:
            schedule = Schedule.from_scores(result.scores, threshold, units=units, model=model_fingerprint(unet))
            if schedule.key() in seen:
                continue
            seen.add(schedule.key())
            name = f"unit_cost {kind}, threshold {threshold:g}"
            contexts[name] = lambda s=schedule: apply_schedule(unet, s)
            row = {"variant": name, "trajectory_macs": trajectory(contexts[name]), "fid": fid(contexts[name]),
                   "computed_fraction": schedule.computed_fraction, "pruner_seconds": round(pruner_seconds, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)

    def run() -> None:
        sample_images(unet, scheduler_config, num_images=args.latency_batch, steps=args.steps, batch_size=args.latency_batch)

    times = time_interleaved({name: run for name in contexts}, contexts=contexts, repeats=args.latency_repeats, warmup=1)
    full = rows[0]
    print(f"\n{args.model}, {len(units)} {args.granularity} units, {args.steps} DDIM steps, FID on {args.fid_samples} samples, "
          f"latency per image in batches of {args.latency_batch} (median of {args.latency_repeats}, interleaved); {time.perf_counter() - begin:.0f} s in all\n")
    print("| variant | trajectory MACs | MACs reduction | latency per image | speedup | speedup / MACs reduction | FID |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        row["latency"] = times[row["variant"]] / args.latency_batch
        reduction = full["trajectory_macs"] / row["trajectory_macs"]
        speedup = times["full sampler"] / times[row["variant"]]
        row.update(macs_reduction=reduction, speedup=speedup)
        print(f"| {row['variant']} | {row['trajectory_macs'] / 1e6:.0f}M | {reduction:.2f}x | {row['latency'] * 1e3:.2f} ms | "
              f"{speedup:.2f}x | {speedup / reduction:.2f} | {row['fid']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"units": {n: {"macs": costs.units[n].macs, "seconds": seconds[n]} for n in units}, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
