"""Retrain the shipped ``digits-t2i`` text-to-image teacher with fixed seeds.

Usage::

    python -m automl_diff.zoo.train_digits_t2i --out automl_diff/zoo/digits_t2i [--seed 0]

Trains the autoencoder, then the conditional UNet and the text encoder together on its latents
(:mod:`automl_diff.zoo.digits_t2i`), and writes a ``StableDiffusionPipeline`` folder (safetensors
only) with ``training.json`` (the recipe, the times and the last losses). Its quality (FID and
prompt accuracy at the default guidance) is measured by
``python -m automl_diff.bench --preset digits-t2i --rows teacher``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m automl_diff.zoo.train_digits_t2i", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=1500)
    parser.add_argument("--unet-steps", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)

    from automl_diff.zoo.digits_t2i import GUIDANCE_SCALE, TEMPLATES, train_text_to_image, train_vae
    from automl_diff.zoo.text_to_image import progress_bar, save_pipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    bar, progress = progress_bar(args.vae_steps, "autoencoder")
    vae = train_vae(seed=args.seed, steps=args.vae_steps, batch_size=args.batch_size, progress=progress)
    bar.close()
    print(f"autoencoder: {args.vae_steps} steps, {vae.seconds:.1f} s, reconstruction MSE {vae.reconstruction:.4f}", flush=True)
    bar, progress = progress_bar(args.unet_steps, "unet + text encoder")
    result = train_text_to_image(vae.vae, seed=args.seed, steps=args.unet_steps, batch_size=args.batch_size, progress=progress)
    bar.close()
    print(f"unet + text encoder: {args.unet_steps} steps, {result.seconds:.1f} s, last loss {result.final_loss:.4f}", flush=True)
    save_pipeline(args.out, vae.vae, result)
    summary = {
        "seed": args.seed,
        "vae_steps": args.vae_steps,
        "vae_seconds": round(vae.seconds, 1),
        "vae_reconstruction_mse": vae.reconstruction,
        "scaling_factor": vae.scaling_factor,
        "unet_steps": args.unet_steps,
        "batch_size": args.batch_size,
        "unet_seconds": round(result.seconds, 1),
        "unet_final_loss": result.final_loss,
        "prompt_dropout": 0.1,
        "templates": list(TEMPLATES),
        "guidance_scale": GUIDANCE_SCALE,
    }
    (args.out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
