"""Quality of the shipped digits models: classifier accuracy, teacher FID, and the real-data floor.

    python bench/digits_zoo.py [--samples 500 1000] [--steps 20 50]

FID depends on the sample count, so the floor (real digits drawn without replacement against the
full dataset's statistics) is printed at the same counts as the teacher's.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from automl_diff.data import load_digits
from automl_diff.metrics import count_macs, fid_from_images, get_extractor, reference_statistics
from automl_diff.models import load_teacher
from automl_diff.sampling import sample_images
from automl_diff.zoo.digits import DIGITS_DIR, load_classifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, nargs="+", default=[500, 1000])
    parser.add_argument("--steps", type=int, nargs="+", default=[20, 50])
    args = parser.parse_args()

    training = json.loads((DIGITS_DIR / "training.json").read_text())
    images, labels = load_digits(resolution=16, with_labels=True)
    generator = torch.Generator().manual_seed(training["seed"])
    order = torch.randperm(len(images), generator=generator)
    held_out = order[int(0.8 * len(images)) :]
    with torch.no_grad():
        accuracy = (load_classifier()(images[held_out]).argmax(1) == labels[held_out]).float().mean().item()
    teacher = load_teacher("digits")
    cost = count_macs(teacher.unet)
    extractor = get_extractor("digits")
    reference = reference_statistics("digits", extractor, resolution=16, channels=1)

    print(f"classifier: held-out accuracy {accuracy:.4f} ({len(held_out)} images), trained in {training['classifier_seconds']:.0f} s")
    print(f"teacher: {cost.params / 1e6:.3f}M params, {cost.macs / 1e6:.1f}M MACs per call, "
          f"{training['teacher_steps']} steps trained in {training['teacher_seconds'] / 60:.1f} min\n")
    print("| images | real-digits floor | " + " | ".join(f"teacher, {s} DDIM steps" for s in args.steps) + " |")
    print("|---" * (2 + len(args.steps)) + "|")
    for n in args.samples:
        floor = fid_from_images(images[torch.randperm(len(images), generator=generator)[: min(n, len(images))]], reference, extractor)
        cells = []
        for steps in args.steps:
            start = time.perf_counter()
            fake = sample_images(teacher.unet, teacher.scheduler_config, num_images=n, steps=steps, seed=0)
            cells.append(f"{fid_from_images(fake, reference, extractor):.2f} ({time.perf_counter() - start:.0f} s)")
        print(f"| {n} | {floor:.2f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
