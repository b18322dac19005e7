"""DiffNAS students chosen per block by MACs against students chosen by measured latency.

In one process, on the digits teacher with the ``digits`` benchmark preset's DiffNAS setup (one
data-free pool, the same supernets, trained once): two local searches over the same candidates,
one with ``block_cost: macs`` and one with ``block_cost: latency`` (each candidate cut out as a
plain block and timed at ``--latency-batch``). For each tolerance, the student each search selects
(not retrained: both inherit the supernets' weights, and time does not depend on them) with its
MACs, params, summed block loss, and the latency of one UNet call at ``--latency-batch``, measured
for every student and the teacher interleaved.

    python experiments/diffnas_block_cost.py --tolerances 0.01 0.02 0.045 0.1 0.3
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from automl_diff.bench.presets import PRESETS
from automl_diff.bench.session import Bench
from automl_diff.methods import DiffNAS
from automl_diff.methods.diffnas import assemble_student
from automl_diff.metrics.latency import lockstep_rounds, once
from automl_diff.metrics.macs import count_macs, example_inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tolerances", type=float, nargs="+", default=[0.01, 0.02, 0.045, 0.1, 0.3])
    parser.add_argument("--latency-batch", type=int, default=256)
    parser.add_argument("--latency-repeats", type=int, default=7)
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = parser.parse_args()

    begin = time.perf_counter()
    # the teacher, the machine banner and the shared data-free pool, all on the CPU
    digits = PRESETS["digits"]
    evaluation = replace(digits.evaluation, latency_batch_size=args.latency_batch)
    bench = Bench(replace(digits, evaluation=evaluation, device="cpu"), log=lambda line: print(line, flush=True))
    preset, teacher = bench.preset, bench.teacher
    inputs = bench.inputs

    searches = {}
    with tempfile.TemporaryDirectory() as workdir:  # the second search reuses the first one's supernets
        for cost in ("macs", "latency"):
            options = {
                **bench.pool_options,
                "supernet_iterations": preset.supernet_iterations,
                "subnets_per_step": preset.subnets_per_step,
                "search_samples": preset.search_samples,
                "block_trials": 10_000,
                "tolerance_low": 1e-9,
                "tolerance_high": 1e9,
                "block_cost": cost,
            }
            nas = bench.method(DiffNAS, options, bench.settings(iterations=0, search_space=preset.diffnas_space), inputs=inputs)
            start = time.perf_counter()
            nas.prepare(workdir=Path(workdir))
            print(f"block_cost {cost}: supernets and search {time.perf_counter() - start:.0f} s", flush=True)
            searches[cost] = nas

    teacher_cost = count_macs(teacher.unet)
    models = {"teacher": teacher.unet}
    rows = []
    for tolerance in args.tolerances:
        for cost, nas in searches.items():
            choices, losses = nas.choose(tolerance)
            student, _ = assemble_student(teacher.unet, nas.supernets, choices)
            name = f"tolerance {tolerance:g}, by {cost}"
            models[name] = student
            c = count_macs(student)
            rows.append(
                {
                    "name": name,
                    "tolerance": tolerance,
                    "block_cost": cost,
                    "macs": c.macs,
                    "params": c.params,
                    "block_loss": sum(losses.values()),
                    "choices": {n: ch.key for n, ch in choices.items()},
                }
            )
    calls = {}
    for name, model in models.items():
        call_inputs = example_inputs(model, batch_size=args.latency_batch)
        calls[name] = once(lambda model=model, call_inputs=call_inputs: model(*call_inputs))
    with torch.no_grad():
        rounds = lockstep_rounds(calls, repeats=args.latency_repeats, warmup=1)
    seconds = {name: statistics.median(values) for name, values in rounds.items()}
    base = seconds["teacher"]
    print(
        f"\nteacher: {teacher_cost.macs / 1e6:.1f}M MACs per call, {teacher_cost.params / 1e6:.3f}M "
        f"params, {base * 1e3:.1f} ms per call at batch {args.latency_batch}"
    )
    print(
        "\n| tolerance | blocks chosen by | MACs / teacher | params / teacher "
        "| summed block loss | time / teacher | speedup / MACs reduction |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        macs_ratio, time_ratio = row["macs"] / teacher_cost.macs, seconds[row["name"]] / base
        row.update(seconds=seconds[row["name"]], macs_ratio=macs_ratio, time_ratio=time_ratio)
        print(
            f"| {row['tolerance']:g} | {row['block_cost']} | {macs_ratio:.3f} | "
            f"{row['params'] / teacher_cost.params:.3f} | {row['block_loss']:.3f} "
            f"| {time_ratio:.3f} | {macs_ratio / time_ratio:.2f} |"
        )
    differ = [t for t in args.tolerances if len({json.dumps(r["choices"], sort_keys=True) for r in rows if r["tolerance"] == t}) > 1]
    print(f"\nthe two searches choose different students at tolerances {differ or 'none'}")
    for row in rows:
        if row["tolerance"] in differ:
            print(f"  {row['name']}: {json.dumps(row['choices'], sort_keys=True)}")
    print(f"\n{time.perf_counter() - begin:.0f} s in all")
    if args.json:
        Path(args.json).write_text(json.dumps({"teacher_seconds": base, "teacher_macs": teacher_cost.macs, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
