"""How well an autoencoder for ``shapes-t2i`` keeps the scenes: reconstruction error over all pixels
and over the shape's pixels alone (the shape covers about 7% of an image, so an average hides it).

Measures a trained ``AutoencoderKL`` folder (``--vae``), or trains one first with the training
command's recipe (``automl_diff.zoo.shapes_t2i.train_vae``: 1200 AdamW steps of batch 32, L1 + MSE,
KL weight 1e-4, seed 0) with the shape's pixels weighted ``--shape-weight`` times the background's
(1: every pixel alike). The shape's pixels are ``automl_diff.zoo.shapes.shape_mask``'s. Error on
the dataset's first 512 images; the first 16 and their reconstructions are written to ``--grid``.

    python experiments/shapes_vae.py --vae automl_diff/zoo/shapes_t2i/vae
    python experiments/shapes_vae.py --shape-weight 1
"""

from __future__ import annotations

import argparse
import time

import torch

from automl_diff.zoo import shapes
from automl_diff.zoo.shapes_t2i import SHAPE_WEIGHT, reconstruction_error, train_vae


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vae", default=None, help="a trained AutoencoderKL folder (default: train one)")
    parser.add_argument("--shape-weight", type=float, default=SHAPE_WEIGHT)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--grid", default=None, help="a PNG of 16 images over their reconstructions")
    args = parser.parse_args()

    start = time.perf_counter()
    if args.vae:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.vae).eval()
    else:
        vae = train_vae(steps=args.steps, shape_weight=args.shape_weight).vae
    overall, shape = reconstruction_error(vae)
    what = args.vae or f"trained here, shape weight {args.shape_weight:g}, {args.steps} steps"
    print(f"{what}: MSE {overall:.4f} over all pixels, {shape:.4f} over the shape's; {time.perf_counter() - start:.0f} s")
    if args.grid:
        from torchvision.utils import save_image

        x = shapes.load_shapes(count=16)
        with torch.no_grad():
            rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        save_image(torch.cat([(x[:16] + 1) / 2, (rec[:16] + 1) / 2]), args.grid, nrow=8, padding=2)


if __name__ == "__main__":
    main()
