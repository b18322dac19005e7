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
import math
import sys
import time
from dataclasses import replace

import numpy as np
import torch

from automl_diff.bench.peers import torch_pruning_peer
from automl_diff.bench.presets import PRESETS
from automl_diff.bench.session import Bench
from automl_diff.methods.training import fit
from automl_diff.metrics.fid import fid_from_features
from automl_diff.metrics.intervals import Z95, Interval, fid_interval, frechet_reference


def half_sample_ratio(features_a: np.ndarray, features_b: np.ndarray, mu: np.ndarray, sigma: np.ndarray, *, seed: int) -> Interval:
    """``FID_a / FID_b`` with a 95% interval from the same 100 random halves of both (the log
    ratios' standard deviation): paired half-sampling, checked here against the seeds' spread."""
    reference = frechet_reference(mu, sigma)
    rng = np.random.default_rng(seed)
    halves = [rng.permutation(len(features_a))[: len(features_a) // 2] for _ in range(100)]
    logs = np.log([reference.fid(features_a[i]) / reference.fid(features_b[i]) for i in halves])
    ratio = reference.fid(features_a) / reference.fid(features_b)
    se = float(np.std(logs, ddof=1))
    return Interval(ratio, ratio * math.exp(-Z95 * se), ratio * math.exp(Z95 * se))


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
            images = bench.sampler.sample(model, num_images=p.fid_samples, batch_size=p.fid_batch, seed=seed)
            features.append(bench.evaluator.extractor(images))
            fids.append(fid_from_features(features[-1], reference))
        ratio_interval = half_sample_ratio(features[1], features[0], *reference, seed=seed)
        teacher, pruned_fid = (fid_interval(f, x, *reference, seed=seed) for f, x in zip(fids, features, strict=True))
        print(f"| {seed} | {teacher} | {pruned_fid} | {ratio_interval} |", flush=True)


if __name__ == "__main__":
    main()
