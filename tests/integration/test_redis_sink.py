"""Redis sink against a real Redis: contract layout, newer-wins, host moves, top, throughput."""

from __future__ import annotations

import math
import time
import uuid

import numpy as np
import pytest

from app.settings import Settings
from streams.scores import ScoreBatch
from streams.sinks.redis_sink import RedisSink, WriteResult, read_vm, top

pytestmark = pytest.mark.integration

CONTRACT_FIELDS = {
    "best_start", "best_end", "best_downtime_ms", "p_ok", "window_rule", "min_start", "min_end", "min_downtime_ms",
    "min_p_ok", "now_downtime_ms", "now_p_ok", "now_total_s", "downtime_factor", "model", "last_ts", "updated", "host",
}  # fmt: skip


def scores(vms: list[str], hosts: list[str], *, now_ms, last_ts, model: str = "m1", start: float = 1.8e9) -> ScoreBatch:
    n = len(vms)
    now_ms = np.broadcast_to(np.asarray(now_ms, np.float32), (n,)).copy()
    best_start = start + np.arange(n) * 300.0
    min_start = best_start + 3600.0 * (1 + np.arange(n))
    return ScoreBatch(
        vm=vms, host=hosts, best_start=best_start, best_end=best_start + 600.0,
        best_downtime_ms=np.full(n, 40.0, np.float32), p_ok=np.linspace(0.5, 1.0, n, dtype=np.float32),
        window_rule=np.asarray(["now", "fits", "minimum"])[np.arange(n) % 3],
        min_start=min_start, min_end=min_start + 612.345, min_downtime_ms=np.full(n, 38.25, np.float32),
        min_p_ok=np.linspace(0.4, 0.9, n, dtype=np.float32), now_downtime_ms=now_ms,
        now_p_ok=np.linspace(0.3, 0.8, n, dtype=np.float32), now_total_s=np.linspace(7.5, 300.25, n, dtype=np.float32),
        downtime_factor=np.linspace(0.5, 2.0, n, dtype=np.float32),
        last_ts=np.broadcast_to(np.asarray(last_ts, np.float64), (n,)).copy(), model=model, updated=1.7e9 + 7.0,
    )  # fmt: skip


@pytest.fixture
async def env(services: Settings):
    """A Settings with a per-test key prefix (tests never see each other's keys) and a client."""
    settings = services.replace(redis_prefix=f"zt-{uuid.uuid4().hex[:8]}:")
    client = settings.redis_client()
    yield settings, client
    keys = [k async for k in client.scan_iter(match=f"{settings.redis_prefix}*", count=1000)]
    for i in range(0, len(keys), 1000):
        await client.delete(*keys[i:i + 1000])
    await client.aclose()


async def test_contract_keys_and_fields(env):
    settings, client = env
    p = settings.redis_prefix
    batch = scores(["a", "b", "c"], ["h1", "h1", "h2"], now_ms=[120.0, 35.5, 900.0], last_ts=1.7e9)
    assert await RedisSink(settings, client).write_counts(batch) == WriteResult(3, 0)

    raw = await client.hgetall(f"{p}vm:b")
    assert {k.decode() for k in raw} == CONTRACT_FIELDS
    row = await read_vm(client, p, "b")
    assert row["host"] == "h1" and row["model"] == "m1"
    assert row["now_downtime_ms"] == pytest.approx(35.5)
    assert row["best_start"] == batch.best_start[1] and row["best_end"] == batch.best_end[1]
    assert row["last_ts"] == 1.7e9 and row["updated"] == batch.updated
    assert row["p_ok"] == pytest.approx(0.75, abs=1e-4)
    assert row["window_rule"] == "fits"  # a string, not decoded as a number
    assert row["min_start"] == batch.min_start[1] and row["min_end"] == batch.min_end[1]
    assert row["min_downtime_ms"] == 38.25 and row["min_p_ok"] == pytest.approx(0.65, abs=1e-4)
    assert row["now_p_ok"] == pytest.approx(0.55, abs=1e-4)
    assert row["now_total_s"] == pytest.approx(float(batch.now_total_s[1]), abs=1e-3)
    assert row["downtime_factor"] == pytest.approx(float(batch.downtime_factor[1]), abs=1e-4)
    assert all(isinstance(row[f], float) for f in CONTRACT_FIELDS - {"window_rule", "model", "host"})
    assert await client.zrange(f"{p}rank:now", 0, -1, withscores=True) == [(b"b", 35.5), (b"a", 120.0), (b"c", 900.0)]
    assert await client.zscore(f"{p}rank:window", "c") == batch.best_start[2]
    assert await client.smembers(f"{p}host:h1") == {b"a", b"b"}
    assert await client.smembers(f"{p}host:h2") == {b"c"}
    assert await read_vm(client, p, "nope") is None


async def test_older_sample_never_overwrites_newer(env):
    settings, client = env
    p = settings.redis_prefix
    sink = RedisSink(settings, client)
    assert await sink.write(scores(["a", "b"], ["h1", "h1"], now_ms=50.0, last_ts=2000.0, model="new")) == 2
    stale = scores(["a", "b"], ["h9", "h9"], now_ms=999.0, last_ts=1000.0, model="old")
    assert await sink.write_counts(stale) == WriteResult(0, 2)
    row = await read_vm(client, p, "a")
    assert (row["model"], row["now_downtime_ms"], row["last_ts"], row["host"]) == ("new", 50.0, 2000.0, "h1")
    assert await client.zscore(f"{p}rank:now", "a") == 50.0
    assert not await client.exists(f"{p}host:h9")
    # same sample, re-scored (e.g. a new model): allowed; mixed batch: only the stale VM is skipped
    mixed = scores(["a", "b"], ["h1", "h1"], now_ms=[60.0, 70.0], last_ts=[2000.0, 1999.0], model="m2")
    assert await sink.write_counts(mixed) == WriteResult(1, 1)
    assert (await read_vm(client, p, "a"))["model"] == "m2"
    assert (await read_vm(client, p, "b"))["model"] == "new"


async def test_host_change_moves_set_membership(env):
    settings, client = env
    p = settings.redis_prefix
    sink = RedisSink(settings, client)
    await sink.write(scores(["a", "b"], ["h1", "h1"], now_ms=10.0, last_ts=100.0))
    await sink.write(scores(["a"], ["h2"], now_ms=10.0, last_ts=200.0))
    assert await client.smembers(f"{p}host:h1") == {b"b"}
    assert await client.smembers(f"{p}host:h2") == {b"a"}
    assert (await read_vm(client, p, "a"))["host"] == "h2"


async def test_top_lowest_downtime_first_and_by_host(env):
    settings, client = env
    p = settings.redis_prefix
    sink = RedisSink(settings, client)
    now_ms = [500.0, 20.0, np.nan, 80.0, np.inf]  # NaN (unknown) and inf (never converges) rank last
    await sink.write(scores(["a", "b", "c", "d", "e"], ["h1", "h2", "h1", "h1", "h2"], now_ms=now_ms, last_ts=1.0))
    assert [r["vm"] for r in await top(client, p, 3)] == ["b", "d", "a"]
    on_h1 = await top(client, p, 10, host="h1")
    assert [r["vm"] for r in on_h1] == ["d", "a", "c"]
    assert math.isinf(on_h1[-1]["now_downtime_ms"])
    assert all(r["host"] == "h1" for r in on_h1)
    assert await top(client, p, 10, host="nowhere") == []
    assert [r["vm"] for r in await top(client, p, 1, host="h2")] == ["b"]


async def test_pipeline_throughput_10k_vms(env):
    settings, client = env
    p = settings.redis_prefix
    n = 10_000
    rng = np.random.default_rng(0)
    batch = scores([f"vm-{i:05d}" for i in range(n)], [f"host-{i % 250}" for i in range(n)],
                   now_ms=rng.uniform(10, 2000, n), last_ts=1.7e9)
    sink = RedisSink(settings, client)
    t0 = time.perf_counter()
    result = await sink.write_counts(batch)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = await sink.write_counts(batch)  # steady state: every VM already has a hash
    second = time.perf_counter() - t0
    print(f"\nRedisSink: {n} VMs written in {first:.3f} s ({n / first:,.0f} VMs/s); rewrite {second:.3f} s ({n / second:,.0f} VMs/s)")
    assert result == WriteResult(n, 0) and again == WriteResult(n, 0)
    assert await client.zcard(f"{p}rank:now") == n
    assert await client.scard(f"{p}host:host-7") == n // 250
    best = await top(client, p, 5)
    assert [r["now_downtime_ms"] for r in best] == sorted(r["now_downtime_ms"] for r in best)
    assert best[0]["now_downtime_ms"] == pytest.approx(float(np.round(batch.now_downtime_ms.min(), 3)))


async def test_redis_errors_propagate(env):
    settings, client = env
    await client.set(f"{settings.redis_prefix}rank:now", "not a zset")  # WRONGTYPE inside the script
    import redis

    with pytest.raises(redis.ResponseError):
        await RedisSink(settings, client).write(scores(["a"], ["h1"], now_ms=1.0, last_ts=1.0))
