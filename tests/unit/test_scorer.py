"""Scorer: store rows -> real features -> (fake) model -> downtime per slot -> recommended and minimum windows."""

from __future__ import annotations

import numpy as np
import pytest

from app.settings import Settings
from gpu_kernels.downtime import precopy
from gpu_kernels.features import FEATURE_NAMES, TARGETS
from streams.schema import METRICS
from streams.scorer import Scorer, interp_weights, per_slot_quantiles
from streams.window_store import WindowStore

SLOT = 300
M = {n: i for i, n in enumerate(METRICS)}
H_COL = FEATURE_NAMES.index("horizon_h")
T0 = 1_700_000_000 - 1_700_000_000 % SLOT


class ValleyModel:
    """Fake forecaster on a sparse grid: dirty rate high except a valley at one horizon.

    It reads the horizon from the real feature matrix, so a wrong row layout or
    interpolation shows up in the scores.
    """

    def __init__(self, valley_slot, high=900.0, low=20.0, version="fake-1", net=0.0, horizons=(1, 2, 4, 8, 12, 24)):
        self.horizons = np.asarray(horizons)
        self.version = version
        self.valley_slot, self.high, self.low, self.net = valley_slot, high, low, net

    def predict(self, X, device="cpu"):
        assert device == "cpu"
        h = np.rint(X[:, H_COL] * 3600 / SLOT)
        dirty = np.where(h == self.valley_slot, self.low, self.high)
        out = np.zeros((X.shape[0], len(TARGETS), 2), np.float32)
        out[:, TARGETS.index("dirty_mbps"), 0] = dirty
        out[:, TARGETS.index("dirty_mbps"), 1] = dirty * 1.2
        out[:, TARGETS.index("net_mbps"), :] = self.net
        out[:, TARGETS.index("cpu_pct"), :] = 50
        return out


def settings(**kw):
    """Scorer-plumbing settings; the classic model, whose closed form the references below recompute."""
    base = dict(slot_s=SLOT, window_span_s=12 * SLOT, horizon_s=24 * SLOT, link_mbps=1250.0, rescore_s=SLOT,
                downtime_model="classic")  # fmt: skip
    base.update(kw)
    return Settings.from_env({}, **base)


def fill(store, vms, hosts, mem_used=8192.0, net_kbps=0.0, ts=None, mem_total=16384.0):
    n = len(vms)
    v = np.full((n, len(METRICS)), np.nan, np.float32)
    v[:, M["cpu_pct"]] = 30
    v[:, M["mem_total_mb"]] = mem_total
    v[:, M["mem_used_mb"]] = mem_used
    v[:, M["net_rx_kbps"]] = net_kbps
    v[:, M["net_tx_kbps"]] = 0
    v[:, M["vcpus"]] = 4
    ts = np.full(n, T0 + 10.0) if ts is None else ts
    return store.update(vms, hosts, ts, v)


def ref_downtime_ms(mem, dirty, bw, target_ms=300.0, max_rounds=30, resume_ms=20.0):
    """Round-by-round pre-copy (independent of the kernel)."""
    lam, send = dirty / bw, mem
    for _ in range(max_rounds):
        remainder = min(send * lam, mem)
        if remainder / bw * 1000 <= target_ms and lam < 1:
            break
        send = remainder
    return remainder / bw * 1000 + resume_ms


def test_best_window_is_the_valley_and_now_is_the_first_slot():
    s = settings()
    store = WindowStore(s.window_slots, s.slot_s, s.vm_ttl_s)
    rows = fill(store, ["a"], ["h1"])
    # a dense grid: on a sparse one the interpolated flanks of the valley can beat it
    # (pre-copy downtime is a sawtooth in the dirty rate, not monotone)
    model = ValleyModel(valley_slot=8, horizons=np.arange(1, 25))
    batch = Scorer(s, lambda: model).score(store, rows, now=T0 + 20)
    last_slot = T0 // SLOT
    assert batch.best_start[0] == (last_slot + 8) * SLOT
    assert batch.best_end[0] > batch.best_start[0]
    assert batch.best_downtime_ms[0] == pytest.approx(ref_downtime_ms(8192.0, 24.0, 1250.0), rel=1e-4)
    assert batch.now_downtime_ms[0] == pytest.approx(ref_downtime_ms(8192.0, 1080.0, 1250.0), rel=1e-4)
    assert batch.best_downtime_ms[0] < batch.now_downtime_ms[0]
    assert batch.p_ok[0] > 0.99
    # now is far worse than the valley: the recommendation is the strict minimum
    assert batch.window_rule.tolist() == ["fits"]
    assert (batch.min_start[0], batch.min_end[0], batch.min_downtime_ms[0], batch.min_p_ok[0]) == (
        batch.best_start[0], batch.best_end[0], batch.best_downtime_ms[0], batch.p_ok[0])
    assert batch.model == "fake-1" and batch.vm == ["a"] and batch.host == ["h1"]
    assert batch.last_ts[0] == T0 + 10.0 and batch.updated == T0 + 20


class BurstyValleyModel(ValleyModel):
    """The median dips in the valley but the q90 stays high everywhere: a bursty VM's forecast."""

    def __init__(self, valley_slot, window_quantile, **kw):
        super().__init__(valley_slot, **kw)
        self.window_quantile = window_quantile

    def predict(self, X, device="cpu"):
        out = super().predict(X, device)
        out[:, TARGETS.index("dirty_mbps"), 1] = self.high * 1.2
        return out


def test_the_window_search_reads_the_dirty_rate_quantile_the_model_chose():
    """On q90 every slot looks the same and the search starts at once; on the median it finds the valley."""
    s = settings()
    store = WindowStore(s.window_slots, s.slot_s, s.vm_ttl_s)
    rows = fill(store, ["a"], ["h1"])
    on = {wq: Scorer(s, lambda wq=wq: BurstyValleyModel(8, wq, horizons=np.arange(1, 25))).score(store, rows, now=T0 + 20)
          for wq in (0.9, 0.5)}  # fmt: skip
    assert slot_of(on[0.9].min_start[0]) == 0
    assert on[0.9].min_downtime_ms[0] == pytest.approx(ref_downtime_ms(8192.0, 1080.0, 1250.0), rel=1e-4)
    assert slot_of(on[0.5].min_start[0]) == 7  # horizon 8 = the eighth slot from now
    assert on[0.5].min_downtime_ms[0] == pytest.approx(ref_downtime_ms(8192.0, 20.0, 1250.0), rel=1e-4)
    assert on[0.5].now_p_ok[0] == on[0.9].now_p_ok[0], "p_ok reads both quantiles whatever the search reads"


def score_one(model, correction=None, **settings_kw):
    s = settings(**settings_kw)
    store = WindowStore(s.window_slots, s.slot_s, s.vm_ttl_s)
    return Scorer(s, lambda: model, correction=correction).score(store, fill(store, ["a"], ["h1"]), now=T0 + 20)


def slot_of(epoch_s):
    """Slot index of a window start (0 = the next slot, "now")."""
    return int(epoch_s // SLOT - T0 // SLOT - 1)


def test_now_is_recommended_when_the_minimum_saves_only_a_few_ms():
    # q90 dirty 86.4 MB/s now (~51 ms), 84 MB/s in the valley 11 slots on (~49.6 ms)
    model = ValleyModel(valley_slot=12, high=72.0, low=70.0, horizons=np.arange(1, 25))
    batch = score_one(model)
    assert batch.window_rule.tolist() == ["now"]
    assert slot_of(batch.best_start[0]) == 0 and slot_of(batch.min_start[0]) == 11
    assert batch.min_downtime_ms[0] < batch.best_downtime_ms[0] == batch.now_downtime_ms[0]
    assert batch.best_downtime_ms[0] - batch.min_downtime_ms[0] < 10.0
    assert batch.p_ok[0] == batch.now_p_ok[0] >= 0.9
    ref = precopy(np.float32(8192.0), np.float32(72.0 * 1.2), np.float32(1250.0))
    assert batch.now_total_s[0] == pytest.approx(float(ref.duration_s), rel=1e-5)
    assert batch.best_end[0] - batch.best_start[0] == pytest.approx(batch.now_total_s[0], rel=1e-6)
    # no tolerance: the recommendation is the strict minimum again (the settings reach the kernel)
    strict = score_one(model, window_tolerance_ms=0.0, window_tolerance_rel=0.0)
    assert strict.window_rule.tolist() == ["fits"] and strict.best_start[0] == strict.min_start[0] == batch.min_start[0]


def test_a_correction_that_pushes_now_over_the_target_moves_the_recommendation():
    class Factor:
        def factor(self, hosts):
            return np.full(len(hosts), 1.1)

    model = ValleyModel(valley_slot=8, high=210.0, low=40.0, horizons=np.arange(1, 25))  # ~286 ms now, ~272 ms at 7
    plain, corrected = score_one(model), score_one(model, Factor())
    assert plain.window_rule.tolist() == ["now"] and plain.now_downtime_ms[0] < 300.0
    assert corrected.now_downtime_ms[0] > 300.0 >= corrected.best_downtime_ms[0]  # judged on the corrected pause
    assert corrected.window_rule.tolist() == ["fits"] and slot_of(corrected.best_start[0]) == 7
    assert corrected.now_total_s[0] == plain.now_total_s[0]  # durations are not corrected
    # each score records the factor it includes, so an observed migration is compared with the model's own output
    assert plain.downtime_factor.tolist() == [1.0] and corrected.downtime_factor[0] == pytest.approx(1.1)


def test_a_migration_that_never_fits_falls_back_to_the_minimum():
    batch = score_one(ValleyModel(valley_slot=99, high=2000.0))  # dirty rate above the link: never converges
    assert batch.window_rule.tolist() == ["minimum"]
    assert batch.best_start[0] == batch.min_start[0] and slot_of(batch.best_start[0]) == 0
    assert batch.p_ok[0] == batch.now_p_ok[0] == batch.min_p_ok[0] < 1e-3
    assert batch.best_downtime_ms[0] > 300.0


def test_host_neighbours_traffic_reduces_bandwidth():
    s = settings()
    alone = WindowStore(s.window_slots, s.slot_s, s.vm_ttl_s)
    crowded = WindowStore(s.window_slots, s.slot_s, s.vm_ttl_s)
    model = ValleyModel(valley_slot=99, high=300.0)  # no valley in range: flat 300 MB/s (q90 360)
    r_alone = fill(alone, ["a"], ["h1"])
    fill(crowded, ["a", "b"], ["h1", "h1"], net_kbps=np.array([0.0, 600 * 1024.0]))
    r_crowded = crowded.rows_of(["a"])
    b1 = Scorer(s, lambda: model).score(alone, r_alone, now=T0 + 20)
    b2 = Scorer(s, lambda: model).score(crowded, r_crowded, now=T0 + 20)
    assert b1.now_downtime_ms[0] == pytest.approx(ref_downtime_ms(8192.0, 360.0, 1250.0), rel=1e-4)
    assert b2.now_downtime_ms[0] == pytest.approx(ref_downtime_ms(8192.0, 360.0, 650.0), rel=1e-4)
    assert b2.p_ok[0] < b1.p_ok[0]


def test_bandwidth_never_drops_below_a_tenth_of_the_link():
    s = settings()
    store = WindowStore(s.window_slots, s.slot_s, s.vm_ttl_s)
    rows = fill(store, ["a"], ["h1"], mem_used=1024.0)
    model = ValleyModel(valley_slot=99, high=10.0, net=5000.0)
    b = Scorer(s, lambda: model).score(store, rows, now=T0)
    assert b.now_downtime_ms[0] == pytest.approx(ref_downtime_ms(1024.0, 12.0, 125.0), rel=1e-4)


def test_due_rows_once_per_rescore_unless_the_newest_slot_changes():
    s = settings()
    store = WindowStore(s.window_slots, s.slot_s, s.vm_ttl_s)
    rows = fill(store, ["a", "b"], ["h", "h"])
    scorer = Scorer(s, lambda: ValleyModel(3))
    assert len(scorer.due_rows(store, rows, T0 + 20)) == 2
    scorer.score(store, rows, T0 + 20)
    assert len(scorer.due_rows(store, rows, T0 + 30)) == 0
    fill(store, ["b"], ["h"], ts=np.array([T0 + SLOT + 5.0]))  # b moves to a new slot
    assert store.vm_of_row[scorer.due_rows(store, rows, T0 + 30)[0]] == "b"
    assert len(scorer.due_rows(store, rows, T0 + 20 + SLOT)) == 2


def test_model_provider_is_read_per_batch_for_hot_reload():
    s = settings()
    store = WindowStore(s.window_slots, s.slot_s, s.vm_ttl_s)
    rows = fill(store, ["a"], ["h"])
    current = {"m": ValleyModel(3, version="v1")}
    scorer = Scorer(s, lambda: current["m"])
    assert scorer.score(store, rows, T0).model == "v1"
    current["m"] = ValleyModel(3, version="v2")
    assert scorer.score(store, rows, T0).model == "v2"


def test_scores_in_chunks_match_one_pass():
    s = settings()
    store = WindowStore(s.window_slots, s.slot_s, s.vm_ttl_s)
    rng = np.random.default_rng(0)
    vms = [f"vm{i}" for i in range(37)]
    rows = fill(store, vms, [f"h{i % 5}" for i in range(37)], mem_used=rng.uniform(512, 65536, 37))
    one = Scorer(s, lambda: ValleyModel(5)).score(store, rows, T0)
    chunked = Scorer(s, lambda: ValleyModel(5), chunk_vms=8).score(store, rows, T0)
    assert one.vm == chunked.vm
    for name in ("best_start", "p_ok", "window_rule", "min_start", "min_p_ok", "now_p_ok", "now_total_s"):
        np.testing.assert_array_equal(getattr(one, name), getattr(chunked, name), err_msg=name)


def test_empty_rows_give_an_empty_batch():
    s = settings()
    store = WindowStore(s.window_slots, s.slot_s, s.vm_ttl_s)
    b = Scorer(s, lambda: ValleyModel(3)).score(store, np.zeros(0, np.int64), T0)
    assert len(b) == 0 and b.records() == []
    assert b.window_rule.shape == b.min_start.shape == (0,)


def test_interpolation_is_linear_between_sparse_horizons():
    h = np.array([1, 4, 12])
    lo, hi, w = interp_weights(h, 14)
    values = np.array([10.0, 40.0, 120.0])  # 10 * horizon
    got = values[lo] * (1 - w) + values[hi] * w
    np.testing.assert_allclose(got[:12], 10.0 * np.arange(1, 13), rtol=1e-6)
    np.testing.assert_allclose(got[12:], 120.0)  # flat past the last grid point
    with pytest.raises(ValueError):
        interp_weights(np.array([4, 2]), 5)


def test_forecaster_runs_once_per_slot_while_scores_follow_every_sample():
    s = settings()
    store = WindowStore(s.window_slots, SLOT, s.vm_ttl_s)
    vms = ["a", "b", "c"]
    model = ValleyModel(valley_slot=5)
    scorer = Scorer(s, lambda: model)
    rows = fill(store, vms, ["h1"] * 3, mem_used=8192.0)
    first = scorer.score(store, rows, now=T0 + 20)
    assert scorer.forecasts_run == 3

    # new samples in the same slot: the cached forecast is reused, memory is re-read
    rows = fill(store, vms, ["h1"] * 3, mem_used=8192.0 * 4, ts=np.full(3, T0 + 100.0))
    again = scorer.score(store, rows, now=T0 + 120)
    assert scorer.forecasts_run == 3
    assert np.all(again.last_ts == T0 + 100.0)
    assert np.all(again.best_end - again.best_start > first.best_end - first.best_start)  # more memory, longer copy
    uncached = Scorer(s, lambda: model).score(store, rows, now=T0 + 120)
    np.testing.assert_array_equal(again.best_downtime_ms, uncached.best_downtime_ms)
    np.testing.assert_array_equal(again.p_ok, uncached.p_ok)

    # a new slot, or a new model, runs the forecaster again
    rows = fill(store, vms, ["h1"] * 3, ts=np.full(3, T0 + SLOT + 10.0))
    scorer.score(store, rows, now=T0 + SLOT + 20)
    assert scorer.forecasts_run == 6
    model = ValleyModel(valley_slot=5, version="fake-2")
    scorer.score(store, rows, now=T0 + SLOT + 30)
    assert scorer.forecasts_run == 9


def test_a_reused_row_never_inherits_the_previous_vms_forecast():
    s = settings()
    store = WindowStore(s.window_slots, SLOT, s.vm_ttl_s, capacity=1)
    model = ValleyModel(valley_slot=5)
    scorer = Scorer(s, lambda: model)
    scorer.score(store, fill(store, ["old"], ["h1"]), now=T0 + 20)
    store.release(store.rows_of(["old"]))
    scorer.score(store, fill(store, ["new"], ["h1"]), now=T0 + 30)
    assert scorer.forecasts_run == 2


class PerVmModel(ValleyModel):
    """The dirty rate follows the VM's memory-size feature: a forecast run on another VM's inputs shows."""

    def predict(self, X, device="cpu"):
        out = super().predict(X, device)
        out[:, TARGETS.index("dirty_mbps"), :] = X[:, FEATURE_NAMES.index("mem_total_mb"), None] / 64
        return out


def test_only_stale_rows_rerun_the_forecaster_each_on_its_own_inputs():
    s = settings()
    store = WindowStore(s.window_slots, SLOT, s.vm_ttl_s)
    model = PerVmModel(valley_slot=5)
    scorer = Scorer(s, lambda: model)
    sizes = np.array([8192.0, 16384.0, 32768.0], np.float32)
    rows = fill(store, ["a", "b", "c"], ["h1"] * 3, mem_used=4096.0, mem_total=sizes)
    scorer.score(store, rows, now=T0 + 20)
    fill(store, ["b"], ["h1"], mem_used=4096.0, mem_total=sizes[1:2], ts=np.array([T0 + SLOT + 10.0]))  # b moves on
    cached = scorer.score(store, rows, now=T0 + SLOT + 20)
    assert scorer.forecasts_run == 4  # three, then b alone
    fresh = Scorer(s, lambda: model).score(store, rows, now=T0 + SLOT + 20)
    np.testing.assert_array_equal(cached.best_downtime_ms, fresh.best_downtime_ms)
    np.testing.assert_array_equal(cached.best_start, fresh.best_start)
    assert len(set(cached.best_downtime_ms.tolist())) == 3  # the three VMs do differ


def test_the_upper_quantile_between_grid_points_waits_for_the_quiet_one():
    # busy at grid horizon 4, quiet at 8: a linear q90 would call slot 5 three quarters busy
    lo, hi, w = interp_weights(np.array([4, 8]), 8)
    grid = np.array([[[40.0, 60.0]], [[1.0, 2.0]]], np.float32)[None]  # (k=1, H=2, 1 target, q50/q90)
    q = per_slot_quantiles(grid, lo, hi, w, np)
    np.testing.assert_allclose(q[0, 4:7, 0, 1], 60.0)  # slots 5-7: still the busy q90
    assert q[0, 7, 0, 1] == 2.0 and q[0, 5, 0, 0] == pytest.approx(40 * 0.5 + 1 * 0.5)
