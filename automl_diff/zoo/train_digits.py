"""Retrain the shipped digits teacher and classifier with fixed seeds.

Usage::

    python -m automl_diff.zoo.train_digits --out automl_diff/zoo/digits [--seed 0] [--teacher-steps 6000]

Writes ``classifier.safetensors`` and a diffusers pipeline folder (``model_index.json``,
``unet/``, ``scheduler/``) and prints the training time and classifier accuracy.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m automl_diff.zoo.train_digits", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--teacher-steps", type=int, default=6000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--classifier-epochs", type=int, default=30)
    parser.add_argument("--skip-teacher", action="store_true", help="retrain the classifier only")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)

    from diffusers import DDPMPipeline
    from safetensors.torch import save_file

    from automl_diff.zoo.digits import train_classifier, train_teacher

    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, float | int] = {"seed": args.seed}

    clf = train_classifier(seed=args.seed, epochs=args.classifier_epochs)
    save_file({k: v.contiguous() for k, v in clf.model.state_dict().items()}, str(args.out / "classifier.safetensors"))
    summary.update(classifier_accuracy=clf.accuracy, classifier_seconds=clf.seconds)
    print(f"classifier: held-out accuracy {clf.accuracy:.4f}, {clf.seconds:.1f} s", flush=True)

    if not args.skip_teacher:
        bar = tqdm(total=args.teacher_steps, desc="teacher", unit="step", file=sys.stderr, mininterval=5)

        def progress(step: int, loss: float) -> None:
            bar.update(1)
            if step % 100 == 0:
                bar.set_postfix(loss=f"{loss:.4f}")

        result = train_teacher(seed=args.seed, steps=args.teacher_steps, batch_size=args.batch_size, progress=progress)
        bar.close()
        DDPMPipeline(unet=result.unet, scheduler=result.scheduler).save_pretrained(args.out, safe_serialization=True)
        summary.update(teacher_seconds=result.seconds, teacher_steps=args.teacher_steps, teacher_final_loss=result.final_loss)
        print(f"teacher: {args.teacher_steps} steps, {result.seconds:.1f} s, last loss {result.final_loss:.4f}", flush=True)
    (args.out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
