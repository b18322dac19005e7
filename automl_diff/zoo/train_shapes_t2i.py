"""Retrain the shipped ``shapes-t2i`` teacher and the ``shapes`` classifier with fixed seeds.

Usage::

    python -m automl_diff.zoo.train_shapes_t2i --out automl_diff/zoo/shapes_t2i [--seed 0] [--threads 2]

Trains the classifier (the ``shapes`` FID features and prompt judge) on fresh scenes, the
autoencoder on the dataset, then the conditional UNet and the text encoder together on its latents
(:mod:`automl_diff.zoo.shapes_t2i`), and writes a ``StableDiffusionPipeline`` folder (safetensors
only) with ``classifier.safetensors`` and ``training.json`` (the recipe, the times, the
classifier's held-out accuracy per attribute, the autoencoder's error over all pixels and over the
shape's, and the last losses).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m automl_diff.zoo.train_shapes_t2i", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--classifier-steps", type=int, default=2000)
    parser.add_argument("--vae-steps", type=int, default=1200)
    parser.add_argument("--unet-steps", type=int, default=4500)
    parser.add_argument("--dataset-size", type=int, default=None, help="train on N scenes of the dataset's seed (default: the dataset)")
    parser.add_argument("--held-out", type=int, default=4000, help="scenes the classifier's accuracy is measured on")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)

    from safetensors.torch import save_file

    from automl_diff.zoo import shapes
    from automl_diff.zoo.shapes_t2i import GUIDANCE_SCALE, SHAPE_WEIGHT, X0_WEIGHT_CAP, reconstruction_error, train_text_to_image, train_vae
    from automl_diff.zoo.text_to_image import progress_bar, save_pipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    count = args.dataset_size or shapes.DATASET_SIZE
    clf = shapes.train_classifier(seed=args.seed, steps=args.classifier_steps, held_out=args.held_out)
    save_file({k: v.contiguous() for k, v in clf.model.state_dict().items()}, str(args.out / "classifier.safetensors"))
    accuracy = ", ".join(f"{name} {value:.4f}" for name, value in clf.accuracy.items())
    print(f"classifier: {args.classifier_steps} steps, {clf.seconds:.1f} s, held-out accuracy {accuracy}", flush=True)
    bar, progress = progress_bar(args.vae_steps, "autoencoder")
    vae = train_vae(seed=args.seed, steps=args.vae_steps, count=count, progress=progress)
    bar.close()
    overall, shape = reconstruction_error(vae.vae)
    print(
        f"autoencoder: {args.vae_steps} steps, {vae.seconds:.1f} s, reconstruction MSE {overall:.4f}, {shape:.4f} on the shape's pixels",
        flush=True,
    )
    bar, progress = progress_bar(args.unet_steps, "unet + text encoder")
    result = train_text_to_image(vae.vae, seed=args.seed, steps=args.unet_steps, count=count, progress=progress)
    bar.close()
    print(f"unet + text encoder: {args.unet_steps} steps, {result.seconds:.1f} s, last loss {result.final_loss:.4f}", flush=True)
    save_pipeline(args.out, vae.vae, result)
    summary = {
        "seed": args.seed,
        "dataset_size": count,
        "classifier_steps": args.classifier_steps,
        "classifier_seconds": round(clf.seconds, 1),
        "classifier_accuracy": clf.accuracy,
        "vae_steps": args.vae_steps,
        "vae_seconds": round(vae.seconds, 1),
        "vae_shape_weight": SHAPE_WEIGHT,
        "vae_reconstruction_mse": overall,
        "vae_shape_mse": shape,
        "scaling_factor": vae.scaling_factor,
        "unet_steps": args.unet_steps,
        "unet_seconds": round(result.seconds, 1),
        "unet_final_loss": result.final_loss,
        "unet_x0_weight_cap": X0_WEIGHT_CAP,
        "prompt_dropout": 0.1,
        "templates": list(shapes.TEMPLATES),
        "guidance_scale": GUIDANCE_SCALE,
        "total_seconds": round(time.perf_counter() - start, 1),
        "threads": torch.get_num_threads(),
    }
    (args.out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
