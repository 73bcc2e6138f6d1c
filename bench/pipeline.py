"""`zhuge bench pipeline`: the worker end to end against two references, same run, same topic.

For each message shape (host-batched, per-VM) it produces K samples of a
simulated fleet into a fresh topic, then measures over that topic:

- ``raw_consume_per_s``: a bare aiokafka consumer reading every record;
- ``reference_per_s``: a minimal complete pipeline, a bare consumer that decodes
  each sample and writes one pipelined Redis HSET per sample (no windows, no model);
- ``e2e_samples_per_s``: a real ``zhuge worker`` process (Faust, windows,
  features, forecast, downtime, window search, Redis, vm.scores) from its first
  to its last processed sample;
- ``p50_ms``/``p99_ms``: produce-to-score latency at an offered load of half the
  measured e2e maximum, from the ``vm.scores`` records (Kafka CreateTime of the
  score minus the sample's ``ts``, which the producer stamps at send time).

With the default settings every sample re-scores its VM (``rescore_s`` 0); the
forecaster runs once per VM per slot, the downtime/window part on every score.
"""

from __future__ import annotations

import asyncio
import os
import platform
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import numpy as np

from app.settings import Settings
from app.worker_process import WorkerProcess
from sim.fleet import FIELDS, series
from sim.produce import encode_rows, producer_kwargs, send_records

SLOT_S = 300


@dataclass
class ShapeResult:
    shape: str
    samples: int
    messages: int
    raw_consume_per_s: float
    reference_per_s: float
    e2e_samples_per_s: float
    p50_ms: float
    p99_ms: float
    offered_per_s: float

    @property
    def ratio(self) -> float:
        return self.e2e_samples_per_s / self.reference_per_s if self.reference_per_s else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["ratio"] = round(self.ratio, 3)
        return {k: (round(v, 1) if isinstance(v, float) else v) for k, v in d.items()}


def fleet_records(vms: int, hosts: int, steps: int, *, batched: bool, end_ts: float, seed: int = 3) -> list[tuple[bytes, bytes]]:
    """``steps`` periods of a simulated fleet ending at ``end_ts``, in time order."""
    data = series(vms, hosts, end_ts - steps * SLOT_S, steps, SLOT_S, seed)
    records: list[tuple[bytes, bytes]] = []
    vm = [str(v) for v in data["vm"]]
    host = [str(h) for h in data["host"]]
    for t in range(steps):
        cols = {f: data[f][t] for f in FIELDS}
        ts = np.full(vms, data["ts"][t], dtype=np.float64)
        records.extend(encode_rows(vm, ts, cols, host, batched=batched))
    return records


async def _produce(settings: Settings, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(**producer_kwargs(settings))
    await producer.start()
    try:
        await send_records(producer, topic, records)
    finally:
        await producer.stop()


async def _consume_rate(
    settings: Settings, topic: str, n_messages: int, samples: int, handle: Callable[[list[Any]], Awaitable[None]] | None
) -> float:
    """Samples/s of a bare consumer reading ``n_messages`` from the start, ``handle`` called per fetch."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(topic, group_id=None, auto_offset_reset="earliest", enable_auto_commit=False, **settings.aiokafka_kwargs())
    await consumer.start()
    try:
        seen, t0 = 0, time.perf_counter()  # from the first fetch on: a one-fetch topic is not "instant"
        while seen < n_messages:
            batch = await consumer.getmany(timeout_ms=1000, max_records=10_000)
            records = [rec for recs in batch.values() for rec in recs]
            if handle is not None:
                await handle(records)
            seen += len(records)
        return samples / (time.perf_counter() - t0)
    finally:
        await consumer.stop()


async def raw_consume_rate(settings: Settings, topic: str, n_messages: int, samples: int) -> float:
    """Samples/s of a bare consumer that only receives the records."""
    return await _consume_rate(settings, topic, n_messages, samples, None)


async def reference_rate(settings: Settings, topic: str, n_messages: int, samples: int, prefix: str) -> float:
    """Samples/s of decode + one pipelined Redis HSET per sample (no windows, no model)."""
    decoder = msgspec.json.Decoder()
    redis = settings.redis_client()

    async def decode_and_hset(records: list[Any]) -> None:
        pipe = redis.pipeline(transaction=False)
        for rec in records:
            obj = decoder.decode(rec.value)
            for s in obj if isinstance(obj, list) else (obj,):
                pipe.hset(f"{prefix}ref:{s['vm']}", mapping={"ts": s["ts"], "cpu_pct": s.get("cpu_pct", 0)})
        await pipe.execute()

    try:
        return await _consume_rate(settings, topic, n_messages, samples, decode_and_hset)
    finally:
        await redis.aclose()


def e2e_rate(worker: WorkerProcess, samples: int, timeout_s: float) -> float:
    """Samples/s of the worker from its first to its last processed sample."""
    deadline = time.monotonic() + timeout_s
    t_first = None
    done = 0.0
    while time.monotonic() < deadline:
        done = worker.counter("zhuge_samples_in_total")
        now = time.perf_counter()
        if done > 0 and t_first is None:
            # the first batch was processed before we saw it: count its time in
            n = max(1.0, worker.counter("zhuge_batch_latency_seconds_count"))
            t_first = now - worker.counter("zhuge_batch_latency_seconds_sum") / n
        if done >= samples:
            return samples / (now - (t_first or now))
        time.sleep(0.05)
    raise TimeoutError(f"worker processed {done:.0f} of {samples} samples in {timeout_s}s:\n{worker.tail()}")


async def latency_at(settings: Settings, topic: str, scores_topic: str, vms: int, hosts: int, *, batched: bool, offered_per_s: float, seconds: float) -> tuple[float, float]:
    """Produce fresh samples at ``offered_per_s`` and measure produce -> score latency (ms).

    The messages are encoded before the clock starts with a placeholder timestamp that
    is replaced, at send time, by the send time: the load generator then costs little
    CPU next to the worker on the same machine.
    """
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    ticks_per_s = 20
    step_vms = max(1, int(offered_per_s / ticks_per_s))
    n_ticks = int(seconds * ticks_per_s)
    data = series(vms, hosts, time.time(), 1, SLOT_S, 11)
    vm, host = [str(v) for v in data["vm"]], [str(h) for h in data["host"]]
    cols = {f: data[f][0] for f in FIELDS}
    placeholder = 1e12 + 0.125  # an impossible ts, unique in the encoded bytes
    ticks: list[list[tuple[bytes, bytes]]] = []
    for t in range(min(n_ticks, max(1, -(-vms // step_vms)))):  # one cycle over the fleet, reused
        idx = (np.arange(step_vms) + t * step_vms) % vms
        ts = np.full(len(idx), placeholder)
        ticks.append(encode_rows([vm[i] for i in idx], ts, {k: v[idx] for k, v in cols.items()}, [host[i] for i in idx], batched=batched))
    marker = msgspec.json.encode(placeholder)

    consumer = AIOKafkaConsumer(scores_topic, group_id=None, auto_offset_reset="latest", enable_auto_commit=False, **settings.aiokafka_kwargs())
    await consumer.start()
    await consumer.seek_to_end()
    producer = AIOKafkaProducer(**dict(producer_kwargs(settings), linger_ms=1))
    await producer.start()
    latencies: list[float] = []
    decoder = msgspec.json.Decoder()

    async def collect() -> None:
        while True:
            batch = await consumer.getmany(timeout_ms=200)
            for recs in batch.values():
                for rec in recs:
                    score = decoder.decode(rec.value)
                    latencies.append(rec.timestamp / 1000.0 - float(score["last_ts"]))

    collector = asyncio.create_task(collect())
    try:
        start = time.perf_counter()
        for t in range(n_ticks):
            stamp = msgspec.json.encode(round(time.time(), 3))
            for key, value in ticks[t % len(ticks)]:
                await producer.send(topic, value.replace(marker, stamp), key=key)
            await asyncio.sleep(max(0.0, start + (t + 1) / ticks_per_s - time.perf_counter()))
        await producer.flush()
        await asyncio.sleep(3.0)
    finally:
        collector.cancel()
        await producer.stop()
        await consumer.stop()
    if not latencies:
        raise RuntimeError("no scores observed during the latency phase")
    arr = np.asarray(latencies) * 1000.0
    return float(np.percentile(arr, 50)), float(np.percentile(arr, 99))


async def _bench_shape(base: Settings, shape: str, samples: int, vms: int, hosts: int, workdir: Path, latency_s: float) -> ShapeResult:
    from app.topics import ensure_topics

    run = uuid.uuid4().hex[:8]
    settings = base.replace(
        topic_metrics=f"bench.{run}.metrics",
        topic_dlq=f"bench.{run}.dlq",
        topic_scores=f"bench.{run}.scores",
        consumer_group=f"bench-{run}",
        redis_prefix=f"bench{run}:",
        snapshot_dir=str(workdir / "snapshots"),
        history_url=str(workdir / f"history-{run}"),
    )
    await ensure_topics(settings, [settings.topic_metrics, settings.topic_dlq, settings.topic_scores])
    batched = shape == "batched"  # the other shape is "per-vm"
    steps = max(1, samples // vms)
    records = fleet_records(vms, hosts, steps, batched=batched, end_ts=time.time() - SLOT_S)
    n_samples = steps * vms
    await _produce(settings, settings.topic_metrics, records)
    raw = await raw_consume_rate(settings, settings.topic_metrics, len(records), n_samples)
    ref = await reference_rate(settings, settings.topic_metrics, len(records), n_samples, settings.redis_prefix)
    worker = WorkerProcess.start(settings, workdir / f"worker-{shape}.log", ready_timeout=180)
    try:
        e2e = e2e_rate(worker, n_samples, timeout_s=600)
        offered = e2e / 2
        p50, p99 = await latency_at(settings, settings.topic_metrics, settings.topic_scores, vms, hosts, batched=batched, offered_per_s=offered, seconds=latency_s)
    finally:
        worker.stop()
    return ShapeResult(shape, n_samples, len(records), raw, ref, e2e, p50, p99, offered)


def run_pipeline_bench(settings: Settings, *, samples: int, vms: int, hosts: int, shapes: list[str], latency_s: float, workdir: str | None = None) -> dict[str, Any]:
    """Run the benchmark for each shape; the first shape's figures are also the top-level keys."""
    root = Path(workdir or tempfile.mkdtemp(prefix="zhuge-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    settings = settings.replace(model_store=settings.model_store if os.environ.get("ZHUGE_MODEL_STORE") else str(root / "models"))
    results = {s: asyncio.run(_bench_shape(settings, s, samples, vms, hosts, root, latency_s)).as_dict() for s in shapes}
    first = results[shapes[0]]
    return {
        **{k: first[k] for k in ("e2e_samples_per_s", "raw_consume_per_s", "reference_per_s", "ratio", "p50_ms", "p99_ms")},
        "shapes": results,
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "vms": vms,
        "hosts": hosts,
    }
