"""What backpropagating DiP-GO's consistency loss through a whole trajectory costs: peak memory and
seconds per pruner iteration, with gradient checkpointing per step against full backpropagation.

Each measurement runs :func:`~automl_diff.methods.dipgo.optimise.optimise_pruner` in a fresh
process (so peaks do not mix) and reports the peak resident memory above what the process held
before the pruner started (sampled every 5 ms while it runs: the reference trajectories, then the
iterations) and the median seconds of its iterations. Models:

* ``digits-t2i``: the shipped teacher as ``studies/dipgo_digits_t2i.yaml`` trains it (layer units,
  guided at 1.5, 4 trajectories per iteration);
* ``sd15``: SD-1.5's UNet architecture built from its config (random weights: time and memory do
  not depend on them) at 32x32 latents, bfloat16, batch 1, block units, conditioned on random
  77x768 text embeddings (one UNet row per step).

    python experiments/dipgo_backprop_memory.py --model digits-t2i --steps 50 --iterations 3
    python experiments/dipgo_backprop_memory.py --model sd15 --steps 50 --iterations 1 --full-steps 2 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time


def _rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _measure(model: str, steps: int, checkpoint: bool, iterations: int) -> dict:
    """One pruner run in this process: peak memory above the start, seconds per iteration."""
    import torch

    from automl_diff.config.options import DiPGOOptions
    from automl_diff.gating import prunable_units, unit_costs
    from automl_diff.methods.dipgo.optimise import optimise_pruner
    from automl_diff.models.loading import load_teacher
    from automl_diff.sampling import Prompts, Sampler

    torch.manual_seed(0)
    if model == "sd15":
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_config({"cross_attention_dim": 768, "sample_size": 32}).to(torch.bfloat16)
        scheduler = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
        scheduler.update(clip_sample=False, set_alpha_to_one=False, steps_offset=1)
        units, batch = tuple(prunable_units(unet, "block")), 1
        context = torch.randn(batch, 77, 768, dtype=torch.bfloat16)
        sampler = Sampler(scheduler, steps=steps, prompts=Prompts(context, torch.zeros_like(context[:1]), guidance_scale=1.0))
        text = 77
    else:
        teacher = load_teacher("digits-t2i")
        unet = teacher.unet
        units, batch = tuple(prunable_units(unet, "layer")), 4
        prompts = teacher.text.prompts(["a handwritten seven", "the digit 2", "a three", "a handwritten 9"], guidance_scale=1.5)
        sampler = teacher.sampler(steps=steps, prompts=prompts)
        text = teacher.text.tokenizer.model_max_length
    unet.requires_grad_(False)
    costs = unit_costs(unet, units, text_length=text)
    base, peak, running = _rss(), [0], [True]

    def watch() -> None:
        while running[0]:
            peak[0] = max(peak[0], _rss())
            time.sleep(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        result = optimise_pruner(
            unet,
            sampler,
            units=units,
            costs=costs,
            options=DiPGOOptions(target_macs_ratio=0.25, reference_images=batch, checkpoint=checkpoint),
            iterations=iterations,
            batch_size=batch,
            lr=0.01,
        )
    finally:
        running[0] = False
        watcher.join()
    seconds = [h["seconds"] for h in result.history]
    return {"peak_bytes": peak[0] - base, "seconds": statistics.median(seconds), "iterations": len(seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("digits-t2i", "sd15"), default="digits-t2i")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--full-steps", type=int, nargs="*", default=None, help="full backpropagation at these steps (default: --steps)")
    parser.add_argument("--child", nargs=3, metavar=("STEPS", "CHECKPOINT", "ITERATIONS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        steps, checkpoint, iterations = int(args.child[0]), args.child[1] == "1", int(args.child[2])
        print(json.dumps(_measure(args.model, steps, checkpoint, iterations)))
        return
    runs = [(args.steps, True)] + [(s, False) for s in (args.full_steps if args.full_steps is not None else [args.steps])]
    print(f"{args.model}: one pruner iteration, {args.iterations} iteration(s) per run, torch {_torch_version()}, {os.cpu_count()} CPUs\n")
    print("| backpropagation | steps | peak memory above the start | seconds per iteration (median) |")
    print("|---|---|---|---|")
    for steps, checkpoint in runs:
        command = [sys.executable, __file__, "--model", args.model, "--child", str(steps), str(int(checkpoint)), str(args.iterations)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"| {'checkpointed per step' if checkpoint else 'full'} | {steps} | failed: {done.stderr.strip().splitlines()[-1]} | |")
            continue
        row = json.loads(done.stdout.strip().splitlines()[-1])
        how = "checkpointed per step" if checkpoint else "full"
        print(f"| {how} | {steps} | {row['peak_bytes'] / 2**30:.2f} GiB | {row['seconds']:.2f} s |", flush=True)


def _torch_version() -> str:
    import torch

    return torch.__version__


if __name__ == "__main__":
    main()
