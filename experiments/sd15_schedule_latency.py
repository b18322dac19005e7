"""Does a schedule's MACs cut turn into speed on Stable Diffusion 1.5's UNet?

Builds SD-1.5's ``UNet2DConditionModel`` from its config (random weights: speed does not depend on
them), writes a DeepCache-like block schedule (every ``--interval``-th step computes everything,
the steps between compute only the outermost blocks ``down.0`` and ``up.3`` and reuse the rest),
and runs ``profile --schedule`` on it: the scheduled and the full sampler timed side by side
(guided: both halves in one call, random text embeddings of 77 tokens), trajectory MACs counted
over both halves.

    python experiments/sd15_schedule_latency.py --latent 32 --steps 10 --interval 5 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from automl_diff.cli import main as cli
from automl_diff.gating import Schedule, model_fingerprint, prunable_units


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latent", type=int, default=32, help="latent side (64: SD-1.5's 512px images)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--interval", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    from diffusers import UNet2DConditionModel

    with tempfile.TemporaryDirectory() as tmp:
        unet = UNet2DConditionModel.from_config({"cross_attention_dim": 768, "sample_size": args.latent})
        config = {"_class_name": "UNet2DConditionModel", **{k: v for k, v in dict(unet.config).items() if not k.startswith("_")}}
        (Path(tmp) / "config.json").write_text(json.dumps(config))
        units = tuple(prunable_units(unet, "block"))
        gates = tuple(tuple(step % args.interval == 0 or unit in ("down.0", "up.3") for unit in units) for step in range(args.steps))
        Schedule(args.steps, units, gates, model=model_fingerprint(unet)).save(Path(tmp) / "schedule.json")
        del unet
        print(f"SD-1.5 UNet at {args.latent}x{args.latent} latents, {args.steps} DDIM steps, every {args.interval}th step full")
        cli(
            [
                "profile",
                "--model",
                str(Path(tmp) / "config.json"),
                "--schedule",
                str(Path(tmp) / "schedule.json"),
                "--batch-size",
                str(args.batch_size),
                "--repeats",
                str(args.repeats),
                "--text-length",
                "77",
                "--guidance-scale",
                "7.5",
            ]
        )


if __name__ == "__main__":
    main()
