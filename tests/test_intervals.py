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
        assert difference.value == pytest.approx(student.mean() - teacher.mean())
        assert ratio.value == pytest.approx(math.exp(np.mean(np.log(student / teacher))))
    assert np.mean(covered_ratio) >= 0.93 and np.mean(covered_difference) >= 0.93
    assert np.mean(narrower) > 0.9
    with pytest.raises(ValueError, match="same sample sets"):
        paired_across_sets([1.0, 2.0], [1.0, 2.0, 3.0])


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


def test_half_sample_interval_of_one_fid_covers_an_independent_set():
    """Gaussian features with a known reference: the half-sampling interval of one set's FID
    contains another independent set's FID most of the time (both estimate the same FID)."""
    rng = np.random.default_rng(2)
    dim, n = 8, 400
    mu, sigma = np.zeros(dim), np.eye(dim)
    from automl_diff.metrics.intervals import frechet_reference

    reference = frechet_reference(mu, sigma)
    covered = []
    for k in range(60):
        a = rng.normal(0.3, 1.1, size=(n, dim))
        b = rng.normal(0.3, 1.1, size=(n, dim))
        interval = fid_interval(reference.fid(a), a, mu, sigma, splits=50, seed=k)
        assert interval.low < interval.value < interval.high
        covered.append(interval.low <= reference.fid(b) <= interval.high)
    # two independent sets differ by sqrt(2) standard errors: about 83 in 100 are covered
    assert 0.7 <= np.mean(covered) <= 0.97
