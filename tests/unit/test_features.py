"""The feature module: shapes, gap tolerance, calendar lookups, horizon broadcast, spec hash."""

from __future__ import annotations

import calendar
import subprocess
import sys

import numpy as np
import pytest

from gpu_kernels.features import (
    FEATURE_NAMES,
    FEATURE_SPEC_HASH,
    HORIZON_FEATURE_NAMES,
    PROFILE_ALPHA,
    TARGETS,
    WEEK_ALPHA,
    VM_FEATURE_NAMES,
    WINDOW_CHANNELS,
    build_features,
    profiles_at,
    slots_per_day,
    training_examples,
    week_bucket_slots,
    week_buckets,
    weeklies_at,
    windows_at,
)

SLOT = 300
DAY = 86400 // SLOT
H = np.array([1, 2, 6, 12, 48, 288])


def col(name: str) -> int:
    return FEATURE_NAMES.index(name)


def attrs(k: int, vcpus: float = 4.0, mem: float = 8192.0) -> dict[str, np.ndarray]:
    return {"vcpus": np.full(k, vcpus, np.float32), "mem_total_mb": np.full(k, mem, np.float32)}


def random_window(k: int, S: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random((k, S, len(WINDOW_CHANNELS))) * 100).astype(np.float32)


def test_shape_dtype_and_vm_major_rows() -> None:
    k, S = 5, 288
    X = build_features(random_window(k, S), attrs(k), np.arange(k) + 10_000, H, SLOT)
    assert X.shape == (k * len(H), len(FEATURE_NAMES))
    assert X.dtype == np.float32
    # row i*H + j is VM i at horizon j
    assert X[2 * len(H) + 3, col("horizon_h")] == pytest.approx(H[3] * SLOT / 3600)


def test_names_unique_and_split_into_vm_and_horizon_parts() -> None:
    assert len(set(FEATURE_NAMES)) == len(FEATURE_NAMES)
    assert FEATURE_NAMES == VM_FEATURE_NAMES + HORIZON_FEATURE_NAMES


def test_nan_gaps_are_tolerated_and_stats_match_nan_aware_numpy() -> None:
    k, S = 3, 288
    win = random_window(k, S, seed=1)
    rng = np.random.default_rng(2)
    win[rng.random((k, S)) < 0.3] = np.nan  # 30 % missing slots
    win[1, -5:] = np.nan  # VM 1 silent for the newest 5 slots
    win[2] = np.nan  # VM 2 never seen
    X = build_features(win, attrs(k), np.arange(k), H, SLOT).reshape(k, len(H), -1)
    cpu = win[0, :, 0]
    assert X[0, 0, col("cpu_mean_6h")] == pytest.approx(np.nanmean(cpu[-72:]), rel=1e-5)
    assert X[0, 0, col("cpu_std_24h")] == pytest.approx(np.nanstd(cpu), rel=1e-4)
    assert X[0, 0, col("cpu_max_1h")] == pytest.approx(np.nanmax(cpu[-12:]))
    last_seen = np.flatnonzero(~np.isnan(win[1, :, 0]))[-1]
    assert X[1, 0, col("cpu_last")] == pytest.approx(win[1, last_seen, 0])
    assert X[1, 0, col("staleness_slots")] >= 5
    # an unseen VM: window statistics unknown, calendar and attributes still there
    assert np.isnan(X[2, :, col("cpu_mean_24h")]).all()
    assert np.isfinite(X[2, :, col("tod_sin")]).all() and (X[2, :, col("vcpus")] == 4).all()


def test_rates_are_on_log1p_scale() -> None:
    win = random_window(1, 288)
    X = build_features(win, attrs(1), np.array([0]), np.array([1]), SLOT)
    assert X[0, col("dirty_last")] == pytest.approx(np.log1p(win[0, -1, 1]))
    assert X[0, col("net_last")] == pytest.approx(np.log1p(win[0, -1, 2]))
    assert X[0, col("cpu_last")] == pytest.approx(win[0, -1, 0])


@pytest.mark.parametrize("S", [DAY, 2 * DAY])
def test_same_slot_yesterday_is_relative_to_the_target_slot(S: int) -> None:
    win = np.zeros((1, S, 4), np.float32)
    win[0, :, 0] = np.arange(S)  # cpu value = window index
    X = build_features(win, attrs(1), np.array([123_456]), H, SLOT)
    expected = S - 1 - DAY + H  # window index of (target slot - 1 day)
    np.testing.assert_array_equal(X[:, col("cpu_yday")], expected)
    # no weekly profile given: unknown rather than wrong
    assert np.isnan(X[:, col("cpu_week")]).all()


def test_the_week_feature_reads_the_weekly_profile_at_the_target_hour() -> None:
    W = week_buckets(SLOT)
    assert (W, week_bucket_slots(SLOT)) == (168, 12)
    week = np.tile(np.arange(W, dtype=np.float32)[None, :, None], (1, 1, len(TARGETS)))  # bucket b holds b
    week[0, 5] = np.nan
    last_slot = 12 * (3 * W + 4) + 10  # the 11th slot of bucket 4, three weeks after bucket 0
    X = build_features(random_window(1, DAY), attrs(1), np.array([last_slot]), np.array([1, 2, 14, 12 * W]), SLOT, week=week)
    np.testing.assert_array_equal(X[[0, 2, 3], col("cpu_week")], [4, 6, 4])  # same hour, 2 hours on, a week on
    assert np.isnan(X[1, col("cpu_week")])  # the next hour (bucket 5) was never folded
    np.testing.assert_allclose(X[[0, 2], col("dirty_week")], np.log1p([4, 6]), rtol=1e-6)  # on the model's scale
    with pytest.raises(ValueError, match="week must be"):
        build_features(random_window(1, DAY), attrs(1), np.array([last_slot]), H, SLOT, week=week[:, :24])


def test_yesterday_hour_mean_tolerates_a_missing_exact_slot() -> None:
    S = DAY
    win = np.full((1, S, 4), 7.0, np.float32)
    win[0, 0, 0] = np.nan  # exactly the slot h=1 looks up
    X = build_features(win, attrs(1), np.array([0]), np.array([1]), SLOT)
    assert np.isnan(X[0, col("cpu_yday")])
    assert X[0, col("cpu_yday_1h")] == pytest.approx(7.0)


def test_per_vm_features_are_identical_across_horizons() -> None:
    k = 4
    X = build_features(random_window(k, 288), attrs(k), np.arange(k), H, SLOT).reshape(k, len(H), -1)
    vm_cols = slice(0, len(VM_FEATURE_NAMES))
    assert np.array_equal(X[:, :1, vm_cols].repeat(len(H), axis=1), X[:, :, vm_cols], equal_nan=True)
    assert not np.array_equal(X[:, 0, col("horizon_h")], X[:, 1, col("horizon_h")])


def test_calendar_of_the_target_slot() -> None:
    midnight = calendar.timegm((2026, 11, 27, 0, 0, 0))  # a Friday
    last_slot = np.array([midnight // SLOT - 1])  # target of h=1 is midnight
    X = build_features(random_window(1, 288), attrs(1), last_slot, np.array([1, 73]), SLOT)
    assert X[0, col("tod_sin")] == pytest.approx(0.0, abs=1e-6)
    assert X[0, col("tod_cos")] == pytest.approx(1.0)
    assert X[0, col("dow")] == 4  # Monday = 0
    assert X[1, col("tod_sin")] == pytest.approx(1.0)  # 72 slots after midnight: 06:00


def test_memory_utilisation_and_unknown_size() -> None:
    win = random_window(2, 288)
    win[:, :, 3] = 2048.0
    a = {"vcpus": np.array([2, np.nan], np.float32), "mem_total_mb": np.array([8192, np.nan], np.float32)}
    X = build_features(win, a, np.arange(2), np.array([1]), SLOT)
    assert X[0, col("mem_util")] == pytest.approx(0.25)
    assert np.isnan(X[1, col("mem_util")]) and np.isnan(X[1, col("vcpus")])


def test_bad_input_is_explained() -> None:
    with pytest.raises(ValueError, match="win must be"):
        build_features(np.zeros((2, 10, 3), np.float32), attrs(2), np.arange(2), H, SLOT)
    with pytest.raises(ValueError, match="horizons"):
        build_features(random_window(1, 10), attrs(1), np.arange(1), np.array([0]), SLOT)


def test_spec_hash_is_stable_across_processes() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "from gpu_kernels.features import FEATURE_SPEC_HASH as h; print(h)"],
        capture_output=True, text=True, check=True,
    )
    assert out.stdout.strip() == FEATURE_SPEC_HASH
    assert len(FEATURE_SPEC_HASH) == 64


def test_training_examples_reuse_the_serving_features() -> None:
    V, T, S = 2, 400, 288
    rng = np.random.default_rng(3)
    series = (rng.random((V, T, 4)) * 50).astype(np.float32)
    a = attrs(V)
    origins = np.array([10, 300, 395])
    h = np.array([1, 3, 6])
    X, Y = training_examples(series, a, 1_000, origins, h, S, SLOT)
    # origin 395 + 6 is past the series end -> that row is dropped
    assert X.shape == (V * 3 * 3 - V, len(FEATURE_NAMES)) and Y.shape == (X.shape[0], len(TARGETS))
    # VM 1, origin 300: same features as serving that VM's window directly
    win = series[1:2, 300 - S + 1 : 301]
    prof = profiles_at(series[1:2], 1_000, np.array([300]), S, SLOT)  # what the window store folded by then
    week = weeklies_at(series[1:2], 1_000, np.array([300]), S, SLOT)
    direct = build_features(win, attrs(1), np.array([1_300]), h, SLOT, profile=prof, week=week)
    row = (3 * 3 - 1) + 3  # VM 0 has 8 kept rows; then VM 1's origin 10 (3 rows)
    np.testing.assert_array_equal(X[row : row + 3], direct)
    np.testing.assert_array_equal(Y[row : row + 3], series[1, 300 + h][:, :3])


def test_windows_at_pads_young_series_with_nan() -> None:
    series = np.arange(10, dtype=np.float32).reshape(1, 10, 1).repeat(4, axis=2)
    w = windows_at(series, np.array([2]), 5)
    assert np.isnan(w[0, :2, 0]).all() and list(w[0, 2:, 0]) == [0, 1, 2]


def test_recent_level_is_a_nan_aware_median_and_short_mean() -> None:
    k, S = 3, 288
    win = random_window(k, S, seed=3)
    cpu = WINDOW_CHANNELS.index("cpu_pct")
    win[0, -3:, cpu] = [10.0, 90.0, 20.0]  # a spike in the middle of the newest 15 min
    win[1, -3:, cpu] = [40.0, np.nan, 60.0]
    win[2, -3:, :] = np.nan  # nothing in the newest 15 min: the level is the last value
    X = build_features(win, attrs(k), np.arange(k) + 10_000, H, SLOT)[:: len(H)]
    assert X[:2, col("cpu_level")] == pytest.approx([20.0, 50.0])
    assert X[2, col("cpu_level")] == pytest.approx(win[2, -4, cpu])
    assert X[:2, col("cpu_mean_15m")] == pytest.approx([40.0, 50.0])
    assert np.isnan(X[2, col("cpu_mean_15m")])
    assert X[0, col("cpu_last_dev_1h")] == pytest.approx(20.0 - np.nanmean(win[0, -12:, cpu]), rel=1e-5)


def test_idle_and_busy_fractions_of_the_last_hour() -> None:
    k, S = 1, 288
    win = random_window(k, S, seed=4)
    cpu = WINDOW_CHANNELS.index("cpu_pct")
    win[0, -12:, cpu] = [0.0] * 3 + [100.0] * 6 + [50.0, np.nan, 50.0]  # 11 observed slots
    X = build_features(win, attrs(k), np.arange(k) + 10_000, H, SLOT)
    assert X[0, col("cpu_idle_frac_1h")] == pytest.approx(3 / 11)
    assert X[0, col("cpu_busy_frac_1h")] == pytest.approx(6 / 11)


def test_label_offset_is_the_last_value_at_every_horizon() -> None:
    from training.fit import label_offset

    k, S = 1, 288
    win = random_window(k, S, seed=5)
    win[0, -3:, WINDOW_CHANNELS.index("cpu_pct")] = [10.0, 30.0, 80.0]
    X = build_features(win, attrs(k), np.arange(k) + 10_000, H, SLOT)
    assert np.all(label_offset(X, "cpu_pct") == 80.0)


@pytest.mark.parametrize("S", [DAY, 5])  # a day's window; one shorter than an hour holds the hour's first 5 slots
def test_weekly_profile_is_the_ewma_of_each_hour_of_the_week_whose_first_slot_left_the_window(S: int) -> None:
    B, W = week_bucket_slots(SLOT), week_buckets(SLOT)
    rng = np.random.default_rng(6)
    T, first = 16 * DAY + 7, 3 * DAY + 30  # two weeks and more, starting mid-hour
    series = (rng.random((1, T, 4)) * 40).astype(np.float32)
    series[0, rng.choice(T, 900, replace=False), 0] = np.nan  # gaps are skipped
    series[0, 12 * 40 : 12 * 41, 0] = np.nan  # a whole hour without a value leaves its bucket as it was
    origin = T - 1
    got = weeklies_at(series, first, np.array([origin]), S, SLOT)[0, :, 0]
    expected = np.full(W, np.nan)
    for s in range(first // B * B, first + origin - S + 1, B):  # hours whose first slot has left, oldest first
        vals = series[0, max(s - first, 0) : max(s - first + min(B, S), 0), 0]
        if np.isnan(vals).all():
            continue
        x, b = np.nanmean(vals), (s // B) % W
        expected[b] = x if np.isnan(expected[b]) else expected[b] + WEEK_ALPHA * (x - expected[b])
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert np.isfinite(got).all()


def test_a_weekly_vm_has_its_weekly_profile_at_the_target_hour_and_no_recent_error() -> None:
    B, W = week_bucket_slots(SLOT), week_buckets(SLOT)
    t = np.arange(17 * DAY)
    first = 5 * DAY + 3 * B  # hour-aligned, mid-week
    weekly = (10 + ((first + t) // B % W) % 37).astype(np.float32)  # one value per hour of the week
    series = np.repeat(weekly[None, :, None], 4, axis=2)
    h = np.array([1, 12, 100, 288])
    X, Y = training_examples(series, attrs(1), first, np.array([15 * DAY + 5]), h, DAY, SLOT)
    np.testing.assert_allclose(X[:, col("cpu_week")], Y[:, 0], rtol=1e-6)
    np.testing.assert_allclose(X[:, col("cpu_week_err_24h")], 0.0, atol=1e-5)
    assert (np.abs(X[:, col("cpu_prof")] - Y[:, 0]) > 0.5).any()  # the daily profile cannot tell the days apart


def test_profile_is_the_ewma_of_each_time_of_day_that_left_the_window() -> None:
    P = slots_per_day(SLOT)
    rng = np.random.default_rng(5)
    T, first = 4 * P + 17, 7 * P + 50  # starts mid-day
    series = (rng.random((1, T, 4)) * 40).astype(np.float32)
    series[0, rng.choice(T, 60, replace=False), 0] = np.nan  # gaps are skipped
    origin, S = T - 1, P
    prof = profiles_at(series, first, np.array([origin]), S, SLOT)[0, :, 0]
    expected = np.full(P, np.nan)
    for t in range(origin - S + 1):  # every slot that has left the window, oldest first
        j, x = (first + t) % P, series[0, t, 0]
        if np.isnan(x):
            continue
        expected[j] = x if np.isnan(expected[j]) else expected[j] + PROFILE_ALPHA * (x - expected[j])
    np.testing.assert_allclose(prof, expected, rtol=1e-5)


def test_a_periodic_vm_has_its_profile_at_the_target_slot_and_a_periodicity_of_one() -> None:
    P = slots_per_day(SLOT)
    t = np.arange(5 * P)
    daily = (20 + 10 * np.sin(2 * np.pi * ((t + 13) % P) / P)).astype(np.float32)
    series = np.repeat(daily[None, :, None], 4, axis=2)
    h = np.array([1, 12, 100, 288])
    X, Y = training_examples(series, attrs(1), 13, np.array([3 * P + 7]), h, P, SLOT)
    col = FEATURE_NAMES.index
    np.testing.assert_allclose(X[:, col("cpu_prof")], Y[:, 0], rtol=1e-5)
    np.testing.assert_allclose(X[:, col("cpu_periodic")], 1.0, atol=1e-4)
    np.testing.assert_allclose(X[:, col("cpu_prof_err_24h")], 0.0, atol=1e-4)
