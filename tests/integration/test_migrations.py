"""vm.migrations against a real Redis: scores read in one pipeline, shared correction state."""

from __future__ import annotations

import asyncio
import json
import uuid

import numpy as np
import pytest

from app.settings import Settings
from streams.migrations import CORRECTION_KEY, DowntimeCorrection, handle_migrations
from streams.sinks.redis_sink import RedisSink

NOW = 1_700_000_000.0


@pytest.fixture
async def aredis(services: Settings):
    """An async client plus a prefix of its own (keys removed afterwards)."""
    client = services.redis_client()
    prefix = f"zt-{uuid.uuid4().hex[:8]}:"
    try:
        yield client, prefix
    finally:
        keys = [k async for k in client.scan_iter(match=prefix + "*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


async def seed(client, prefix, vms, host, now_ms=100.0, last_ts=NOW - 100):
    async with client.pipeline(transaction=False) as pipe:
        for vm in vms:
            pipe.hset(f"{prefix}vm:{vm}", mapping={"now_downtime_ms": now_ms, "host": host, "last_ts": last_ts})
        await pipe.execute()


def migration(vm, downtime_ms, **kw):
    return json.dumps({"vm": vm, "start": NOW, "end": NOW + 20, "downtime_ms": downtime_ms, **kw}).encode()


async def test_two_workers_fold_their_shares_into_one_shared_correction(aredis):
    client, prefix = aredis
    await seed(client, prefix, [f"a{i}" for i in range(20)], "h1")
    await seed(client, prefix, [f"b{i}" for i in range(20)], "h2")
    await seed(client, prefix, ["old"], "h2", last_ts=NOW - 86400)
    w1, w2 = DowntimeCorrection(min_obs=10), DowntimeCorrection(min_obs=10)
    kw = dict(redis_client=client, prefix=prefix, now=NOW + 60, scores_corrected=False)
    batch1 = [migration(f"a{i}", 300.0) for i in range(20)]
    bad = migration("a0", -5.0)
    batch2 = [json.dumps([json.loads(migration(f"b{i}", 50.0)) for i in range(20)]).encode(), bad,
              migration("unscored", 80.0), migration("old", 80.0, host_from="h2")]
    rej1 = await handle_migrations(batch1, None, correction=w1, **kw)
    rej2 = await handle_migrations(batch2, [None, b"a0", b"unscored", b"old"], correction=w2, **kw)
    assert rej1 == []
    assert [(r.raw, r.key) for r in rej2] == [(bad, b"a0")] and "downtime_ms: must be >= 0" in rej2[0].reason
    assert w2.counts["no_score"] == 1 and w2.counts["stale"] == 1 and w2.counts["used"] == 20

    fresh = DowntimeCorrection(min_obs=10)
    assert await fresh.load(client, prefix)
    assert fresh.observations == 40  # neither worker overwrote the other's observations
    h1, h2, other = fresh.factor(["h1", "h2", "h3"])
    assert h1 == pytest.approx(3.0) and h2 == pytest.approx(0.5)
    assert other == pytest.approx(fresh.global_factor()) and 0.5 < other < 3.0
    assert (await client.get(prefix + CORRECTION_KEY)).decode() == fresh.to_json()


async def test_concurrent_updates_are_not_lost(aredis):
    client, prefix = aredis
    workers = [DowntimeCorrection(min_obs=1) for _ in range(4)]
    ones = np.ones(25)
    await asyncio.gather(*[
        w.update_shared(client, prefix, ["h"] * 25, 2 * ones, ones) for w in workers for _ in range(3)
    ])
    shared = DowntimeCorrection(min_obs=1)
    assert await shared.load(client, prefix)
    assert shared.observations == 4 * 3 * 25
    assert shared.global_factor() == pytest.approx(2.0)


async def test_invalid_shared_state_is_ignored_on_load(aredis):
    client, prefix = aredis
    await client.set(prefix + CORRECTION_KEY, b"garbage")
    c = DowntimeCorrection(min_obs=1)
    c.update(["h"], [200.0], [100.0])
    assert not await c.load(client, prefix)
    assert c.global_factor() == pytest.approx(2.0)


async def test_deleting_the_shared_state_resets_every_worker(aredis):
    client, prefix = aredis
    c = DowntimeCorrection(min_obs=1)
    await c.update_shared(client, prefix, ["h"], [300.0], [100.0])
    assert c.global_factor() == pytest.approx(3.0)
    await client.delete(prefix + CORRECTION_KEY)
    assert not await c.load(client, prefix)
    assert c.global_factor() == 1.0 and c.observations == 0


async def test_a_correction_lost_with_the_rest_of_redis_is_written_back_not_reset(services: Settings, aredis):
    """Redis restarted empty (simulated: every key of the prefix gone, this worker's marker with them).

    A worker that held the state writes it back at its next reload, and a
    migration folded in before that goes on from it; only an absent correction
    *beside* a surviving marker is an operator's ``DEL``, and resets.
    """
    client, prefix = aredis
    sink = RedisSink(services.replace(redis_prefix=prefix), client)
    await sink.held_since_last_check("w1")  # the worker's marker, as at its start
    c = DowntimeCorrection(min_obs=10, redis_lost=lambda: sink.lost_since_last_check("w1"))
    await c.update_shared(client, prefix, ["h"] * 20, np.full(20, 300.0), np.full(20, 100.0))

    async def lose_everything() -> None:
        await client.delete(*[k async for k in client.scan_iter(match=prefix + "*")])

    await lose_everything()
    assert await c.load(client, prefix)
    assert c.global_factor() == pytest.approx(3.0)
    assert await DowntimeCorrection().load(client, prefix), "the state must be back in Redis for every worker"

    await lose_everything()
    await c.update_shared(client, prefix, ["h"], [300.0], [100.0])
    fresh = DowntimeCorrection(min_obs=10)
    assert await fresh.load(client, prefix) and fresh.observations == 21

    await sink.held_since_last_check("w1")  # the marker is back (the worker's own check re-scores its VMs)
    await client.delete(prefix + CORRECTION_KEY)
    assert not await c.load(client, prefix)
    assert c.observations == 0 and c.global_factor() == 1.0


async def test_a_message_that_carries_its_prediction_is_learned_against_it(aredis):
    """The executor reports the prediction in force at ``start`` (100 ms); the score in Redis says 400 ms now.

    Observed 200 ms: the correction must be 2 (following the message), not 0.5
    (following Redis). Old-format messages in the same batch still use Redis, and
    a migration that did not converge is not learned from.
    """
    client, prefix = aredis
    await seed(client, prefix, [f"p{i}" for i in range(10)], "h4", now_ms=400.0)  # fresh: today's path would use it
    await seed(client, prefix, [f"o{i}" for i in range(10)], "h9", now_ms=100.0)
    own = [migration(f"p{i}", 200.0, predicted_downtime_ms=100.0, predicted_at=NOW - 40, model="v1",
                     host_from="h4", total_ms=20_000, converged=True) for i in range(10)]
    old = [migration(f"o{i}", 50.0) for i in range(10)]
    aborted = migration("p0", 60_000.0, converged=False, policy="force", host_from="h4")
    c = DowntimeCorrection(min_obs=10)
    rej = await handle_migrations([*own, *old, aborted], None, correction=c, redis_client=client, prefix=prefix,
                                  now=NOW + 60, scores_corrected=False)
    assert rej == []
    assert c.counts["used"] == 20 and c.counts["message_prediction"] == 10
    assert c.counts["stale"] == 0 and c.counts["no_score"] == 0 and c.counts["not_converged"] == 1

    fresh = DowntimeCorrection(min_obs=10)
    assert await fresh.load(client, prefix)
    assert fresh.observations == 20
    h4, h9 = fresh.factor(["h4", "h9"])
    assert h4 == pytest.approx(2.0) and h9 == pytest.approx(0.5)


async def test_a_burst_is_learned_against_the_correction_each_score_was_made_with(aredis):
    """A drain reports 20 migrations, handled in two batches; the scores in Redis all predate them.

    The first batch lifts the correction from 1 to 3, so the second batch's
    scores (still the uncorrected ones) must be divided by the factor they were
    made with, recorded in the hash, not by the 3 in force when they are
    handled: otherwise the burst learns 9 instead of 3. A score made with a
    factor of 2 (now 200 ms, so 100 ms uncorrected) that meets 300 ms is a 3 too.
    """
    client, prefix = aredis
    await seed(client, prefix, [f"d{i}" for i in range(20)], "h5", now_ms=100.0)
    async with client.pipeline(transaction=False) as pipe:
        for i in range(20):
            pipe.hset(f"{prefix}vm:d{i}", "downtime_factor", 1.0)
        await pipe.execute()
    c = DowntimeCorrection(min_obs=10)
    kw = dict(correction=c, redis_client=client, prefix=prefix, now=NOW + 60, scores_corrected=True)
    for part in (range(10), range(10, 20)):
        assert await handle_migrations([migration(f"d{i}", 300.0) for i in part], None, **kw) == []
    assert c.counts["used"] == 20
    assert c.factor(["h5"])[0] == pytest.approx(3.0)

    await seed(client, prefix, ["e0"], "h6", now_ms=200.0)
    await client.hset(f"{prefix}vm:e0", "downtime_factor", 2.0)
    assert await handle_migrations([migration("e0", 300.0)], None, **kw) == []
    state = json.loads(await client.get(prefix + CORRECTION_KEY))
    assert state["hosts"]["h6"][0] == pytest.approx(np.log(3.0))
