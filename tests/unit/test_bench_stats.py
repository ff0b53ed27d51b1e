"""bench/stats.py: one meaning of p50/p99 and of a median over repeats for every benchmark."""

from __future__ import annotations

import math

import numpy as np

from bench.stats import med, pct, percentiles


def test_pct_interpolates_between_ranks_like_numpy() -> None:
    assert pct([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert pct(np.arange(101, dtype=float), 99) == 99.0
    assert pct([7], 100) == 7.0


def test_no_samples_is_none_not_zero() -> None:
    assert pct([], 99) is None
    assert pct(np.zeros(0), 50) is None
    assert percentiles([], (50, 99)) == {"p50": None, "p99": None, "max": None}
    assert med([]) is None
    assert med([None, math.nan]) is None


def test_percentiles_names_each_quantile_and_the_maximum() -> None:
    assert percentiles([1, 2, 3, 4, 5], (50, 99.9)) == {"p50": 3.0, "p99.9": 4.996, "max": 5.0}


def test_median_over_repeats_skips_runs_that_measured_nothing() -> None:
    assert med([3.0, None, 1.0, math.nan, 2.0]) == 2.0
    assert med([1, 4]) == 2.5
