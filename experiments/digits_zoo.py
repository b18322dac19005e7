"""Quality of the shipped digits models: classifier accuracy, teacher FID, and the real-data floor.

    python experiments/digits_zoo.py [--samples 500 1000] [--steps 20 50]

FID depends on the sample count, so the floor (real digits drawn without replacement against the
full dataset's statistics) is printed at the same counts as the teacher's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace

import torch

from automl_diff.bench.presets import PRESETS
from automl_diff.bench.session import Bench
from automl_diff.metrics import count_macs
from automl_diff.zoo.digits import DIGITS_DIR, load_classifier, load_digits


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
    # the digits teacher and its FID reference (digits features); the machine banner goes to stderr
    bench = Bench(replace(PRESETS["digits"], device="cpu"), log=lambda line: print(line, file=sys.stderr, flush=True))
    teacher = bench.teacher
    cost = count_macs(teacher.unet)

    print(f"classifier: held-out accuracy {accuracy:.4f} ({len(held_out)} images), trained in {training['classifier_seconds']:.0f} s")
    print(
        f"teacher: {cost.params / 1e6:.3f}M params, {cost.macs / 1e6:.1f}M MACs per call, "
        f"{training['teacher_steps']} steps trained in {training['teacher_seconds'] / 60:.1f} min\n"
    )
    print("| images | real-digits floor | " + " | ".join(f"teacher, {s} DDIM steps" for s in args.steps) + " |")
    print("|---" * (2 + len(args.steps)) + "|")
    for n in args.samples:
        floor = bench.fid(images[torch.randperm(len(images), generator=generator)[: min(n, len(images))]])
        cells = []
        for steps in args.steps:
            start = time.perf_counter()
            fake = teacher.sampler(steps=steps).sample(teacher.unet, num_images=n, seed=0)
            cells.append(f"{bench.fid(fake):.2f} ({time.perf_counter() - start:.0f} s)")
        print(f"| {n} | {floor:.2f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
