"""Naive baselines on toy series whose right answer is obvious."""

from __future__ import annotations

import numpy as np
import pytest

from training.baselines import last_valid, last_value, rolling_mean, seasonal_naive


def test_last_value_skips_trailing_gaps():
    hist = np.array([[1.0, 2.0, np.nan], [np.nan, np.nan, np.nan], [5.0, 6.0, 7.0]])
    out = last_value(hist, np.array([1, 3]))
    np.testing.assert_array_equal(out[0], [2.0, 2.0])
    assert np.isnan(out[1]).all()
    np.testing.assert_array_equal(out[2], [7.0, 7.0])


def test_seasonal_naive_repeats_yesterday_exactly():
    season = 4
    day = np.array([10.0, 20.0, 30.0, 40.0])
    hist = np.tile(day, 3)[None, :]  # history ends with slot 3 of the day
    out = seasonal_naive(hist, np.arange(1, 9), season=season)
    np.testing.assert_array_equal(out[0], np.tile(day, 2))


def test_seasonal_naive_falls_back_to_last_value_on_a_gap():
    hist = np.array([[1.0, np.nan, 3.0, 4.0, 5.0]])
    out = seasonal_naive(hist, np.array([1, 2]), season=4)
    # h=1 -> index 1 (NaN -> last value 5), h=2 -> index 2 (3.0)
    np.testing.assert_array_equal(out[0], [5.0, 3.0])


def test_rolling_mean_uses_the_last_span_only():
    hist = np.array([[100.0, 1.0, np.nan, 3.0]])
    out = rolling_mean(hist, np.array([1, 2, 3]), span=3)
    np.testing.assert_allclose(out[0], [2.0, 2.0, 2.0])


def test_last_valid_of_empty_history_is_nan():
    assert np.isnan(last_valid(np.empty((2, 0)))).all()


def test_horizons_start_at_one():
    with pytest.raises(ValueError):
        seasonal_naive(np.ones((1, 8)), np.array([0]), season=4)
