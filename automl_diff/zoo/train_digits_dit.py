"""Retrain the shipped ``digits-dit`` class-conditional transformer teacher with fixed seeds.

Usage::

    python -m automl_diff.zoo.train_digits_dit --out automl_diff/zoo/digits_dit [--seed 0]

Trains the transformer (:mod:`automl_diff.zoo.digits_dit`) on the latents of the shipped
``digits-t2i`` teacher's autoencoder, which it reuses as it is, and writes a ``DiTPipeline``
folder (safetensors only) with ``training.json`` (the recipe, the time and the last loss).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m automl_diff.zoo.train_digits_dit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=8000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)

    from diffusers import AutoencoderKL

    from automl_diff.zoo.digits_dit import GUIDANCE_SCALE, TRANSFORMER_CONFIG, save_dit_pipeline, train_dit
    from automl_diff.zoo.digits_t2i import DIGITS_T2I_DIR
    from automl_diff.zoo.text_to_image import progress_bar

    if args.threads:
        torch.set_num_threads(args.threads)
    vae = AutoencoderKL.from_pretrained(str(DIGITS_T2I_DIR / "vae"), use_safetensors=True).requires_grad_(False)
    args.out.mkdir(parents=True, exist_ok=True)
    bar, progress = progress_bar(args.steps, "transformer")
    result = train_dit(vae, seed=args.seed, steps=args.steps, batch_size=args.batch_size, progress=progress)
    bar.close()
    print(f"transformer: {args.steps} steps, {result.seconds:.1f} s, last loss {result.final_loss:.4f}", flush=True)
    save_dit_pipeline(args.out, vae, result.transformer)
    summary = {
        "seed": args.seed,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seconds": round(result.seconds, 1),
        "final_loss": result.final_loss,
        "class_dropout": 0.1,
        "transformer": TRANSFORMER_CONFIG,
        "vae": "the digits-t2i teacher's",
        "guidance_scale": GUIDANCE_SCALE,
    }
    (args.out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
