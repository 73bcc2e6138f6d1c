"""Best window: lowest max-downtime over the migration's span, earliest on ties."""

from __future__ import annotations

import numpy as np
import pytest

from gpu_kernels.window import best_window, window_max


def reference(x, dur, tol):
    k, T = x.shape
    starts, vals = [], []
    for i in range(k):
        v = [np.max(np.where(np.isnan(x[i, t : t + dur[i, t]]), np.inf, x[i, t : t + dur[i, t]])) for t in range(T)]
        best = min(v)
        t = next(t for t in range(T) if v[t] <= best + tol)
        starts.append(t)
        vals.append(v[t])
    return np.array(starts), np.array(vals)


@pytest.mark.parametrize("seed", range(4))
def test_matches_loop_reference(seed):
    rng = np.random.default_rng(seed)
    x = rng.uniform(10, 1000, (30, 48)).round(0)
    x[rng.random(x.shape) < 0.05] = np.nan
    dur = rng.integers(1, 5, x.shape)
    tol = float(rng.choice([0.0, 5.0]))
    start, value = best_window(x, dur, tol)
    rs, rv = reference(x, dur, tol)
    np.testing.assert_array_equal(start, rs)
    np.testing.assert_allclose(value, rv)


def test_span_avoids_a_spike_that_a_single_slot_view_would_miss():
    x = np.array([[500.0, 50.0, 900.0, 60.0, 70.0]])
    assert best_window(x, 1)[0][0] == 1
    start, value = best_window(x, 2)  # starting at 1 runs into the 900 ms spike
    assert start[0] == 3 and value[0] == 70.0


def test_earliest_within_tolerance():
    x = np.array([[100.0, 99.5, 30.0, 29.0]])
    assert best_window(x, 1, tol_ms=0.0)[0][0] == 3
    assert best_window(x, 1, tol_ms=2.0)[0][0] == 2


def test_all_nan_row():
    start, value = best_window(np.full((1, 4), np.nan), 1)
    assert start[0] == 0 and np.isnan(value[0])


def test_window_max_clips_at_the_horizon():
    x = np.array([[1.0, 2.0, 3.0]])
    np.testing.assert_array_equal(window_max(x, 5), [[3.0, 3.0, 3.0]])


def test_rejects_wrong_shape():
    with pytest.raises(ValueError):
        best_window(np.zeros(3))
