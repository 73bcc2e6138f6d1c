"""The Redis sink, the readers and a real worker against a real 3-master Redis Cluster on loopback.

The cluster comes from ``app.redis_cluster`` (``redis-server --cluster-enabled yes``,
``redis-cli --cluster create``); without redis-server / redis-cli the tests skip,
under ``CI`` they fail. Keys follow ``streams.redis_keys`` (cluster layout).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from redis.crc import key_slot

from api.reads import ScoreReads
from app.redis_cluster import cluster_tools, start_redis_cluster
from app.settings import Settings
from streams.curve import decode_curve, encode_curves
from streams.sinks.redis_cluster import ClusterRedisSink
from streams.sinks.redis_sink import RedisSink, WriteResult, read_vm, top
from tests.integration.test_redis_sink import CONTRACT_FIELDS, scores

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

IN_CI = bool(os.environ.get("CI"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    missing = cluster_tools()
    if missing:
        reason = "Redis Cluster test needs " + "; ".join(str(m) for m in missing)
        if IN_CI:
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    c = start_redis_cluster(tmp_path_factory.mktemp("redis-cluster"))
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
async def cenv(cluster, tmp_path: Path):
    """Cluster settings with a per-test prefix, an asyncio cluster client and the key names."""
    settings = Settings.from_env(redis_url=cluster.url, redis_cluster=True, redis_prefix=f"zc-{uuid.uuid4().hex[:8]}:",
                                 state_dir=str(tmp_path / "state"))  # fmt: skip
    client = settings.redis_client()
    yield settings, client, settings.redis_keys()
    keys = [k async for k in client.scan_iter(match=f"{settings.redis_prefix}*", count=1000)]
    if keys:
        await client.delete(*keys)
    await client.aclose()


def _curves(n: int, t0: float = 1.7e9) -> list[bytes]:
    rng = np.random.default_rng(n)
    horizons = np.arange(1, 4)
    return encode_curves(np.full(n, t0), 300, rng.uniform(20, 300, (n, 12)).astype(np.float32), horizons,
                         rng.uniform(0, 100, (n, 3, 3, 2)).astype(np.float32), np.full(n, 1024.0), np.full(n, 256.0),
                         np.ones(n))  # fmt: skip


def _with_curves(batch, curves):
    batch.curves = curves
    return batch


async def test_cluster_keys_share_a_slot_per_vm_and_read_back(cenv) -> None:
    settings, client, k = cenv
    vms = ["a", "b", "odd}id", "{brace", "c"]
    batch = _with_curves(scores(vms, ["h1", "h1", "h2", "h2", ""], now_ms=[120.0, 35.5, 900.0, 50.0, np.nan],
                                last_ts=1.7e9), _curves(len(vms)))  # fmt: skip
    sink = RedisSink(settings, client)
    assert isinstance(sink, ClusterRedisSink)
    assert await sink.write_counts(batch) == WriteResult(5, 0)

    p = settings.redis_prefix
    assert k.vm("a") == f"{p}vm:{{a}}" and k.rank_now == f"{p}{{fleet}}:rank:now"
    for vm in vms:
        assert key_slot(k.vm(vm).encode()) == key_slot(k.curve(vm).encode()), vm
        assert {f.decode() for f in await client.hgetall(k.vm(vm))} == CONTRACT_FIELDS
        assert await client.exists(k.curve(vm)) == 1
    fleet_slot = key_slot(k.rank_now.encode())
    assert {key_slot(x.encode()) for x in (*k.ranks, k.vms, k.hosts, k.host("h1"), k.host("h2"))} == {fleet_slot}
    assert len({key_slot(k.vm(vm).encode()) for vm in vms}) > 1  # VMs spread over slots (and nodes)

    assert [m.decode() for m in await client.zrange(k.rank_now, 0, -1)] == ["b", "{brace", "a", "odd}id", "c"]
    assert await client.zscore(k.rank_now, "c") == float("inf")
    assert await client.zscore(k.rank_window, "b") == 1.8e9 + 300.0
    assert await client.zscore(k.rank_best, "a") == 40.0
    assert {m.decode() for m in await client.smembers(k.host("h1"))} == {"a", "b"}
    assert {m.decode() for m in await client.smembers(k.host("h2"))} == {"odd}id", "{brace"}
    assert {m.decode() for m in await client.smembers(k.hosts)} == {"h1", "h2"}
    assert 0 < await client.ttl(k.host("h1")) <= settings.redis_ttl_s and await client.ttl(k.hosts) > 0
    assert (await client.hget(k.vms, "odd}id")).decode() == "1700000000.0 h2"

    row = await read_vm(client, settings.redis_prefix, "odd}id")
    assert row["host"] == "h2" and row["now_downtime_ms"] == 900.0 and row["last_ts"] == 1.7e9
    assert [r["vm"] for r in await top(client, settings.redis_prefix, 2)] == ["b", "{brace"]
    assert [r["vm"] for r in await top(client, settings.redis_prefix, 10, "h2")] == ["{brace", "odd}id"]

    reads = ScoreReads(client, settings.redis_prefix)
    assert await reads.ping()
    score, curve = await reads.vm_with_curve("a")
    assert score["vm"] == "a" and curve is not None and curve.t0 == 1.7e9
    rows, curves = await reads.host_curves("h2")
    assert [r["vm"] for r in rows] == ["{brace", "odd}id"] and set(curves) == {"{brace", "odd}id"}
    assert await reads.hosts() == [{"host": "h1", "vms": 2}, {"host": "h2", "vms": 2}]
    fleet = await reads.fleet(100.0)
    assert (fleet["vms"], fleet["hosts"], fleet["now_within_target"], fleet["window_within_target"]) == (5, 2, 2, 3)
    await reads.store_plan({"host": "h1", "vms": []}, 60)
    assert await reads.stored_plan("h1") == {"host": "h1", "vms": []}


async def test_newer_wins_on_the_hash_and_on_the_index(cenv) -> None:
    settings, client, k = cenv
    sink = RedisSink(settings, client)
    assert await sink.write_counts(scores(["a", "b"], ["h1", "h1"], now_ms=50.0, last_ts=2.0, model="new")) == (2, 0)
    assert await sink.write_counts(scores(["a", "b"], ["h9", "h9"], now_ms=10.0, last_ts=1.0, model="old")) == (0, 2)
    assert (await read_vm(client, settings.redis_prefix, "a"))["model"] == "new"
    assert await client.zscore(k.rank_now, "a") == 50.0 and not await client.exists(k.host("h9"))

    # a racing worker's index step that lands after a newer one leaves the index at the newer score
    stale = scores(["a"], ["h7"], now_ms=5.0, last_ts=1.5)
    await sink._index([0], sink._columns(stale))
    assert await client.zscore(k.rank_now, "a") == 50.0 and not await client.exists(k.host("h7"))

    # equal last_ts rewrites (a rescore); a host move leaves the old host's set
    assert await sink.write_counts(scores(["a"], ["h2"], now_ms=70.0, last_ts=2.0, model="re")) == (1, 0)
    assert await client.zscore(k.rank_now, "a") == 70.0
    assert {m.decode() for m in await client.smembers(k.host("h1"))} == {"b"}
    assert {m.decode() for m in await client.smembers(k.host("h2"))} == {"a"}


async def test_forget_prune_and_markers(cenv) -> None:
    settings, client, k = cenv
    sink = RedisSink(settings, client)
    vms = ["a", "b", "c", "d"]
    await sink.write_counts(_with_curves(scores(vms, ["h1", "h1", "h2", "h3"], now_ms=30.0, last_ts=5.0), _curves(4)))

    # forget: a VM scored since (newer last_ts) is left alone
    assert await sink.forget(["a", "b"], np.array([5.0, 4.0])) == 1
    assert not await client.exists(k.vm("a"), k.curve("a")) and await client.exists(k.vm("b")) == 1
    assert await client.zscore(k.rank_now, "a") is None and await client.hget(k.vms, "a") is None
    assert {m.decode() for m in await client.smembers(k.host("h1"))} == {"b"}

    # prune: a hash that expired (deleted here) takes its rank and host entries along; an empty host leaves hosts
    await client.delete(k.vm("d"))
    assert await sink.prune(count=2) == 4  # three ranks and one host set
    assert sorted(m.decode() for m in await client.zrange(k.rank_best, 0, -1)) == ["b", "c"]
    assert {m.decode() for m in await client.smembers(k.hosts)} == {"h1", "h2"}
    assert await sink.prune() == 0

    # one marker per primary: any node that lost it (restarted empty) means "write everything again"
    assert not await sink.held_since_last_check("w1")
    assert await sink.held_since_last_check("w1")
    markers = [x async for x in client.scan_iter(match=f"{settings.redis_prefix}worker:*")]
    assert len(markers) == 3 and len({client.get_node_from_key(m).name for m in markers}) == 3
    assert not await sink.lost_since_last_check("w1")
    await client.delete(markers[1])
    assert await sink.lost_since_last_check("w1") and await sink.lost_since_last_check("w1"), "asking sets nothing"
    assert not await sink.held_since_last_check("w1")
    assert await sink.held_since_last_check("w1")


async def test_scripts_are_loaded_again_after_a_script_flush(cenv) -> None:
    settings, client, k = cenv
    sink = RedisSink(settings, client)
    assert await sink.write_counts(scores(["a"], ["h1"], now_ms=1.0, last_ts=1.0)) == (1, 0)
    await client.script_flush()  # every primary: as after a failover to a node that never saw them
    assert await sink.write_counts(scores(["a", "b"], ["h1", "h1"], now_ms=1.0, last_ts=2.0)) == (2, 0)
    assert await client.zcard(k.rank_now) == 2


async def test_a_cluster_outage_fails_each_write_and_writes_resume_when_it_returns(tmp_path: Path) -> None:
    """Every node stopped, then started again from its nodes.conf: writes raise (the worker retries
    them with back-off), nothing warns of an unclosed client, and the same sink and client write again."""
    import gc
    import warnings

    from redis.exceptions import RedisClusterException, RedisError

    if cluster_tools():
        pytest.skip("needs redis-server and redis-cli")
    own = start_redis_cluster(tmp_path / "outage")
    try:
        settings = Settings.from_env(redis_url=own.url, redis_cluster=True, redis_prefix="zo:", state_dir=str(tmp_path / "s"))
        client = settings.redis_client()
        sink = RedisSink(settings, client)
        assert await sink.write_counts(scores(["a", "b"], ["h1", "h2"], now_ms=5.0, last_ts=1.0)) == (2, 0)
        own.stop()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for attempt in range(2):
                with pytest.raises((RedisError, RedisClusterException, OSError)):  # the worker retries any
                    await asyncio.wait_for(sink.write_counts(scores(["a"], ["h1"], now_ms=6.0, last_ts=2.0 + attempt)), 60)
            gc.collect()
        assert not [w for w in caught if "nclosed" in str(w.message)], [str(w.message) for w in caught]
        own.start_nodes()
        own.wait_ok()
        deadline = time.monotonic() + 30
        while True:
            try:
                assert await sink.write_counts(scores(["a", "c"], ["h1", "h3"], now_ms=7.0, last_ts=3.0)) == (2, 0)
                break
            except (RedisError, RedisClusterException):  # until the client has found the nodes again
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)
        assert await client.zcard(settings.redis_keys().rank_now) == 2  # "b" went with the restart (no persistence)
        await client.aclose()
    finally:
        own.stop()


async def test_write_rate_10k_vms_single_node_and_cluster(cenv, services: Settings) -> None:
    """The same 10,000-VM batch (with curves) written to the single Redis and to the cluster, first and again."""
    settings, client, _ = cenv
    n = 10_000
    rng = np.random.default_rng(0)
    batch = _with_curves(scores([f"vm-{i:05d}" for i in range(n)], [f"host-{i % 250}" for i in range(n)],
                                now_ms=rng.uniform(10, 2000, n), last_ts=1.7e9), _curves(n))  # fmt: skip
    single = services.replace(redis_prefix=f"zr-{uuid.uuid4().hex[:8]}:")
    single_client = single.redis_client()
    rates = {}
    try:
        for name, s, c in (("single", single, single_client), ("cluster", settings, client)):
            sink = RedisSink(s, c)
            for attempt in ("first", "again"):
                t0 = time.perf_counter()
                assert await sink.write_counts(batch) == WriteResult(n, 0)
                rates[f"{name} {attempt}"] = n / (time.perf_counter() - t0)
            assert await c.zcard(sink.keys.rank_now) == n
    finally:
        keys = [x async for x in single_client.scan_iter(match=f"{single.redis_prefix}*", count=1000)]
        for i in range(0, len(keys), 1000):
            await single_client.delete(*keys[i : i + 1000])
        await single_client.aclose()
    print("\nRedis sink, 10,000 VMs with curves, VMs/s: " + ", ".join(f"{k} {v:,.0f}" for k, v in rates.items()))
    assert rates["cluster again"] > 1000  # ~10 s for 10k VMs would be a regression, whatever the box


# ------------------------------------------------------------------------------------------------ end to end
def test_a_worker_scores_every_vm_into_the_cluster_and_the_api_reads_it(cluster, unique_topics: Settings,
                                                                         tmp_path: Path) -> None:  # fmt: skip
    from app.api_process import ApiProcess
    from app.model_watch import notify_new_version
    from app.worker_process import WorkerProcess, settings_env
    from tests.integration.api_support import FLEET_HOSTS, FLEET_VMS, simulate_day
    from tests.integration.worker_support import isolated_worker_settings, produce, wait_for_key

    settings = isolated_worker_settings(unique_topics, tmp_path, partitions=2, redis_url=cluster.url,
                                        redis_cluster=True, batch_within_s=0.2)  # fmt: skip
    k = settings.redis_keys()
    worker = WorkerProcess.start(settings, tmp_path / "worker.log", ready_timeout=120)
    try:
        newest = simulate_day(settings)
        client = settings.redis_client(asyncio=False)
        try:
            deadline = time.monotonic() + 60
            while True:
                pipe = client.pipeline(transaction=False)
                for vm in newest:
                    pipe.hget(k.vm(vm), "last_ts")
                behind = [vm for vm, ts in zip(newest, pipe.execute()) if ts is None or float(ts) != newest[vm]]
                if not behind:
                    break
                assert time.monotonic() < deadline, f"{len(behind)} VMs not scored in the cluster:\n{worker.tail()}"
                time.sleep(0.5)
            hashes = {vm: {f.decode(): v.decode() for f, v in client.hgetall(k.vm(vm)).items()} for vm in newest}
            hosts = {h["host"] for h in hashes.values()}
            assert len(hosts) == FLEET_HOSTS and len(newest) == FLEET_VMS
            for vm, h in hashes.items():
                assert set(h) == CONTRACT_FIELDS
                assert decode_curve(client.get(k.curve(vm))).slot_s == settings.slot_s
                assert client.zscore(k.rank_now, vm) == float(h["now_downtime_ms"])
                assert client.zscore(k.rank_window, vm) == float(h["best_start"])
                assert client.zscore(k.rank_best, vm) == float(h["best_downtime_ms"])
                assert client.sismember(k.host(h["host"]), vm)
                assert client.hget(k.vms, vm).decode() == f"{h['last_ts']} {h['host']}"
            assert {m.decode() for m in client.smembers(k.hosts)} == hosts
            assert client.zcard(k.rank_now) == FLEET_VMS
            markers = list(client.scan_iter(match=f"{settings.redis_prefix}worker:*"))
            assert len(markers) == 3  # one per primary
        finally:
            client.close()
        # observed migrations (3x the prediction, read from the VMs' hashes) fold into the shared correction
        migrations = [(vm.encode(), json.dumps({"vm": vm, "start": float(h["last_ts"]) + 60,
                                                "end": float(h["last_ts"]) + 70,
                                                "downtime_ms": 3 * float(h["now_downtime_ms"])}).encode())
                      for vm, h in hashes.items() if 0 < float(h["now_downtime_ms"]) < 1e6]  # fmt: skip
        asyncio.run(produce(settings.replace(topic_metrics=settings.topic_migrations), migrations))
        # the worker folds the migrations in over a few batches: wait for all of them
        state = wait_for_key(settings, k.correction, until=lambda doc: doc["global"][2] >= len(migrations))
        assert state["global"][2] == len(migrations) > 0 and abs(state["global"][0] - math.log(3)) < 1e-6
        notify_new_version(settings, "announced-on-the-cluster")  # pub/sub: any node's PUBLISH reaches the worker
        deadline = time.monotonic() + 15
        while "model store announced 'announced-on-the-cluster'" not in worker.tail(400):
            assert time.monotonic() < deadline, f"the worker did not hear the model announcement:\n{worker.tail()}"
            time.sleep(0.3)
        assert "model pub/sub on" not in worker.tail(400)  # no "unavailable" warning

        host = sorted(hosts)[0]
        out = subprocess.run([sys.executable, "-m", "app.cli", "top", "--host", host, "-n", "3", "--json"],
                             env=settings_env(settings), capture_output=True, text=True, timeout=60)  # fmt: skip
        assert out.returncode == 0, out.stderr
        on_host = sorted((float(h["now_downtime_ms"]), vm) for vm, h in hashes.items() if h["host"] == host)
        assert [r["vm"] for r in json.loads(out.stdout)] == [vm for _, vm in on_host[:3]]

        api = ApiProcess.start(settings, tmp_path / "api.log")
        try:
            vm = sorted(newest)[0]
            status, body = api.get(f"/v1/vms/{vm}")
            assert status == 200 and body["score"]["last_ts"] == newest[vm] and body["curve"] is not None
            host = hashes[vm]["host"]
            status, body = api.get(f"/v1/hosts/{host}")
            assert status == 200 and sorted(v["vm"] for v in body["vms"]) == sorted(
                v for v, h in hashes.items() if h["host"] == host)
            status, body = api.get("/v1/hosts")
            assert status == 200 and {h["host"] for h in body["hosts"]} == hosts
            status, body = api.get("/v1/candidates?n=5")
            assert status == 200 and len(body["candidates"]) == 5
            status, body = api.get("/v1/fleet")
            assert status == 200 and body["vms"] == FLEET_VMS and body["hosts"] == FLEET_HOSTS
            assert api.get("/readyz")[0] == 200
        finally:
            api.stop()
    finally:
        assert worker.stop() == 0, worker.tail()
    asyncio.run(_drop(settings))


async def _drop(settings: Settings) -> None:
    client = settings.redis_client()
    try:
        keys = [x async for x in client.scan_iter(match=f"{settings.redis_prefix}*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()
