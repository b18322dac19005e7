"""How well FID's interval estimates its sampling error, on the digits teacher.

Samples ``--sets`` independent sets of ``--samples`` teacher images (noise seeds 100, 101, ...),
computes each set's FID, and compares the spread of those FIDs (the sampling error the interval
should describe) with two estimates made from one set alone: the half-sample standard error the
package uses (FID on random halves, their standard deviation) and a bootstrap with replacement.

    python experiments/fid_interval_check.py --sets 8 --samples 1000 --steps 20
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from automl_diff.bench.presets import PRESETS
from automl_diff.bench.session import Bench
from automl_diff.metrics.fid import fid_from_features
from automl_diff.metrics.intervals import FrechetReference, half_sample_fids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", type=int, default=8)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cache", default=None, help="keep the sets' features here (.npy) and reuse them when present")
    args = parser.parse_args()

    begin = time.perf_counter()
    bench = Bench(replace(PRESETS["digits"], device="cpu"), log=lambda line: print(line, file=sys.stderr))
    mu, sigma = bench.evaluator.reference
    cache = Path(args.cache) if args.cache else None
    if cache is not None and cache.is_file():
        features = np.load(cache)
    else:
        unet, sampler = bench.teacher.unet, bench.teacher.sampler(steps=args.steps)
        features = np.stack(
            [
                bench.evaluator.extractor(sampler.sample(unet, num_images=args.samples, batch_size=250, seed=100 + k))
                for k in range(args.sets)
            ]
        )
        if cache is not None:
            np.save(cache, features)
    fids = np.array([fid_from_features(f, (mu, sigma)) for f in features])
    reference = FrechetReference(mu, sigma)
    rng = np.random.default_rng(0)
    print(f"teacher, {args.steps} DDIM steps, {len(features)} independent sets of {features.shape[1]} samples")
    print(f"FID per set: {', '.join(f'{f:.2f}' for f in fids)}; mean {fids.mean():.2f}, standard deviation {fids.std(ddof=1):.2f}\n")
    print("| set | FID | half-sample standard error | bootstrap standard error | bootstrap mean |")
    print("|---|---|---|---|---|")
    for k, f in enumerate(features):
        half = np.std(half_sample_fids(f, mu, sigma, seed=k), ddof=1)
        boot = np.array([reference.fid(f[rng.integers(0, len(f), len(f))]) for _ in range(200)])
        print(f"| {k} | {fids[k]:.2f} | {half:.2f} | {boot.std(ddof=1):.2f} | {boot.mean():.2f} |")
    print(f"\n{time.perf_counter() - begin:.0f} s in all")


if __name__ == "__main__":
    main()
