"""FID at COCO-30K's sample count on the digits teacher: seconds and peak memory against the count.

Each count runs in a process of its own (so that its peak resident set is its own): the digits
teacher samples ``N`` images with DDIM (``--steps``), the evaluator reduces them batch by batch to
the feature statistics FID needs (the digits feature extractor, the shipped reference), and the
process prints the FID, the seconds and its peak resident set (``ru_maxrss``). Memory that grew
with the images would show as a peak that grows with ``N``.

    python experiments/fid_at_scale.py --samples 1000 30000 --steps 10
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from dataclasses import replace


def one(samples: int, steps: int, batch: int) -> dict[str, float]:
    import torch

    from automl_diff.bench.presets import PRESETS
    from automl_diff.evaluation import Evaluator
    from automl_diff.models.loading import load_teacher

    torch.set_num_threads(2)
    preset = PRESETS["digits"]
    teacher = load_teacher(preset.teacher, device="cpu")
    e = preset.evaluation
    evaluation = replace(e, sampling=replace(e.sampling, steps=steps), fid_samples=samples, fid_batch_size=batch, seed=1)
    evaluator = Evaluator(evaluation, teacher, device="cpu")
    _ = evaluator.reference  # the reference statistics, cached on disk after their first computation
    begin = time.perf_counter()
    fid = evaluator.fid(teacher.unet)
    seconds = time.perf_counter() - begin
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kibibytes
    return {"samples": samples, "steps": steps, "fid": fid, "seconds": seconds, "peak_rss_bytes": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, nargs="+", default=[1000, 30000])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=250, help="images per sampling batch")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(one(args.child, args.steps, args.batch)))
        return
    print(f"digits teacher, DDIM {args.steps} steps, sampling batches of {args.batch}, noise seed 1, digits features\n")
    print("| samples | FID | seconds | peak resident set |")
    print("|---|---|---|---|")
    for n in args.samples:
        command = [sys.executable, __file__, "--child", str(n), "--steps", str(args.steps), "--batch", str(args.batch)]
        r = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        print(f"| {n} | {r['fid']:.3f} | {r['seconds']:.0f} | {r['peak_rss_bytes'] / 2**30:.2f} GiB |", flush=True)


if __name__ == "__main__":
    main()
