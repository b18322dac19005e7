"""The shipped ``shapes-t2i`` teacher's quality, and whether its evaluation resolves.

For each guidance scale, sets of ``--samples`` images (one noise seed per set, ``--seeds``) of the
480 evaluation scenes of ``studies/prompts/shapes_eval.txt`` (cycled), DDIM with ``--steps``
steps: FID against the 10,000 images of the ``shapes`` dataset (the shapes classifier's features),
the mean over the sets with its t-interval, and prompt accuracy (every attribute right) over all
sets' images with Wilson's interval. Beside them:

- the real-data floor: sets of the same size drawn from other seeds of the dataset's distribution
  (independent images, never the reference's own), scored against the same reference;
- how well a paired comparison resolves: the first scale's teacher against itself at
  ``--coarse-steps`` steps, set by set (same noise), as the geometric mean of the per-set FID
  ratios with its t-interval, whose half-width is what a bench verdict on this evaluation can
  resolve.

Choose the guidance on seed 0 (``--seeds 0``); judge on held-out seeds (``--seeds 1 2 3 4 5``).

    python experiments/shapes_t2i_quality.py --seeds 0 --samples 480 --guidance 1.5 2 3
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from automl_diff.data import read_prompts
from automl_diff.metrics.alignment import prompt_accuracy, prompt_labels
from automl_diff.metrics.fid import fid_from_features, get_extractor, reference_set
from automl_diff.metrics.intervals import across_sets, paired_across_sets
from automl_diff.models.loading import load_teacher
from automl_diff.zoo import JUDGES
from automl_diff.zoo.shapes import draw_scenes, render

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--samples", type=int, default=480)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--coarse-steps", type=int, default=0, help="0: no paired comparison")
    parser.add_argument("--guidance", type=float, nargs="+", default=[2.0])
    parser.add_argument("--batch-size", type=int, default=240)
    args = parser.parse_args()

    extractor = get_extractor("shapes")
    reference = reference_set("shapes", extractor, resolution=64, channels=3)
    prompts = read_prompts(ROOT / "studies" / "prompts" / "shapes_eval.txt")
    judge = JUDGES["shapes"]
    scenes = prompt_labels(prompts, judge)
    teacher = load_teacher("shapes-t2i")
    print(f"shapes-t2i, {args.steps} DDIM steps, sets of {args.samples} images, seeds {args.seeds}\n")
    print("| model | guidance | steps | FID [95%] | prompt accuracy [95%] | seconds |")
    print("|---|---|---|---|---|---|")

    def measure(scale: float, steps: int) -> list[float]:
        start = time.perf_counter()
        conditioning = teacher.text.prompts(prompts, guidance_scale=scale, images_per_prompt=1)
        fids, hits = [], []
        for seed in args.seeds:
            batch = teacher.sampler(steps=steps, prompts=conditioning).sample(
                teacher.unet, num_images=args.samples, batch_size=args.batch_size, seed=seed
            )
            fids.append(fid_from_features(extractor(batch), reference.statistics))
            hits.append(batch)
        wanted = [scenes[conditioning.prompt_of(i)] for i in range(args.samples)] * len(args.seeds)
        accuracy = prompt_accuracy(torch.cat(hits), wanted, judge)
        fid = across_sets(fids) if len(fids) > 1 else f"{fids[0]:.3g}"
        print(f"| shapes-t2i | {scale:g} | {steps} | {fid} | {accuracy} | {time.perf_counter() - start:.0f} |", flush=True)
        return fids

    measured = [measure(scale, args.steps) for scale in args.guidance]
    first = measured[0]
    floor = [
        fid_from_features(extractor(render(draw_scenes(args.samples, seed=10_000 + seed))), reference.statistics) for seed in args.seeds
    ]
    print(f"| real scenes (other seeds) | - | - | {across_sets(floor) if len(floor) > 1 else f'{floor[0]:.3g}'} | - | - |")
    if args.coarse_steps and len(args.seeds) > 1:
        coarse = measure(args.guidance[0], args.coarse_steps)
        difference, ratio = paired_across_sets(coarse, first)
        print(f"\n{args.coarse_steps} against {args.steps} steps, paired: difference {difference}, ratio {ratio}")


if __name__ == "__main__":
    main()
