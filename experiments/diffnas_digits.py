"""DiffNAS on the digits teacher, measured side by side in one process.

Rows, all with the same DDIM sampler, steps, seeds and digits-feature FID:

* the teacher;
* the DiffNAS student (block supernets trained data-free, local search, the smallest tolerance
  whose student has at most ``--max-ratio`` of the teacher's MACs and params), retrained with the
  dynamic joint loss (block-feature weight 1 -> 0, linear);
* the same student retrained with a static joint loss (w = ``--static-w``), same budget;
* a Torch-Pruning peer: the teacher pruned with magnitude (L2) importance, as Diff-Pruning does,
  at the pruning ratio whose MACs are closest to the DiffNAS student's, then fine-tuned with the
  same budget on the same data-free batches (noise-prediction MSE against the teacher).

Then local against global search: evaluations and wall time until each finds a student whose
mean block loss is at most the local choice's at no more MACs.

    python experiments/diffnas_digits.py --retrain-iterations 1500 --fid-samples 1000
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import replace
from typing import Any

import optuna
import torch

from automl_diff.bench.peers import torch_pruning_peer
from automl_diff.bench.presets import PRESETS
from automl_diff.bench.session import Bench, check_peer
from automl_diff.config.search_space import load_search_space
from automl_diff.methods.diffnas import (
    JointLoss,
    JointWeight,
    assemble_student,
    build_supernets,
    choose_local,
    global_search,
    local_search,
    train_supernets,
)
from automl_diff.methods.diffnas.search import record_teacher_blocks
from automl_diff.methods.training import fit
from automl_diff.metrics.macs import count_macs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--space", default="search_spaces/digits_unet.yaml")
    parser.add_argument("--supernet-iterations", type=int, default=400)
    parser.add_argument("--subnets-per-step", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--supernet-lr", type=float, default=1e-3)
    parser.add_argument("--retrain-iterations", type=int, default=1500)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema-decay", type=float, default=0.99)
    parser.add_argument("--static-w", type=float, default=0.5)
    parser.add_argument("--max-ratio", type=float, default=0.5, help="student MACs and params at most this fraction of the teacher's")
    parser.add_argument("--pool-size", type=int, default=1024)
    parser.add_argument("--search-samples", type=int, default=256)
    parser.add_argument("--global-trials", type=int, default=300)
    parser.add_argument("--prune-ratios", type=float, nargs="+", default=[0.25, 0.26, 0.27, 0.28, 0.29, 0.3])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--fid-samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = parser.parse_args()

    check_peer("torch_pruning")
    # the digits teacher, its FID reference, the machine banner and the data-free pool, on the CPU
    digits = PRESETS["digits"]
    evaluation = replace(digits.evaluation, fid_samples=args.fid_samples, sampling=replace(digits.evaluation.sampling, steps=args.steps))
    preset = replace(
        digits,
        evaluation=evaluation,
        seed=args.seed,
        batch_size=args.batch_size,
        pool_size=args.pool_size,
        pool_steps=50,
        device="cpu",
    )
    bench = Bench(preset, log=lambda line: print(line, flush=True))
    unet = bench.teacher.unet
    sampler = bench.teacher.sampler(steps=args.steps)
    teacher_cost = count_macs(unet)

    def fid(model: torch.nn.Module) -> float:
        images = sampler.sample(model, num_images=args.fid_samples, batch_size=250, seed=args.seed)
        return bench.fid(images)

    # data-free inputs: the DKDM pool of the teacher's own generations (every run starts from the same snapshot)
    inputs = bench.inputs
    pool_seconds = bench.pool_seconds
    batches = inputs.batches

    space = load_search_space(args.space)
    space.validate_for(unet)
    supernets = build_supernets(unet, space)
    start = time.perf_counter()
    train_supernets(
        unet,
        supernets,
        batches(args.seed + 1),
        iterations=args.supernet_iterations,
        batch_size=args.batch_size,
        lr=args.supernet_lr,
        subnets_per_step=args.subnets_per_step,
        seed=args.seed,
    )
    supernet_seconds = time.perf_counter() - start
    for s in supernets.values():
        s.requires_grad_(False).eval()
    print(f"pool warm-up {pool_seconds:.0f} s, supernets {supernet_seconds:.0f} s", flush=True)

    val_batches = batches(args.seed + 7919)
    data: dict[str, list[Any]] = {n: [] for n in supernets}
    for _ in range(max(1, args.search_samples // args.batch_size)):
        x, t = val_batches(args.batch_size)[:2]
        for name, value in record_teacher_blocks(unet, x, t, list(supernets))[1].items():
            data[name].append(value)

    storage = optuna.storages.InMemoryStorage()
    start = time.perf_counter()
    scores = local_search(supernets, data, storage=storage, study_name="bench", key="bench", max_trials=10_000, seed=args.seed)
    local_seconds = time.perf_counter() - start
    local_evaluations = sum(len(v) for v in scores.values())

    # the smallest tolerance whose student meets the size goal
    tolerances = sorted({s.loss for v in scores.values() for s in v})
    chosen = student = config = None
    tolerance = None
    for tol in tolerances:
        choice = choose_local(scores, tol)
        candidate, candidate_config = assemble_student(unet, supernets, {n: s.choice for n, s in choice.items()})
        cost = count_macs(candidate)
        if cost.macs <= args.max_ratio * teacher_cost.macs and cost.params <= args.max_ratio * teacher_cost.params:
            chosen, student, config, tolerance = choice, candidate, candidate_config, tol
            break
    assert chosen is not None, "no tolerance meets the size goal"
    local_macs = sum(s.macs for s in chosen.values())
    local_loss = sum(s.loss for s in chosen.values()) / len(chosen)
    print(f"tolerance {tolerance:.4f}: {json.dumps({n: s.choice.key for n, s in chosen.items()})}", flush=True)

    rows: list[dict[str, Any]] = []

    def row(name: str, model: torch.nn.Module, **extra: Any) -> dict[str, Any]:
        cost = count_macs(model)
        r = {"variant": name, "params": cost.params, "macs": cost.macs, "fid": fid(model), **extra}
        r["params_ratio"] = cost.params / teacher_cost.params
        r["macs_ratio"] = cost.macs / teacher_cost.macs
        rows.append(r)
        print(json.dumps(r), flush=True)
        return r

    row("teacher", unet)
    row("DiffNAS student, inherited weights, no retraining", student)

    def retrain(model: torch.nn.Module, weight: JointWeight | None, seed: int) -> tuple[torch.nn.Module, float]:
        model = copy.deepcopy(model).requires_grad_(True)
        loss = JointLoss(unet, weight, args.retrain_iterations) if weight is not None else None
        kwargs = {"loss": loss} if loss is not None else {}
        result = fit(
            model,
            batches(seed),
            iterations=args.retrain_iterations,
            batch_size=args.batch_size,
            lr=args.lr,
            ema_decay=args.ema_decay,
            **kwargs,
        )
        return result.model.requires_grad_(False).eval(), result.seconds

    dynamic, seconds = retrain(student, JointWeight("linear", 1.0, 0.0), args.seed + 2)
    row("DiffNAS student, dynamic joint loss (w 1 -> 0)", dynamic, train_seconds=seconds, search_seconds=supernet_seconds + local_seconds)
    static, seconds = retrain(student, JointWeight("static", args.static_w), args.seed + 2)
    row(f"DiffNAS student, static joint loss (w = {args.static_w})", static, train_seconds=seconds)
    output_only, seconds = retrain(student, JointWeight("static", 0.0), args.seed + 2)
    row("DiffNAS student, output loss only (w = 0)", output_only, train_seconds=seconds)

    pruned, ratio = torch_pruning_peer(unet, count_macs(student).macs, args.prune_ratios)
    row(f"Torch-Pruning L2 magnitude, ratio {ratio}, no fine-tuning", pruned)
    tuned, seconds = retrain(pruned, None, args.seed + 2)
    row(f"Torch-Pruning L2 magnitude, ratio {ratio}, fine-tuned", tuned, train_seconds=seconds)

    # local against global search on the same supernets and validation data
    start = time.perf_counter()
    global_scores = global_search(
        supernets, data, storage=storage, study_name="bench", key="bench", n_trials=args.global_trials, seed=args.seed
    )
    global_seconds = time.perf_counter() - start
    reached = next((g for g in global_scores if g.loss <= local_loss and g.macs <= local_macs), None)
    search = {
        "local": {"evaluations": local_evaluations, "seconds": local_seconds, "mean_block_loss": local_loss, "block_macs": local_macs},
        "global": {
            "trials": len(global_scores),
            "evaluations": len(global_scores) * len(supernets),
            "seconds": global_seconds,
            "reached_at_trial": None if reached is None else reached.number + 1,
            "reached_evaluations": None if reached is None else (reached.number + 1) * len(supernets),
            "reached_seconds": None if reached is None else reached.seconds,
            "best_loss_at_or_below_local_macs": min((g.loss for g in global_scores if g.macs <= local_macs), default=None),
        },
    }
    print(json.dumps(search), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "search": search, "tolerance": tolerance, "config": config, "args": vars(args)}, f, indent=1)


if __name__ == "__main__":
    main()
