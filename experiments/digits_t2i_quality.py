"""The shipped ``digits-t2i`` teacher's quality at the default guidance (and without guidance).

For each guidance scale, ``--sets`` independent sets of ``--samples`` images (noise seeds 1, 2, ...)
of the 20 evaluation prompts of ``studies/prompts/digits_eval.txt`` (25 images per prompt), DDIM
with ``--steps`` steps: FID against all 1797 digits (the digits classifier's features), the mean
over the sets with its t-interval, and prompt accuracy (the classifier reads the prompted digit)
over all sets' images with Wilson's interval. The real-digits floor at the same count comes with
it, and the unconditional ``digits`` teacher for scale.

    python experiments/digits_t2i_quality.py --sets 5 --samples 500 --steps 50 --guidance 1 3
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from automl_diff.data import read_prompts
from automl_diff.metrics.alignment import prompt_accuracy, prompt_labels
from automl_diff.metrics.fid import fid_from_features, get_extractor, reference_set
from automl_diff.metrics.intervals import across_sets
from automl_diff.models.loading import load_teacher
from automl_diff.zoo import JUDGES

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", type=int, default=5)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0])
    args = parser.parse_args()

    extractor = get_extractor("digits")
    reference = reference_set("digits", extractor, resolution=16, channels=1)
    prompts = read_prompts(ROOT / "studies" / "prompts" / "digits_eval.txt")
    per_prompt = args.samples // len(prompts)
    judge = JUDGES["digits"]
    digits = prompt_labels(prompts, judge)
    teacher = load_teacher("digits-t2i")
    text = teacher.text
    seeds = range(1, args.sets + 1)
    print(f"digits-t2i, {args.steps} DDIM steps, {args.sets} sets of {args.samples} images ({len(prompts)} prompts x {per_prompt})\n")
    print("| model | guidance | FID [95%] | prompt accuracy [95%] | seconds |")
    print("|---|---|---|---|---|")
    for scale in args.guidance:
        start = time.perf_counter()
        conditioning = text.prompts(prompts, guidance_scale=scale, images_per_prompt=per_prompt)
        fids, images = [], []
        for seed in seeds:
            batch = teacher.sampler(steps=args.steps, prompts=conditioning).sample(
                teacher.unet, num_images=args.samples, batch_size=250, seed=seed
            )
            fids.append(fid_from_features(extractor(batch), reference.statistics))
            images.append(batch)
        wanted = [digits[conditioning.prompt_of(i)] for i in range(args.samples)] * args.sets
        accuracy = prompt_accuracy(torch.cat(images), wanted, judge)
        print(f"| digits-t2i | {scale:g} | {across_sets(fids)} | {accuracy} | {time.perf_counter() - start:.0f} |", flush=True)
    start = time.perf_counter()
    plain = load_teacher("digits")
    fids = [
        fid_from_features(
            extractor(plain.sampler(steps=args.steps).sample(plain.unet, num_images=args.samples, batch_size=250, seed=seed)),
            reference.statistics,
        )
        for seed in seeds
    ]
    print(f"| digits (unconditional) | - | {across_sets(fids)} | - | {time.perf_counter() - start:.0f} |")
    features = reference.features
    floor = [
        fid_from_features(features[np.random.default_rng(seed).permutation(len(features))[: args.samples]], reference.statistics)
        for seed in seeds
    ]
    print(f"| real digits | - | {across_sets(floor)} | - | - |")


if __name__ == "__main__":
    main()
