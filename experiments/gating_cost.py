"""What a gated sampling step costs on the digits teacher, whatever its schedule computes.

Per batch size: a plain forward pass; a pass in which every unit reuses its cache (the call still
runs: time embedding, ``conv_in``, the hooks returning caches, diffusers' own per-call work): what a
step that computes some unit pays at least; and the DDIM scheduler's step. Then the gating hooks'
own cost: a pass in which every unit computes through its hook against the plain pass. Each figure
is the minimum over ``--repeats`` interleaved calls (the least disturbed run of the same work).

    python experiments/gating_cost.py --batches 1 8 64 --repeats 100
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import replace

import torch

from automl_diff.bench.presets import PRESETS
from automl_diff.bench.session import Bench
from automl_diff.gating import Schedule, apply_schedule, model_fingerprint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--granularity", default="layer", choices=("block", "layer"))
    args = parser.parse_args()

    bench = Bench(replace(PRESETS["digits"], device="cpu"), log=lambda line: print(line, file=sys.stderr))
    unet = bench.teacher.unet
    steps = args.repeats + 2
    every = Schedule.full(unet, steps, args.granularity)
    units = every.units
    off = tuple(tuple(False for _ in units) for _ in range(steps - 1))
    none = Schedule(steps, units, (every.gates[0], *off), model_fingerprint(unet))
    computing, reusing = copy.deepcopy(unet), copy.deepcopy(unet)
    print(f"{bench.banner}; {len(units)} units ({args.granularity}), minimum of {args.repeats} interleaved calls\n")
    print("| batch | plain pass | every unit through its hook | hooks' own cost | every unit reusing its cache | DDIM step |")
    print("|---|---|---|---|---|---|")
    with torch.no_grad(), apply_schedule(computing, every) as on, apply_schedule(reusing, none) as off:
        off.idle_free = False  # time the call itself, not its skipping
        for batch in args.batches:
            ms = {k: v * 1e3 for k, v in _fastest(bench, unet, (computing, on), (reusing, off), batch, args.repeats).items()}
            print(
                f"| {batch} | {ms['plain']:.2f} ms | {ms['hooks']:.2f} ms | {ms['hooks'] - ms['plain']:.2f} ms | "
                f"{ms['cached']:.2f} ms ({ms['cached'] / ms['plain']:.0%}) | {ms['step']:.3f} ms |"
            )


def _fastest(bench: Bench, unet: torch.nn.Module, computing: tuple, reusing: tuple, batch: int, repeats: int) -> dict:
    """The fastest of ``repeats`` interleaved calls of each kind, in seconds; ``computing`` and
    ``reusing`` are a gated copy of the model and its controller."""
    (computing, on), (reusing, off) = computing, reusing
    x = torch.zeros(batch, unet.config.in_channels, 16, 16)
    scheduler = bench.teacher.sampler(steps=repeats + 2).make_scheduler()
    on.reset()
    off.reset()
    reusing(x, torch.tensor([999]))  # step 0 fills the caches
    timestep = iter(range(998, 0, -1))
    calls = {
        "plain": lambda: unet(x, torch.tensor([500])),
        "hooks": lambda: (on.reset(), computing(x, torch.tensor([500]))),
        "cached": lambda: reusing(x, torch.tensor([next(timestep)])),  # each a later step
        "step": lambda: scheduler.step(x, scheduler.timesteps[1], x, eta=0.0),
    }
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


if __name__ == "__main__":
    main()
