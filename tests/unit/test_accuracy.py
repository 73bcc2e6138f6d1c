"""Live accuracy and the shared measure: definitions, the tracker against an offline computation,
sampling and its bounds, the exposition, and that nothing it does can stop scoring."""

from __future__ import annotations

import time

import numpy as np
import pytest

from app.metrics import WorkerMetrics
from app.settings import Settings
from gpu_kernels.accuracy import (
    BUCKETS,
    ErrorTally,
    bucket_index,
    error_sums,
    naive_forecasts,
    naive_from_features,
)
from gpu_kernels.features import TARGETS, build_features
from streams.accuracy import LiveAccuracy, sampled
from streams.schema import decode_messages
from streams.scorer import Scorer
from streams.window_store import WindowStore
from tests import accuracy_support as acc
from training.baselines import last_value, seasonal_naive


# --------------------------------------------------------------------- the measure
def test_buckets_are_the_backtests():
    from training.evaluate import BUCKETS as EVAL_BUCKETS

    assert BUCKETS == EVAL_BUCKETS == acc.BUCKETS
    assert bucket_index([300, 3600, 3601, 21600, 86400, 90000, 0]).tolist() == [0, 0, 1, 1, 2, -1, -1]


def test_naive_forecasts_are_the_baselines():
    rng = np.random.default_rng(0)
    hist = rng.uniform(0, 100, (50, 300)).astype(np.float32)
    hist[rng.random(hist.shape) < 0.2] = np.nan
    hist[3] = np.nan  # no history at all
    hist[4, -5:] = np.nan  # newest slots missing
    h = np.array([1, 2, 12, 100, 288, 300, 576])
    last, seas = naive_forecasts(hist, h, 288)
    np.testing.assert_array_equal(np.repeat(last[:, None], h.size, 1), last_value(hist, h).astype(np.float32))
    np.testing.assert_array_equal(seas, seasonal_naive(hist, h, 288).astype(np.float32))


def test_naive_from_features_reads_the_same_values_from_the_feature_matrix():
    rng = np.random.default_rng(1)
    win = rng.uniform(0, 80, (6, 288, 4)).astype(np.float32)
    win[rng.random(win.shape) < 0.1] = np.nan
    h = np.array([1, 6, 12, 72, 288])
    X = build_features(win, {"mem_total_mb": np.full(6, 4096.0), "vcpus": np.full(6, 2.0)}, np.arange(6) + 10_000, h, 300)
    got = naive_from_features(X)
    for j, t in enumerate(TARGETS):
        last, seas = naive_forecasts(win[:, :, j], h, 288)  # TARGETS are the first window channels
        np.testing.assert_allclose(got["last"][:, j].reshape(6, -1), np.repeat(last[:, None], h.size, 1), rtol=1e-5)
        np.testing.assert_allclose(got["seasonal"][:, j].reshape(6, -1), seas, rtol=1e-5)


def test_a_pair_with_any_nan_is_skipped_for_every_method():
    y = np.array([[1.0], [2.0], [np.nan], [4.0]])
    model = np.array([[2.0], [2.0], [0.0], [np.nan]])
    last = np.array([[1.0], [5.0], [0.0], [4.0]])
    sums, counts = error_sums(y, [model, last], np.array([0, 1, 0, 0]))
    assert counts[0].tolist() == [1, 1, 0]  # rows 2 (no actual) and 3 (no model) skipped for both
    assert sums[0, :, 0].tolist() == [1.0, 0.0, 0.0] and sums[0, :, 1].tolist() == [0.0, 3.0, 0.0]
    tally = ErrorTally(methods=("model", "last"), targets=("cpu_pct",))
    tally.add(sums, counts)
    assert tally.mae()["cpu_pct"]["1h"] == {"model": 1.0, "last": 0.0}
    assert np.isnan(tally.ratio("model", "last")[0, 0]) and tally.ratio("model", "last")[0, 1] == 0.0  # 0 / 0: NaN
    assert tally.worse_than_naive("model", ("last",)) == ["cpu_pct 1h: 1 > last 0"]


# --------------------------------------------------------------------- the tracker
def _replay_through_a_scorer(tracker: LiveAccuracy, model, settings: Settings) -> tuple[Scorer, WindowStore]:
    """The worker's per-slot path without Kafka: store update, due rows, score (forecast + tracker)."""
    store = WindowStore(settings.window_slots, settings.slot_s, settings.vm_ttl_s)
    scorer = Scorer(settings, lambda: model, np, accuracy=tracker, curves=False)
    start = acc.t0()
    for s in range(acc.SLOTS):
        msgs = acc.slot_messages(start, s)
        d = decode_messages([m for _, m in msgs], [k for k, _ in msgs], now=time.time())
        rows = store.update(d.vm, d.host, d.ts, d.values)
        scorer.score(store, scorer.due_rows(store, rows, time.time()), time.time())
    return scorer, store


@pytest.fixture(scope="module")
def model():
    return acc.test_model()


@pytest.fixture
def settings() -> Settings:
    return Settings.from_env({}, slot_s=acc.SLOT_S, window_span_s=acc.WINDOW_S, horizon_s=acc.HORIZON_S, accuracy_sample=1.0)


def test_tracked_errors_equal_an_offline_computation_on_the_same_samples(model, settings):
    metrics = WorkerMetrics()
    tracker = LiveAccuracy.from_settings(settings, metrics)
    _replay_through_a_scorer(tracker, model, settings)
    want = acc.offline_errors(acc.t0(), model)
    sums, counts = tracker.totals()
    for (t, b, m), (s, n) in want.items():
        i, j, k = TARGETS.index(t), list(BUCKETS).index(b), acc.METHODS.index(m)
        assert counts[i, j] == n, (t, b, m)
        assert sums[i, j, k] == pytest.approx(s, rel=1e-9, abs=1e-9), (t, b, m)
    assert want[("cpu_pct", "1h", "model")][1] > 100 and want[("cpu_pct", "6h", "seasonal")][1] > 50
    assert want[("net_mbps", "1h", "last")][1] < want[("cpu_pct", "1h", "last")][1]  # vm-3 has no network
    # the exposition carries the same numbers
    fam = {(s.name, s.labels["target"], s.labels["bucket"], s.labels["method"]): s.value
           for f in metrics.registry.collect() if f.name == "zhuge_forecast_abs_error" for s in f.samples}  # fmt: skip
    for (t, b, m), (s, n) in want.items():
        assert fam[("zhuge_forecast_abs_error_count", t, b, m)] == n
        assert fam[("zhuge_forecast_abs_error_sum", t, b, m)] == pytest.approx(s, rel=1e-9, abs=1e-9)
    assert metrics.forecast_errors.tracked._value.get() == acc.VMS
    # memory: one ring cell per pending (origin, horizon)
    assert tracker.bytes_per_vm == sum(h + 1 for h in model.horizons.tolist()) * 40


def test_sampling_is_deterministic_and_near_its_fraction():
    ids = [f"vm-{i}" for i in range(20_000)]
    a, b = sampled(ids, 1 / 16), sampled(np.asarray(ids, dtype=object), 1 / 16)
    assert (a == b).all() and 0.055 < a.mean() < 0.07
    assert sampled(ids[:5], 1.0).all() and not sampled(ids[:5], 0.0).any()
    # the same VMs in every process and release (SipHash with pandas' fixed key): a regression pin
    assert np.flatnonzero(sampled(ids[:64], 1 / 16)).tolist() == [5, 25, 28, 33]


def test_the_pool_is_capped_and_reuses_the_slots_of_silent_vms(model, settings):
    now = [0.0]
    tracker = LiveAccuracy(1.0, 2, acc.SLOT_S, idle_s=100.0, clock=lambda: now[0])
    win = np.random.default_rng(0).uniform(0, 50, (5, 48, 4)).astype(np.float32)
    pred = np.ones((5, len(model.horizons), 3, 2), np.float32)
    vms = [f"vm-{i}" for i in range(5)]
    tracker.observe(vms, np.arange(5), np.full(5, 1000), win, pred, model.horizons)
    assert len(tracker) == 2 and tracker.origin.shape[0] == 2
    now[0] = 50.0
    tracker.observe(vms[2:], np.arange(3), np.full(3, 1001), win[:3], pred[:3], model.horizons)
    assert sorted(tracker.slot_of) == ["vm-0", "vm-1"]  # not idle long enough yet
    now[0] = 200.0
    tracker.observe(vms[2:], np.arange(3), np.full(3, 1002), win[:3], pred[:3], model.horizons)
    assert sorted(tracker.slot_of) == ["vm-2", "vm-3"]


def test_another_horizon_grid_drops_pending_forecasts_and_errors_never_escape(model):
    tracker = LiveAccuracy(1.0, 10, acc.SLOT_S)
    win = np.ones((2, 48, 4), np.float32)
    tracker.observe(["a", "b"], [0, 1], [10, 10], win, np.ones((2, 5, 3, 2), np.float32), [1, 2, 3, 4, 6])
    assert (tracker.origin >= 0).sum() == 2 * 5
    tracker.observe(["a", "b"], [0, 1], [11, 11], win, np.ones((2, 2, 3, 2), np.float32), [1, 12])
    assert tracker.horizons.tolist() == [1, 12] and (tracker.origin >= 0).sum() == 2 * 2
    assert tracker.tally.counts.sum() == 0
    tracker.observe(["a", "b"], [0, 1], [12, 12], win[:1], "not an array", [1, 12])  # logged, not raised


def test_off_when_the_sample_is_zero():
    s = Settings.from_env({"ZHUGE_ACCURACY_SAMPLE": "0"})
    assert LiveAccuracy.from_settings(s) is None
    with pytest.raises(ValueError):
        Settings.from_env({"ZHUGE_ACCURACY_SAMPLE": "1.5"})
    with pytest.raises(ValueError):
        Settings.from_env({"ZHUGE_ACCURACY_MAX_VMS": "-1"})


def test_every_accuracy_series_exists_from_start_up():
    from prometheus_client import generate_latest

    text = generate_latest(WorkerMetrics().registry).decode()
    for t in TARGETS:
        for b in BUCKETS:
            for m in acc.METHODS:
                for part in ("sum", "count"):
                    assert f'zhuge_forecast_abs_error_{part}{{bucket="{b}",method="{m}",target="{t}"}} 0.0' in text
    assert "zhuge_forecast_tracked_vms 0.0" in text

