"""The intervals that decide a benchmark's verdicts hold at their stated level on data whose truth
is known, and paired comparisons cancel the noise two models share."""

from __future__ import annotations

import math

import numpy as np
import pytest

from automl_diff.metrics.intervals import Interval, across_sets, fid_interval, paired_across_sets, spread, t95, verdict


def test_t_quantile_matches_known_values():
    assert t95(2) == pytest.approx(12.706, abs=1e-3)
    assert t95(5) == pytest.approx(2.776, abs=1e-3)
    assert t95(1000) == pytest.approx(1.962, abs=1e-3)


def test_interval_across_sets_covers_the_truth_95_times_in_100():
    rng = np.random.default_rng(0)
    draws = rng.normal(3.0, 1.3, size=(4000, 5))
    covered = [(i := across_sets(row)).low <= 3.0 <= i.high for row in draws]
    assert 0.94 <= np.mean(covered) <= 0.96
    # a normal interval (1.96 standard errors) on 5 sets would cover only about 88 times in 100
    normal = [abs(row.mean() - 3.0) <= 1.96 * row.std(ddof=1) / math.sqrt(5) for row in draws]
    assert np.mean(normal) < 0.9
    with pytest.raises(ValueError, match="at least 2"):
        across_sets([3.0])


def test_paired_sets_cancel_shared_noise_and_cover_the_true_ratio():
    rng = np.random.default_rng(1)
    covered_ratio, covered_difference, narrower = [], [], []
    for _ in range(2000):
        shared = rng.normal(0.0, 1.0, size=5)  # what a seed's noise does to both models alike
        teacher = 4.0 + shared + rng.normal(0.0, 0.1, size=5)
        student = 1.2 * (4.0 + shared) + rng.normal(0.0, 0.1, size=5)
        difference, ratio = paired_across_sets(student, teacher)
        covered_ratio.append(ratio.low <= 1.2 <= ratio.high)
        covered_difference.append(difference.low <= 0.8 <= difference.high)
        unpaired = across_sets(student).high - across_sets(student).low + across_sets(teacher).high - across_sets(teacher).low
        narrower.append(difference.high - difference.low < unpaired / 2)
    assert np.mean(covered_ratio) >= 0.93 and np.mean(covered_difference) >= 0.93
    assert np.mean(narrower) > 0.9
    with pytest.raises(ValueError, match="same sample sets"):
        paired_across_sets([1.0, 2.0], [1.0, 2.0, 3.0])


def test_paired_sets_worked_by_hand():
    """Three sets, FIDs 2, 6, 12 against 1, 3, 4. Differences 1, 3, 8: mean 4, standard deviation
    sqrt(13), t(0.975, 2 df) = 4.3027, half-width 4.3027 * sqrt(13 / 3) = 8.957. Ratios 2, 2, 3:
    the mean log ratio 0.8283 with standard deviation 0.2341, half-width 4.3027 * 0.2341 / sqrt(3)
    = 0.5816, so the geometric mean 12 ** (1/3) = 2.289 within exp(0.8283 -+ 0.5816)."""
    difference, ratio = paired_across_sets([2.0, 6.0, 12.0], [1.0, 3.0, 4.0])
    assert (difference.value, difference.low, difference.high) == pytest.approx((4.0, -4.957, 12.957), abs=1e-3)
    assert (ratio.value, ratio.low, ratio.high) == pytest.approx((2.2894, 1.2798, 4.0955), abs=1e-3)


def test_verdict_reads_the_side_of_zero_the_interval_lies_on():
    assert verdict(Interval(-1.0, -2.0, -0.1)) == "better"
    assert verdict(Interval(1.0, 0.1, 2.0)) == "worse"
    assert verdict(Interval(0.5, -0.1, 1.1)) == "no difference"
    assert verdict(Interval(-1.0, -2.0, -0.1), lower_is_better=False) == "worse"
    assert Interval(1.0, 0.5, 2.0).unfavourable() == 2.0 and Interval(1.0, 0.5, 2.0).unfavourable(lower_is_better=False) == 0.5


def test_spread_is_median_and_quartiles():
    s = spread([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s.median, s.q1, s.q3) == (3.0, 2.0, 4.0)
    assert spread([7.0]) == spread([7.0, 7.0])


def test_half_sample_interval_has_the_width_of_fids_real_spread():
    """Gaussian features with a known reference: the half-width of one set's interval, over 1.96,
    matches the standard deviation of FID across independent sets of the same size (measured on
    1000 sets). Halves of n/2 rows spread around the full set's FID as much as full sets of n rows
    spread around the truth; an interval off by sqrt(2) either way fails."""
    rng = np.random.default_rng(2)
    dim, n = 8, 400
    mu, sigma = np.zeros(dim), np.eye(dim)
    from automl_diff.metrics.intervals import Z95, frechet_reference

    reference = frechet_reference(mu, sigma)
    spread_across_sets = np.std([reference.fid(rng.normal(0.3, 1.1, size=(n, dim))) for _ in range(1000)], ddof=1)
    standard_errors = []
    for k in range(100):
        a = rng.normal(0.3, 1.1, size=(n, dim))
        interval = fid_interval(reference.fid(a), a, mu, sigma, splits=50, seed=k)
        assert interval.low < interval.value < interval.high
        standard_errors.append((interval.high - interval.value) / Z95)
    assert 0.85 <= np.mean(standard_errors) / spread_across_sets <= 1.18
