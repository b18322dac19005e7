"""Intervals for the figures that decide a verdict: FID and KID of generated samples, paired
comparisons of models sampled from the same noise, and the spread of repeated timings.

FID's sampling error comes from the generated images (the reference is a whole dataset, fixed).
Two estimates are offered, for two uses:

- *Independent sample sets* (:func:`across_sets`, :func:`paired_across_sets`), what a benchmark
  uses: FID is computed on ``k`` sets of ``n`` samples, each from its own noise seed; the figure is
  their mean and its 95% interval Student's t on their spread (``k - 1`` degrees of freedom).
  Models sampled from the same seeds are compared *paired*, set by set: the mean of the per-set
  differences, and the geometric mean of the per-set ratios (a t-interval on their logs). The
  spread across seeds is what a rerun on other noise would see, so these intervals cover it by
  construction, at ``k`` times the sampling cost.
- *Half-sampling* (:func:`fid_interval`), for one FID of one sample set (a study's
  ``fid.interval``): FID is recomputed on ``splits`` random halves of the ``N`` samples (drawn
  without replacement, so no image appears twice), and their standard deviation is the standard
  error at ``N``: a half of ``N/2`` samples drawn from the ``N`` deviates from the full set's value
  by ``Var(N/2) - Var(N) = Var(N)`` where the variance falls as ``1/N`` (the finite-population
  correction of a half-sample). The interval is ``FID +- 1.96 SE``. Where FID is dominated by its
  small-sample bias (near the real-data floor) the halves vary more than that and the interval
  errs wide. It describes one model's FID; two models' halves share their noise, so it is not
  offered for comparisons. A bootstrap with replacement is not used: duplicated images distort
  the feature covariance and inflated FID's spread threefold (BENCHMARKS.md has the check).

KID is unbiased; it is reported with its standard deviation over random subsets (torch-fidelity's
estimator).
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "Z95",
    "FrechetReference",
    "Interval",
    "Kid",
    "Spread",
    "across_sets",
    "fid_interval",
    "frechet_reference",
    "half_sample_fids",
    "kid",
    "paired_across_sets",
    "proportion_interval",
    "spread",
    "t95",
    "verdict",
]

#: Two-sided 95% normal quantile.
Z95 = 1.959964
#: Random halves of a FID's samples.
SPLITS = 100


@dataclass(frozen=True)
class Interval:
    """A point estimate and its 95% interval (``low <= value <= high``)."""

    value: float
    low: float
    high: float

    def unfavourable(self, *, lower_is_better: bool = True) -> float:
        """The end a goal is judged at: the high end where lower is better."""
        return self.high if lower_is_better else self.low

    def to_dict(self) -> dict[str, float]:
        return {"value": self.value, "low": self.low, "high": self.high}

    def __str__(self) -> str:
        return f"{self.value:.3g} [{self.low:.3g}, {self.high:.3g}]"


@dataclass(frozen=True)
class Spread:
    """The median and the quartiles of repeated measurements (timed rounds)."""

    median: float
    q1: float
    q3: float

    def to_dict(self) -> dict[str, float]:
        return {"median": self.median, "q1": self.q1, "q3": self.q3}

    def __str__(self) -> str:
        return f"{self.median:.3g} (IQR {self.q1:.3g}-{self.q3:.3g})"


def spread(values: Sequence[float]) -> Spread:
    """Median and quartiles of ``values`` (``statistics.quantiles``, inclusive method)."""
    values = [float(v) for v in values]
    if len(values) == 1:
        return Spread(values[0], values[0], values[0])
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return Spread(median, q1, q3)


class FrechetReference:
    """FID against one reference for many sample sets: its mean, trace and ``sqrt(sigma)`` are
    computed once. ``tr sqrt(S1 S2)`` is the sum of the square roots of the eigenvalues of the symmetric
    ``sqrt(S2) S1 sqrt(S2)``: pytorch-fid's value, without a matrix square root per sample set."""

    def __init__(self, mu: np.ndarray, sigma: np.ndarray) -> None:
        from scipy import linalg

        self.mu = np.asarray(mu, dtype=np.float64)
        sigma = np.asarray(sigma, dtype=np.float64)
        self.trace = float(np.trace(sigma))
        with warnings.catch_warnings():  # dead features make sigma singular; its root is still right
            warnings.simplefilter("ignore", linalg.LinAlgWarning)
            root = linalg.sqrtm(sigma)
        root = np.real(root)
        self.root = (root + root.T) / 2

    def fid(self, features: np.ndarray) -> float:
        sigma = np.cov(features, rowvar=False)
        eig = np.linalg.eigvalsh(self.root @ sigma @ self.root)
        diff = features.mean(axis=0) - self.mu
        return float(diff @ diff + np.trace(sigma) + self.trace - 2 * np.sqrt(np.clip(eig, 0, None)).sum())


_recent: list[tuple[np.ndarray, np.ndarray, FrechetReference]] = []


def frechet_reference(mu: np.ndarray, sigma: np.ndarray) -> FrechetReference:
    """The :class:`FrechetReference` of ``(mu, sigma)``, built once for the same two arrays (a
    study or a benchmark passes its one reference to every call; its square root costs seconds
    for 2048-d Inception features)."""
    for m, s, reference in _recent:
        if m is mu and s is sigma:
            return reference
    reference = FrechetReference(mu, sigma)
    _recent[:] = [(mu, sigma, reference)]
    return reference


def _halves(n: int, splits: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.permutation(n)[: n // 2] for _ in range(splits)]


def half_sample_fids(features: np.ndarray, mu: np.ndarray, sigma: np.ndarray, *, splits: int = SPLITS, seed: int = 0) -> np.ndarray:
    """FID of ``splits`` random halves of the feature rows against ``(mu, sigma)``."""
    reference = frechet_reference(mu, sigma)
    return np.array([reference.fid(features[idx]) for idx in _halves(len(features), splits, seed)])


def fid_interval(point: float, features: np.ndarray, mu: np.ndarray, sigma: np.ndarray, *, splits: int = SPLITS, seed: int = 0) -> Interval:
    """The 95% interval of a FID ``point`` computed on ``features`` against ``(mu, sigma)``."""
    se = float(np.std(half_sample_fids(features, mu, sigma, splits=splits, seed=seed), ddof=1))
    return Interval(point, point - Z95 * se, point + Z95 * se)


def t95(sets: int) -> float:
    """The two-sided 95% quantile of Student's t with ``sets - 1`` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(0.975, sets - 1))


def across_sets(values: Sequence[float]) -> Interval:
    """The mean of ``values``, one per independent sample set, with its 95% t-interval.

    Raises:
        ValueError: fewer than 2 sets (no spread to estimate).
    """
    x = np.asarray(values, dtype=np.float64)
    if len(x) < 2:
        raise ValueError("an interval across sample sets needs at least 2 sets")
    mean = float(x.mean())
    half = t95(len(x)) * float(x.std(ddof=1)) / math.sqrt(len(x))
    return Interval(mean, mean - half, mean + half)


def paired_across_sets(a: Sequence[float], b: Sequence[float]) -> tuple[Interval, Interval]:
    """``a - b`` and ``a / b`` with their 95% intervals, for two models' FIDs on the same sample
    sets (set ``i`` of both starts from the same noise): the mean per-set difference with its
    t-interval, and the geometric mean per-set ratio with the t-interval of the log ratios.

    Raises:
        ValueError: the models have different numbers of sets, or fewer than 2.
    """
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(x) != len(y):
        raise ValueError("paired models need the same sample sets")
    difference = across_sets(x - y)
    with np.errstate(divide="ignore", invalid="ignore"):  # a non-positive FID has no ratio: nan
        log_ratio = across_sets(np.log(x / y))
    return difference, Interval(math.exp(log_ratio.value), math.exp(log_ratio.low), math.exp(log_ratio.high))


def proportion_interval(successes: int, trials: int) -> Interval:
    """``successes / trials`` with Wilson's 95% score interval (within [0, 1], sound near 0 and 1)."""
    if trials <= 0:
        raise ValueError("a proportion needs at least one trial")
    p = successes / trials
    z2 = Z95**2
    centre = (p + z2 / (2 * trials)) / (1 + z2 / trials)
    half = Z95 * math.sqrt(p * (1 - p) / trials + z2 / (4 * trials**2)) / (1 + z2 / trials)
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half))


def verdict(difference: Interval, *, lower_is_better: bool = True) -> str:
    """``better``, ``worse`` or ``no difference``: whether the 95% interval of ``model - other``
    lies wholly on one side of zero."""
    if difference.high < 0:
        return "better" if lower_is_better else "worse"
    if difference.low > 0:
        return "worse" if lower_is_better else "better"
    return "no difference"


@dataclass(frozen=True)
class Kid:
    """KID: the mean over random subsets and its standard deviation over them (not an interval)."""

    mean: float
    std: float

    def to_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "std": self.std}

    def __str__(self) -> str:
        return f"{self.mean:.3g} +- {self.std:.2g}"


def kid(features: np.ndarray, reference: np.ndarray, *, subsets: int = 100, seed: int = 0) -> Kid:
    """KID (unbiased polynomial-kernel MMD, torch-fidelity's) of ``features`` against the reference
    dataset's features, over ``subsets`` random subsets of half the smaller set each, so both
    the generated images and the reference vary between subsets."""
    import torch
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    out = kid_features_to_metric(
        torch.as_tensor(features),
        torch.as_tensor(reference),
        kid_subsets=subsets,
        kid_subset_size=max(2, min(len(features), len(reference)) // 2),
        rng_seed=seed,
        verbose=False,
        kid_kernel="poly",
        kid_kernel_poly_degree=3,
        kid_kernel_poly_gamma=None,
        kid_kernel_poly_coef0=1,
    )
    return Kid(out[KEY_METRIC_KID_MEAN], out[KEY_METRIC_KID_STD])
