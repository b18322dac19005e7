"""How well an autoencoder for ``shapes-t2i`` keeps the scenes: reconstruction error over all pixels
and over the shape's pixels alone (the shape covers about 7% of an image, so an average hides it).

Measures a trained ``AutoencoderKL`` folder (``--vae``), or trains one first with the training
command's recipe (1200 AdamW steps of batch 32, L1 + MSE, KL weight 1e-4, seed 0) with the shape's
pixels weighted ``--shape-weight`` times the background's (1: the command's own loss). The shape's
pixels are those more than 0.25 away from the scene's background colour in some channel (the
background gradient stays within 0.08). Error on the dataset's first 512 images; the first 16 and
their reconstructions are written to ``--grid``.

    python experiments/shapes_vae.py --vae automl_diff/zoo/shapes_t2i/vae
    python experiments/shapes_vae.py --shape-weight 10
"""

from __future__ import annotations

import argparse
import time

import torch

from automl_diff.zoo import shapes
from automl_diff.zoo.digits import warmup_cosine
from automl_diff.zoo.shapes_t2i import VAE_CONFIG


def _train(images: torch.Tensor, mask: torch.Tensor, shape_weight: float, steps: int) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    vae = AutoencoderKL(**VAE_CONFIG)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps))
    for _ in range(steps):
        idx = torch.randint(0, len(images), (32,), generator=g)
        x, m = images[idx], mask[idx]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
        out = vae.decode(z).sample
        weight = 1 + (shape_weight - 1) * m
        loss = (weight * ((out - x).abs() + (out - x) ** 2)).mean() + 1e-4 * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
    return vae.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vae", default=None, help="a trained AutoencoderKL folder (default: train one)")
    parser.add_argument("--shape-weight", type=float, default=10.0)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--grid", default=None, help="a PNG of 16 images over their reconstructions")
    args = parser.parse_args()

    scenes = shapes.draw_scenes(shapes.DATASET_SIZE, seed=0)
    images = shapes.render(scenes)
    background = (scenes.background * 2 - 1).view(-1, 3, 1, 1)
    mask = ((images - background).abs().amax(1, keepdim=True) > 0.25).float()
    start = time.perf_counter()
    if args.vae:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.vae).eval()
    else:
        vae = _train(images, mask, args.shape_weight, args.steps)
    with torch.no_grad():
        x, m = images[:512], mask[:512]
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        err = (rec - x) ** 2
    shape_mse = (err * m).sum().item() / (m.sum().item() * 3)
    what = args.vae or f"trained here, shape weight {args.shape_weight:g}, {args.steps} steps"
    print(f"{what}: MSE {err.mean().item():.4f} over all pixels, {shape_mse:.4f} over the shape's ({m.mean().item():.1%} of them);")
    print(f"{time.perf_counter() - start:.0f} s")
    if args.grid:
        from torchvision.utils import save_image

        save_image(torch.cat([(x[:16] + 1) / 2, (rec[:16] + 1) / 2]), args.grid, nrow=8, padding=2)


if __name__ == "__main__":
    main()
