"""Migration windows: the strict minimum (best_window) and the recommended one (recommended_window)."""

from __future__ import annotations

import numpy as np
import pytest

from gpu_kernels.window import WINDOW_RULES, best_window, recommended_window, window_max, window_min


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


# ---------------------------------------------------------------- window_min and the recommended window
def test_window_min_mirrors_window_max():
    x = np.array([[0.9, 0.5, 0.99, 0.95]])
    np.testing.assert_array_equal(window_min(x, 2), [[0.5, 0.5, 0.95, 0.95]])  # the last start: the horizon clips
    np.testing.assert_array_equal(window_min(x, 1), x)
    np.testing.assert_array_equal(window_min(-x, 3), -window_max(x, 3))


def recommended_reference(x, dur, p_slot, target, tol_ms, tol_rel, min_p):
    """Per-VM, per-start loop of the rule (independent of the kernel)."""
    starts, vals, rules = [], [], []
    for i in range(x.shape[0]):
        T = x.shape[1]
        span = [range(t, min(T, t + max(1, dur[i, t]))) for t in range(T)]
        v = [max(np.inf if np.isnan(x[i, s]) else x[i, s] for s in sp) for sp in span]
        p = [min(p_slot[i, s] for s in sp) for sp in span]
        best = min(v)
        near = [t for t in range(T) if np.isfinite(v[t]) and v[t] <= best + max(tol_ms, tol_rel * best)]
        fits = [t for t in near if v[t] <= target[i] and p[t] >= min_p]
        t = fits[0] if fits else (near[0] if near else 0)
        starts.append(t)
        vals.append(v[t] if np.isfinite(v[t]) else np.nan)
        rules.append(("now" if t == 0 else "fits") if fits else "minimum")
    return np.array(starts), np.array(vals), rules


def recommend(x, dur=1, p=None, target=300.0, tol_ms=10.0, tol_rel=0.1, min_p_ok=0.9):
    x = np.asarray(x, dtype=np.float64)
    p_start = window_min(np.full(x.shape, 0.99) if p is None else np.asarray(p, dtype=np.float64), dur)
    start, value, rule = recommended_window(x, dur, p_start, target, tol_ms, tol_rel, min_p_ok)
    return start, value, [WINDOW_RULES[r] for r in rule]


@pytest.mark.parametrize("seed", range(6))
def test_recommended_matches_loop_reference(seed):
    rng = np.random.default_rng(seed)
    x = rng.uniform(20, 400, (40, 48)).round(1)
    x[rng.random(x.shape) < 0.05] = np.nan
    x[0] = np.nan  # a VM with no forecast at all
    dur = rng.integers(1, 4, x.shape)
    p_slot = rng.uniform(0.7, 1.0, x.shape)
    target = rng.choice([150.0, 300.0], 40)  # per VM (e.g. target / correction)
    tol_ms, tol_rel, min_p = float(rng.choice([0.0, 10.0])), float(rng.choice([0.0, 0.1, 0.5])), 0.85
    start, value, rule = recommended_window(x, dur, window_min(p_slot, dur), target, tol_ms, tol_rel, min_p)
    rs, rv, rr = recommended_reference(x, dur, p_slot, target, tol_ms, tol_rel, min_p)
    np.testing.assert_array_equal(start, rs)
    np.testing.assert_allclose(value, rv)
    assert [WINDOW_RULES[r] for r in rule] == rr
    assert start.dtype == np.int64 and rule.dtype == np.int8


def test_now_beats_saving_2_ms_in_20_hours():
    """The case seen in the field: 51.7 ms now, 49.7 ms in 19.8 h (slot 238 of 288): migrate now."""
    x = np.full((1, 288), 120.0)
    x[0, 0], x[0, 238] = 51.7, 49.7
    assert best_window(x)[0][0] == 238  # the strict minimum still says wait
    start, value, rule = recommend(x)
    assert (start[0], rule) == (0, ["now"])
    assert value[0] == pytest.approx(51.7)


def test_a_later_slot_that_fits_the_target_wins_over_now():
    x = np.full((1, 288), 500.0)  # now: 500 ms, over the 300 ms target
    x[0, 24] = 250.0  # in 2 h: fits, and within 10% of the minimum
    x[0, 200] = 240.0  # the minimum, much later
    start, value, rule = recommend(x)
    assert (start[0], value[0], rule) == (24, 250.0, ["fits"])


def test_nothing_fits_falls_back_to_the_earliest_near_minimum():
    x = np.full((1, 288), 900.0)
    x[0, 50], x[0, 100] = 360.0, 350.0  # never under the 300 ms target
    start, value, rule = recommend(x)
    assert (start[0], value[0], rule) == (50, 360.0, ["minimum"])
    # the fallback applies at slot 0 too, and says so
    start, _, rule = recommend([[355.0, 350.0]])
    assert (start[0], rule) == (0, ["minimum"])


def test_tolerance_is_the_larger_of_absolute_and_relative():
    # minimum 20 ms: 10 ms absolute (vs 2 ms relative); minimum 200 ms: 20 ms relative (vs 10 ms absolute)
    x = [[31.0, 29.0, 20.0], [219.0, 221.0, 200.0]]
    assert recommend(x)[0].tolist() == [1, 0]
    assert recommend(x, tol_rel=0.0)[0].tolist() == [1, 2]
    assert recommend(x, tol_ms=0.0)[0].tolist() == [2, 0]
    assert recommend(x, tol_ms=0.0, tol_rel=0.0)[0].tolist() == [2, 2]  # the strict minimum


def test_p_ok_threshold_excludes_a_start():
    x = [[50.0, 52.0, 49.0]]
    p = [[0.8, 0.95, 0.99]]
    assert recommend(x, p=p)[0][0] == 1
    assert recommend(x, p=p, min_p_ok=0.7)[0][0] == 0
    # a span: starting at 1 covers slot 2 too, so its p_ok is the worse of the two
    assert recommend(x, p=[[0.8, 0.95, 0.5]])[0][0] == 1
    assert recommend(x, dur=2, p=[[0.8, 0.95, 0.5]])[2] == ["minimum"]


def test_per_vm_target():
    x = [[215.0, 200.0], [215.0, 200.0]]
    start, _, rule = recommend(x, target=np.array([300.0, 210.0]))
    assert start.tolist() == [0, 1] and rule == ["now", "fits"]


def test_nan_slots_are_never_recommended():
    start, value, rule = recommend([[np.nan, 52.0, 49.0]])
    assert (start[0], rule) == (1, ["fits"])
    # a span covering a NaN slot is unknown, hence never chosen
    start, value, _ = recommend([[50.0, np.nan, 60.0, 61.0]], dur=2)
    assert (start[0], value[0]) == (2, 61.0)
    # NaN p_ok never fits
    assert recommend([[50.0, 52.0]], p=[[np.nan, 0.95]])[0][0] == 1
    start, value, rule = recommend(np.full((1, 4), np.nan))
    assert start[0] == 0 and np.isnan(value[0]) and rule == ["minimum"]


def test_recommended_rejects_wrong_shape():
    with pytest.raises(ValueError):
        recommended_window(np.zeros(3), 1, np.ones(3), 300.0)
