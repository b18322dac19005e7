"""Do FID's intervals hold across noise seeds for a student, alone and paired with the teacher?

Builds the ``digits`` benchmark's Torch-Pruning peer (ratio 0.25, fine-tuned on the data-free pool
as the benchmark does; deterministic), then for each noise seed samples ``fid_samples`` images of
the teacher and of the student from the same noise and prints both FIDs with their half-sample
95% intervals and the paired ratio student / teacher with its interval. One model, so every
seed's interval should cover what the other seeds see.

    python experiments/paired_fid_check.py --seeds 0 1 2 3 4 5 6 7
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace

import torch

from automl_diff.bench.peers import torch_pruning_peer
from automl_diff.bench.presets import PRESETS
from automl_diff.bench.session import Bench
from automl_diff.methods.training import fit
from automl_diff.metrics.fid import fid_from_features
from automl_diff.metrics.intervals import fid_interval, paired_fid
from automl_diff.sampling import sample_images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(8)))
    parser.add_argument("--ratio", type=float, default=0.25, help="Torch-Pruning ratio (the benchmark's peer)")
    args = parser.parse_args()

    p = replace(PRESETS["digits"], device="cpu")
    bench = Bench(p, log=lambda line: print(line, file=sys.stderr))
    torch.manual_seed(p.seed)
    start = time.perf_counter()
    pruned, ratio = torch_pruning_peer(bench.teacher.unet, 0, [args.ratio], log=lambda line: print(line, file=sys.stderr))
    batches = bench.inputs.batches(p.seed + 2)
    budget = {"iterations": p.retrain_iterations, "batch_size": p.batch_size, "lr": p.lr, "ema_decay": p.ema_decay}
    student = fit(pruned.requires_grad_(True), batches, **budget).model.requires_grad_(False).eval()
    print(f"{bench.banner}; Torch-Pruning ratio {ratio}, fine-tuned {p.retrain_iterations} steps in {time.perf_counter() - start:.0f} s\n")
    print("| noise seed | teacher FID [95%] | student FID [95%] | student / teacher, paired [95%] |")
    print("|---|---|---|---|")
    reference = bench.evaluator.reference
    for seed in args.seeds:
        features, fids = [], []
        for model in (bench.teacher.unet, student):
            images = sample_images(
                model, bench.scheduler_config, num_images=p.fid_samples, steps=bench.steps, batch_size=p.fid_batch, seed=seed
            )
            features.append(bench.evaluator.extractor(images))
            fids.append(fid_from_features(features[-1], reference))
        _, ratio_interval = paired_fid(features[1], features[0], *reference, points=(fids[1], fids[0]), seed=seed)
        teacher, pruned_fid = (fid_interval(f, x, *reference, seed=seed) for f, x in zip(fids, features, strict=True))
        print(f"| {seed} | {teacher} | {pruned_fid} | {ratio_interval} |", flush=True)


if __name__ == "__main__":
    main()
