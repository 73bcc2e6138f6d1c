"""vm.migrations: decoding, the learned downtime correction, and its effect on the scorer."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gpu_kernels.downtime import PrecopyParams
from streams.migrations import DowntimeCorrection, decode_migrations
from streams.schema import Limits, Rejected
from streams.scorer import Scorer, score_windows
from streams.window_store import WindowStore
from tests.unit.test_scorer import T0, ValleyModel, fill, settings

NOW = 1_700_000_100.0


def msg(**kw) -> dict:
    base = {"vm": "vm-1", "start": NOW - 60, "end": NOW - 30, "downtime_ms": 85.0}
    base.update(kw)
    return base


def enc(obj) -> bytes:
    return json.dumps(obj).encode()


# ---------------------------------------------------------------------------- decoding
def test_decodes_every_field_of_a_good_message():
    raw = enc(msg(bytes=8.5e9, rounds=4, host_from="h1", host_to="h2", link_mbps=1250, extra="ignored"))
    b = decode_migrations([raw], [b"vm-1"], now=NOW)
    assert b.rejected == [] and len(b) == 1
    assert b.vm == ["vm-1"] and b.host_from == ["h1"] and b.host_to == ["h2"]
    assert (b.start[0], b.end[0], b.downtime_ms[0]) == (NOW - 60, NOW - 30, 85.0)
    assert (b.transferred_bytes[0], b.rounds[0], b.link_mbps[0]) == (8.5e9, 4.0, 1250.0)


def test_optional_fields_may_be_missing_or_null():
    b = decode_migrations([enc(msg(bytes=None))], now=NOW)
    assert len(b) == 1 and b.host_from == [""]
    assert np.isnan(b.transferred_bytes[0]) and np.isnan(b.rounds[0]) and np.isnan(b.link_mbps[0])


@pytest.mark.parametrize(
    ("obj", "reason"),
    [
        ({"vm": "a", "start": NOW - 9, "end": NOW}, "downtime_ms: required field missing"),
        (msg(downtime_ms=-1), "downtime_ms: must be >= 0"),
        (msg(start=NOW, end=NOW - 5), "end: 1700000095.000 is before start 1700000100.000"),
        (msg(start=1.0, end=2.0), "start: 1 is before 946684800"),
        (msg(start=NOW, end=NOW + 10 * 86400), "s in the future"),
        (msg(rounds=2.5), "rounds: expected int | null, got float"),
        (msg(vm=""), "vm: length must be >= 1"),
        (msg(link_mbps=0), "link_mbps: must be > 0"),
        ([1, 2], "[0]: expected object, got int"),
        (msg(end=NOW + 601), "end: 1700000701 is more than 600 s in the future"),
        (msg(vm="vm-1\u0000"), "vm: must not contain control characters"),
        (msg(host_from="h1\n"), "host_from: must not contain control characters"),
        (msg(host_to="\u007fh2"), "host_to: must not contain control characters"),
        (msg(downtime_ms=86_400_001), "downtime_ms: must be <= 86400000"),
        (msg(bytes=2.0**61), "bytes: must be <= 1152921504606846976"),
        (msg(link_mbps=1e300), "link_mbps: must be <= 1000000"),
        (msg(rounds=1_000_001), "rounds: must be <= 1000000"),
        (msg(rounds=10**400), "rounds: must be <= 9007199254740992"),
        (msg(downtime_ms=1e38), "downtime_ms: must be <= 86400000"),
    ],
)
def test_invalid_messages_are_rejected_with_a_reason(obj, reason):
    raw = enc(obj)
    b = decode_migrations([raw], [b"k"], now=NOW)
    assert len(b) == 0
    assert b.rejected == [Rejected(raw=raw, key=b"k", reason=b.rejected[0].reason, index=0)]
    assert reason in b.rejected[0].reason


def test_limits_bound_migrations_inclusively_and_are_parameters():
    at_bounds = msg(end=NOW + 600, downtime_ms=86_400_000, bytes=2.0**60, link_mbps=1e6, rounds=1_000_000)
    assert len(decode_migrations([enc(at_bounds)], now=NOW)) == 1
    later = enc(msg(end=NOW + 3600))
    assert len(decode_migrations([later], now=NOW)) == 0
    assert len(decode_migrations([later], now=NOW, limits=Limits(max_future_s=86400))) == 1
    long = enc(msg(downtime_ms=2 * 86_400_000, rounds=5_000_000))
    assert len(decode_migrations([long], now=NOW, limits=Limits(max_downtime_ms=1e9, max_rounds=10**7))) == 1


def test_undecodable_bytes_and_missing_values_never_raise():
    b = decode_migrations([b"{not json", None, b"[]"], now=NOW)
    assert len(b) == 0
    assert [r.reason.split(":")[0] for r in b.rejected] == ["not JSON", "empty message (no value)", "empty array"]


def test_a_batch_keeps_the_good_objects_and_rejects_the_message_naming_the_bad_one():
    array = enc([msg(vm="a"), msg(vm="b", downtime_ms="slow"), msg(vm="c", start=NOW, end=NOW - 1)])
    single = enc(msg(vm="d"))
    b = decode_migrations([array, single], [b"agent", b"d"], now=NOW)
    assert b.vm == ["a", "d"]
    assert len(b.rejected) == 1
    r = b.rejected[0]
    assert r.raw == array and r.key == b"agent"
    assert r.reason.startswith("[1].downtime_ms: expected number, got str; [2].end:")


# ---------------------------------------------------------------------------- correction
def synthetic(rng, n, true_factor, hosts=("h1",), sigma=0.3):
    """Predictions spread over two decades; observed = true_factor * predicted * lognormal noise."""
    pred = np.exp(rng.uniform(np.log(20), np.log(2000), n))
    obs = true_factor * pred * np.exp(rng.normal(0, sigma, n))
    return list(rng.choice(hosts, n)), obs, pred


def test_no_observations_means_a_factor_of_exactly_one():
    c = DowntimeCorrection()
    assert c.factor(["h1", "h2", ""]).tolist() == [1.0, 1.0, 1.0]
    assert c.factor([]).shape == (0,)
    assert c.global_factor() == 1.0


def test_converges_to_the_true_factor_from_batches():
    rng = np.random.default_rng(1)
    c = DowntimeCorrection(alpha=0.02, min_obs=10)
    for _ in range(40):
        used = c.update(*synthetic(rng, 50, 2.5))
        assert used == 50
    assert c.global_factor() == pytest.approx(2.5, rel=0.08)
    assert c.factor(["h1"])[0] == pytest.approx(2.5, rel=0.08)
    assert c.observations == 2000


def test_follows_a_change_of_the_true_factor():
    rng = np.random.default_rng(2)
    c = DowntimeCorrection(alpha=0.05)
    c.update(*synthetic(rng, 500, 0.5))
    c.update(*synthetic(rng, 500, 2.0))
    assert c.global_factor() == pytest.approx(2.0, rel=0.1)


def test_a_batch_update_equals_one_observation_at_a_time():
    rng = np.random.default_rng(3)
    hosts, obs, pred = synthetic(rng, 60, 1.7, hosts=("h1", "h2", "h3"))
    batch, seq = DowntimeCorrection(alpha=0.1, min_obs=3), DowntimeCorrection(alpha=0.1, min_obs=3)
    batch.update(hosts, obs, pred)
    for i in range(len(obs)):
        seq.update(hosts[i : i + 1], obs[i : i + 1], pred[i : i + 1])
    np.testing.assert_allclose(batch.factor(["h1", "h2", "h3", "x"]), seq.factor(["h1", "h2", "h3", "x"]), rtol=1e-12)
    assert json.loads(batch.to_json())["hosts"].keys() == json.loads(seq.to_json())["hosts"].keys()


def test_hosts_with_few_observations_fall_back_to_the_global_factor():
    rng = np.random.default_rng(4)
    c = DowntimeCorrection(alpha=0.05, min_obs=20)
    c.update(*synthetic(rng, 400, 3.0, hosts=("slow",), sigma=0.1))
    c.update(*synthetic(rng, 400, 0.5, hosts=("fast",), sigma=0.1))
    c.update(*synthetic(rng, 5, 4.0, hosts=("rare",), sigma=0.1))
    slow, fast, rare, unknown, blank = c.factor(["slow", "fast", "rare", "never-seen", ""])
    assert slow == pytest.approx(3.0, rel=0.1) and fast == pytest.approx(0.5, rel=0.1)
    g = c.global_factor()
    assert rare == unknown == blank == pytest.approx(g, rel=1e-12)
    assert 0.5 < g < 3.0


def test_global_factor_waits_for_min_obs():
    c = DowntimeCorrection(min_obs=10)
    c.update(["h"] * 9, np.full(9, 300.0), np.full(9, 100.0))
    assert c.global_factor() == 1.0
    c.update(["h"], [300.0], [100.0])
    assert c.global_factor() == pytest.approx(3.0)


def test_factors_are_clipped_and_outliers_bounded():
    c = DowntimeCorrection(min_obs=1, lo=0.2, hi=5.0)
    c.update(["h"] * 20, np.full(20, 100_000.0), np.full(20, 10.0))  # 10000x: a failed migration
    assert c.factor(["h"])[0] == pytest.approx(5.0)
    c2 = DowntimeCorrection(min_obs=1, lo=0.2, hi=5.0)
    c2.update(["h"] * 20, np.zeros(20), np.full(20, 10.0))  # observed 0 ms
    assert c2.factor(["h"])[0] == pytest.approx(0.2)
    # one huge outlier after 99 exact observations moves the log-mean by log(5) / weight sum only
    c3 = DowntimeCorrection(alpha=0.01, min_obs=1)
    c3.update(["h"] * 100, np.r_[np.full(99, 100.0), 1e9], np.full(100, 100.0))
    assert c3.global_factor() == pytest.approx(np.exp(np.log(5) / np.sum(0.99 ** np.arange(100))), rel=1e-9)
    assert c3.global_factor() < 1.05


def test_unusable_rows_are_skipped():
    c = DowntimeCorrection(min_obs=1)
    used = c.update(["h"] * 4, [100.0, np.nan, 100.0, 100.0], [50.0, 50.0, 0.0, np.inf])
    assert used == 1 and c.observations == 1
    assert c.global_factor() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="lengths differ"):
        c.update(["h"], [1.0, 2.0], [1.0, 2.0])


def test_learning_from_corrected_predictions_reaches_the_same_factor():
    """Scores in Redis are already corrected: dividing the applied factor out avoids compounding."""
    rng = np.random.default_rng(5)
    c = DowntimeCorrection(alpha=0.05, min_obs=10)
    for _ in range(30):
        hosts, obs, raw_pred = synthetic(rng, 40, 2.0, sigma=0.1)
        applied = c.factor(hosts)
        c.update(hosts, obs, raw_pred * applied, applied=applied)
    assert c.global_factor() == pytest.approx(2.0, rel=0.05)


def test_state_round_trips_through_json():
    rng = np.random.default_rng(6)
    c = DowntimeCorrection(min_obs=5)
    c.update(*synthetic(rng, 100, 1.5, hosts=("h1", "h2", "h3")))
    text = c.to_json()
    doc = json.loads(text)
    assert doc["version"] == 1 and set(doc["hosts"]) == {"h1", "h2", "h3"} and doc["global"][2] == 100
    back = DowntimeCorrection.from_json(text.encode(), min_obs=5)
    hosts = ["h1", "h2", "h3", "zz"]
    assert back.factor(hosts).tolist() == c.factor(hosts).tolist()
    assert back.to_json() == text


@pytest.mark.parametrize(
    "text",
    ["not json", "[]", '{"version": 99, "global": [0, 0, 0]}', '{"version": 1, "global": [0, -1, 0]}',
     '{"version": 1, "global": [0, 1, 1], "hosts": {"h": [1, 2]}}'],
)
def test_invalid_state_is_refused_and_the_old_one_kept(text):
    c = DowntimeCorrection(min_obs=1)
    c.update(["h"], [200.0], [100.0])
    with pytest.raises(ValueError, match="correction state"):
        c.load_json(text)
    assert c.global_factor() == pytest.approx(2.0)


# ---------------------------------------------------------------------------- scorer
class Constant:
    """A correction with a fixed factor per host (the scorer only needs ``factor``)."""

    def __init__(self, by_host: dict[str, float]):
        self.by_host = by_host

    def factor(self, hosts):
        return np.array([self.by_host.get(h, 1.0) for h in hosts])


def scored(correction=None, high=900.0, valley_slot=8):
    s = settings()
    store = WindowStore(s.window_slots, s.slot_s, s.vm_ttl_s)
    rows = fill(store, ["a", "b", "c"], ["h1", "h2", "h1"], mem_used=np.array([8192.0, 4096.0, 16000.0]))
    model = ValleyModel(valley_slot=valley_slot, high=high, horizons=np.arange(1, 25))
    return Scorer(s, lambda: model, correction=correction).score(store, rows, now=T0 + 20)


def columns(b):
    return {n: getattr(b, n) for n in ("best_start", "best_end", "best_downtime_ms", "now_downtime_ms", "p_ok")}


def test_scores_are_bit_identical_without_observations():
    plain = columns(scored())
    for correction in (DowntimeCorrection(), Constant({})):
        for name, a in columns(scored(correction)).items():
            assert a.tobytes() == plain[name].tobytes(), name


def test_kernel_with_unit_factors_is_bit_identical():
    """Even when the factor path runs (factors exactly 1), nothing changes: target / 1 is exact."""
    s = settings()
    store = WindowStore(s.window_slots, s.slot_s, s.vm_ttl_s)
    rows = fill(store, ["a", "b"], ["h1", "h2"])
    win, attrs = store.windows(rows)
    others = store.host_traffic_mbps(rows, exclude_self=True)
    model = ValleyModel(valley_slot=8, high=300.0, horizons=np.arange(1, 25))
    args = (win, attrs, others, model, PrecopyParams(), s.horizon_slots, s.slot_s, np, "cpu")
    plain, ones = score_windows(*args), score_windows(*args, downtime_factor=np.ones(2))
    for name in plain:
        assert ones[name].tobytes() == plain[name].tobytes(), name


def test_a_correction_scales_downtime_per_host():
    plain = scored(high=300.0)
    corrected = scored(Constant({"h1": 3.0}), high=300.0)
    f = np.array([3.0, 1.0, 3.0])
    np.testing.assert_allclose(corrected.now_downtime_ms, plain.now_downtime_ms * f, rtol=1e-6)
    np.testing.assert_allclose(corrected.best_downtime_ms, plain.best_downtime_ms * f, rtol=1e-6)
    np.testing.assert_array_equal(corrected.best_start, plain.best_start)  # a constant factor keeps the valley
    assert corrected.now_downtime_ms[1] == plain.now_downtime_ms[1]


def test_p_ok_uses_the_corrected_target_margin():
    """Dirty rate near the largest converging one: the model's pause must fit target / f."""
    plain = scored(high=900.0, valley_slot=99)
    worse = scored(Constant({"h1": 2.0}), high=900.0, valley_slot=99)
    better = scored(Constant({"h1": 0.5}), high=900.0, valley_slot=99)
    assert 0.05 < plain.p_ok[2] < 0.95  # 16 GB guest: on the edge
    assert worse.p_ok[2] < plain.p_ok[2] < better.p_ok[2]
    assert worse.p_ok[1] == plain.p_ok[1] == better.p_ok[1]  # h2 is not corrected
