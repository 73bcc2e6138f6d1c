"""vm.migrations: decoding, the learned downtime correction, and its effect on the scorer."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from gpu_kernels.downtime import PrecopyParams
from streams.migrations import CORRECTION_KEY, DowntimeCorrection, decode_migrations, handle_migrations
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


EXECUTOR = dict(total_ms=21_500.0, converged=True, predicted_downtime_ms=70.5, predicted_total_ms=19_000,
                predicted_factor=1.25, predicted_at=NOW - 75, model="pc-2024.06.1", downtime_limit_ms=300,
                policy="ramp")  # fmt: skip
NEW_NUM = ("total_ms", "converged", "predicted_downtime_ms", "predicted_total_ms", "predicted_factor", "predicted_at",
           "downtime_limit_ms")  # fmt: skip


def test_decodes_the_executor_fields():
    b = decode_migrations([enc(msg(**EXECUTOR))], now=NOW)
    assert b.rejected == [] and len(b) == 1
    assert b.model == ["pc-2024.06.1"] and b.policy == ["ramp"]
    assert [getattr(b, f)[0] for f in NEW_NUM] == [21_500.0, 1.0, 70.5, 19_000.0, 1.25, NOW - 75, 300.0]
    assert all(getattr(b, f).dtype == np.float64 for f in NEW_NUM)
    aborted = decode_migrations([enc(msg(converged=False, policy="abort"))], now=NOW)
    assert aborted.converged.tolist() == [0.0] and aborted.policy == ["abort"]


def test_optional_fields_may_be_missing_or_null():
    b = decode_migrations([enc(msg(bytes=None, converged=None, model=None, predicted_at=None))], now=NOW)
    assert len(b) == 1 and b.host_from == [""] and b.model == [""] and b.policy == [""]
    assert np.isnan(b.transferred_bytes[0]) and np.isnan(b.rounds[0]) and np.isnan(b.link_mbps[0])
    assert all(np.isnan(getattr(b, f)[0]) for f in NEW_NUM)


def test_old_format_messages_decode_as_before():
    """A message without the executor fields: same columns as before, the new ones NaN / ""."""
    old = msg(bytes=8.5e9, rounds=4, host_from="h1", host_to="h2", link_mbps=1250)
    b, both = decode_migrations([enc(old)], now=NOW), decode_migrations([enc(old), enc(msg(**EXECUTOR))], now=NOW)
    assert b.rejected == both.rejected == []
    for f in ("start", "end", "downtime_ms", "transferred_bytes", "rounds", "link_mbps"):
        assert getattr(b, f).tolist() == getattr(both, f)[:1].tolist(), f
    assert all(np.isnan(getattr(both, f)[0]) for f in NEW_NUM) and both.model[0] == both.policy[0] == ""


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
        # the executor's fields
        (msg(total_ms=-1), "total_ms: must be >= 0"),
        (msg(total_ms="21s"), "total_ms: expected number | null, got str"),
        (msg(total_ms=86_400_001), "total_ms: must be <= 86400000"),
        (msg(converged=1), "converged: expected bool | null, got int"),
        (msg(converged="false"), "converged: expected bool | null, got str"),
        (msg(predicted_downtime_ms=-0.5), "predicted_downtime_ms: must be >= 0"),
        (msg(predicted_downtime_ms=1e38), "predicted_downtime_ms: must be <= 86400000"),
        (msg(predicted_total_ms=-1), "predicted_total_ms: must be >= 0"),
        (msg(predicted_total_ms=1e12), "predicted_total_ms: must be <= 86400000"),
        (msg(predicted_factor=0), "predicted_factor: must be > 0"),
        (msg(predicted_factor=1001), "predicted_factor: must be <= 1000"),
        (msg(predicted_at=1.0), "predicted_at: 1 is before 946684800"),
        (msg(predicted_at=NOW + 601), "predicted_at: 1700000701 is more than 600 s in the future"),
        (msg(predicted_at="yesterday"), "predicted_at: expected number | null, got str"),
        (msg(model="m" * 257), "model: length must be <= 256"),
        (msg(model=7), "model: expected str | null, got int"),
        (msg(model="v1\u0000"), "model: must not contain control characters"),
        (msg(downtime_limit_ms=0), "downtime_limit_ms: must be > 0"),
        (msg(downtime_limit_ms=-300), "downtime_limit_ms: must be > 0"),
        (msg(downtime_limit_ms=1e9), "downtime_limit_ms: must be <= 86400000"),
        (msg(policy="p" * 65), "policy: length must be <= 64"),
        (msg(policy="abort\n"), "policy: must not contain control characters"),
    ],
)
def test_invalid_messages_are_rejected_with_a_reason(obj, reason):
    raw = enc(obj)
    b = decode_migrations([raw], [b"k"], now=NOW)
    assert len(b) == 0
    assert b.rejected == [Rejected(raw=raw, key=b"k", reason=b.rejected[0].reason, index=0)]
    assert reason in b.rejected[0].reason


def test_limits_bound_migrations_inclusively_and_are_parameters():
    at_bounds = msg(end=NOW + 600, downtime_ms=86_400_000, bytes=2.0**60, link_mbps=1e6, rounds=1_000_000,
                    total_ms=86_400_000, predicted_downtime_ms=86_400_000, predicted_total_ms=86_400_000,
                    downtime_limit_ms=86_400_000, predicted_at=NOW + 600, model="m" * 256, policy="p" * 64)
    assert len(decode_migrations([enc(at_bounds)], now=NOW)) == 1
    zeros = msg(total_ms=0, predicted_downtime_ms=0, predicted_total_ms=0, predicted_at=946684800, model="", policy="")
    assert len(decode_migrations([enc(zeros)], now=NOW)) == 1
    later = enc(msg(end=NOW + 3600))
    assert len(decode_migrations([later], now=NOW)) == 0
    assert len(decode_migrations([later], now=NOW, limits=Limits(max_future_s=86400))) == 1
    long = enc(msg(downtime_ms=2 * 86_400_000, rounds=5_000_000, total_ms=2e8, predicted_downtime_ms=2e8))
    assert len(decode_migrations([long], now=NOW)) == 0
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
    executor = enc([msg(vm="e", **EXECUTOR), msg(vm="f"), msg(vm="g", total_ms=-1), msg(vm="h", converged=0)])
    b = decode_migrations([executor], now=NOW)
    assert b.vm == ["e", "f"] and b.converged.tolist()[:1] == [1.0] and np.isnan(b.converged[1])
    assert b.rejected[0].reason == "[2].total_ms: must be >= 0; [3].converged: expected bool | null, got int"


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


# ---------------------------------------------------------------------------- handle_migrations
class FakeRedis:
    """What ``handle_migrations`` uses: pipelined HMGET, and GET then SET under WATCH/MULTI."""

    def __init__(self, scores: dict[str, dict[str, Any]] | None = None, prefix: str = "zt:") -> None:
        scores = scores or {}
        self.hashes = {f"{prefix}vm:{vm}": {k: str(v).encode() for k, v in h.items()} for vm, h in scores.items()}
        self.strings: dict[str, bytes] = {}
        self.hmget_keys: list[str] = []

    def pipeline(self, transaction: bool = True) -> FakePipeline:
        return FakePipeline(self)


class FakePipeline:
    def __init__(self, redis: FakeRedis) -> None:
        self.redis = redis
        self.queued: list[Callable[[], Any]] = []  # run by execute(), as Redis runs a pipeline

    async def __aenter__(self) -> FakePipeline:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def hmget(self, key: str, *fields: str) -> None:
        self.redis.hmget_keys.append(key)
        self.queued.append(lambda: [self.redis.hashes.get(key, {}).get(f) for f in fields])

    async def watch(self, key: str) -> None:
        return None

    async def get(self, key: str) -> bytes | None:  # immediate while watching
        return self.redis.strings.get(key)

    def multi(self) -> None:
        return None

    def set(self, key: str, value: str) -> None:
        self.queued.append(lambda: self.redis.strings.__setitem__(key, value.encode()))

    async def execute(self) -> list[Any]:
        queued, self.queued = self.queued, []
        return [f() for f in queued]


P = "zt:"


def shared(redis: FakeRedis, **config: Any) -> DowntimeCorrection:
    return DowntimeCorrection.from_json(redis.strings[P + CORRECTION_KEY], **config)


async def handle(redis: FakeRedis, correction: DowntimeCorrection, messages: list[dict], **kw: Any):
    kw = {"now": NOW, "scores_corrected": False, **kw}
    return await handle_migrations([enc(m) for m in messages], None, correction=correction, redis_client=redis,
                                   prefix=P, **kw)


SCORE = {"now_downtime_ms": 100.0, "host": "h1", "last_ts": NOW - 90}  # fresh for msg(): start NOW - 60, end NOW - 30


async def test_old_format_messages_keep_comparing_with_the_redis_score():
    redis = FakeRedis({"a": SCORE, "new": {**SCORE, "last_ts": NOW - 10}, "old": {**SCORE, "last_ts": NOW - 7200}})
    c = DowntimeCorrection(min_obs=1)
    got = await handle(redis, c, [msg(vm="a", downtime_ms=300.0), msg(vm="new"), msg(vm="old"), msg(vm="none")])
    assert got == []
    assert c.counts == {"used": 1, "no_score": 1, "stale": 2, "not_converged": 0, "rejected": 0,
                        "message_prediction": 0}
    assert shared(redis, min_obs=1).factor(["h1"])[0] == pytest.approx(3.0)  # the score's host


async def test_a_prediction_in_the_message_needs_no_redis_row():
    redis = FakeRedis()
    c = DowntimeCorrection(min_obs=10)
    got = await handle(redis, c, [msg(vm=f"v{i}", downtime_ms=250.0, predicted_downtime_ms=100.0, host_from="h7")
                                  for i in range(12)])
    assert got == [] and redis.hmget_keys == []  # not even a round trip
    assert c.counts["used"] == c.counts["message_prediction"] == 12 and c.counts["no_score"] == 0
    learned = shared(redis, min_obs=10)
    assert learned.observations == 12 and learned.factor(["h7"])[0] == pytest.approx(2.5)


async def test_the_message_prediction_wins_over_the_current_score():
    """Redis says 1000 ms (recomputed since, and newer than ``end``); the message says what was in force: 100."""
    redis = FakeRedis({"a": {"now_downtime_ms": 1000.0, "host": "h-dest", "last_ts": NOW}, "b": SCORE})
    c = DowntimeCorrection(min_obs=1)
    await handle(redis, c, [msg(vm="a", downtime_ms=200.0, predicted_downtime_ms=100.0),
                            msg(vm="b", downtime_ms=200.0)])
    assert redis.hmget_keys == [P + "vm:b"]  # only the row without its own prediction is read
    assert c.counts["used"] == 2 and c.counts["message_prediction"] == 1 and c.counts["stale"] == 0
    learned = shared(redis, min_obs=1)
    assert learned.global_factor() == pytest.approx(2.0)  # both 2x: a/100, b/100 (not a/1000)
    assert set(json.loads(redis.strings[P + CORRECTION_KEY])["hosts"]) == {"h1"}  # a: no host_from, not h-dest


async def test_a_message_prediction_of_zero_is_not_usable():
    c = DowntimeCorrection(min_obs=1)
    redis = FakeRedis({"a": SCORE})
    await handle(redis, c, [msg(vm="a", predicted_downtime_ms=0.0)])
    assert redis.hmget_keys == [] and c.counts["no_score"] == 1 and c.counts["used"] == 0
    assert P + CORRECTION_KEY not in redis.strings


async def test_a_corrected_message_prediction_has_the_current_factor_divided_out():
    redis = FakeRedis()
    c = DowntimeCorrection(min_obs=1)
    await handle(redis, c, [msg(downtime_ms=200.0, predicted_downtime_ms=100.0, host_from="h1")])
    assert c.factor(["h1"])[0] == pytest.approx(2.0)
    # a scorer applying f = 2 predicted 200 for a model output of 100; observed 200: the factor stays 2
    await handle(redis, c, [msg(downtime_ms=200.0, predicted_downtime_ms=200.0, host_from="h1")],
                 scores_corrected=True)
    assert c.factor(["h1"])[0] == pytest.approx(2.0) and c.observations == 2


async def test_the_factor_a_score_was_made_with_is_divided_out_not_the_current_one():
    """The correction is 2 now; the Redis score (300 ms) was made with 3, the message's prediction (150) with 1.5."""
    redis = FakeRedis({"a": {**SCORE, "now_downtime_ms": 300.0, "downtime_factor": 3.0}})
    c = DowntimeCorrection(min_obs=1)
    c.update(["h1"], [200.0], [100.0])
    assert c.factor(["h1"])[0] == pytest.approx(2.0)
    await handle(redis, c, [msg(vm="a", downtime_ms=300.0, host_from="h1"),
                            msg(vm="b", downtime_ms=300.0, predicted_downtime_ms=150.0, predicted_factor=1.5,
                                host_from="h1")], scores_corrected=True)  # fmt: skip
    # both model outputs were 100 ms and both pauses 300: each observation is a 3
    learned = json.loads(redis.strings[P + CORRECTION_KEY])
    assert learned["hosts"]["h1"][2] == 2 and learned["hosts"]["h1"][0] == pytest.approx(np.log(3.0))


async def test_not_converged_migrations_are_counted_and_logged_but_not_learned(caplog):
    redis = FakeRedis({"a": SCORE, "b": SCORE, "c": SCORE})
    c = DowntimeCorrection(min_obs=1)
    batch = [msg(vm="a", downtime_ms=300.0, converged=True),
             msg(vm="b", downtime_ms=90_000.0, converged=False, policy="force"),  # forced switch-over: a long pause
             msg(vm="c", downtime_ms=0.0, converged=False, predicted_downtime_ms=100.0),  # aborted
             msg(vm="d", downtime_ms=5.0, converged=False)]  # no score either: counted once, as not converged
    with caplog.at_level(logging.INFO, logger="streams.migrations"):
        assert await handle(redis, c, batch) == []
    assert redis.hmget_keys == [P + "vm:a"]
    assert c.counts["used"] == 1 and c.counts["not_converged"] == 3 and c.counts["no_score"] == 0
    learned = shared(redis, min_obs=1)
    assert learned.observations == 1 and learned.global_factor() == pytest.approx(3.0)
    assert "3 did not converge, not learned from: b (policy force), c (policy ?), d (policy ?)" in caplog.text
    assert "1 used (0 with their own prediction), 0 without score, 0 stale, 3 not converged" in caplog.text


async def test_a_batch_of_only_not_converged_migrations_touches_no_state():
    redis = FakeRedis({"a": SCORE})
    c = DowntimeCorrection(min_obs=1)
    await handle(redis, c, [msg(vm="a", converged=False, policy="abort")])
    assert redis.hmget_keys == [] and redis.strings == {} and c.counts["not_converged"] == 1


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
