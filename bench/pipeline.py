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

Scale-out (``workers``): for each worker count N, N ``zhuge worker`` processes in one
consumer group on a fresh topic of P partitions. They start on the empty topic; the
samples, encoded into Kafka record batches beforehand (partitioned by VM id as a keyed
producer would), are sent only once the group is stable (every partition owned, no
assignment change for a few seconds): no rebalance falls inside the measurement and
the producer costs the shared cores little, so the workers see a backlog as in the
single-worker run. Reported: the aggregate samples/s (all samples over first to last
processed sample across the workers), each worker's samples, partitions, batches,
scores and CPU seconds, and the CPU of the host, broker, Redis, this process and other
jobs over the same interval. The workers get ``OMP_NUM_THREADS`` = cores // N (see
``omp_threads_for``). Every run's topics are deleted after it.

With the default settings every sample re-scores its VM (``rescore_s`` 0); the
forecaster runs once per VM per slot, the downtime/window part on every score.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import re
import tempfile
import threading
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import msgspec
import numpy as np

from app.settings import Settings
from app.worker_process import WorkerProcess
from bench.machine import cpu_model
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


def fleet_records(
    vms: int, hosts: int, steps: int, *, batched: bool, end_ts: float, seed: int = 3, period_s: float = SLOT_S
) -> list[tuple[bytes, bytes]]:
    """``steps`` periods (one sample per VM every ``period_s``) of a simulated fleet ending at ``end_ts``, in time order."""
    data = series(vms, hosts, end_ts - steps * period_s, steps, period_s, seed)
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
    topics = [settings.topic_metrics, settings.topic_dlq, settings.topic_scores]
    await ensure_topics(settings, topics)
    try:
        return await _bench_shape_on(settings, shape, samples, vms, hosts, workdir, latency_s)
    finally:
        await _delete_topics(settings, topics)  # a broker full of earlier runs' topics slowed the later ones


async def _bench_shape_on(settings: Settings, shape: str, samples: int, vms: int, hosts: int, workdir: Path, latency_s: float) -> ShapeResult:
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


# --------------------------------------------------------------------------- scale-out


def parse_workers(values: list[str] | None) -> list[int]:
    """``--workers 1,2`` or ``--workers 1 --workers 2`` -> ``[1, 2]`` (order kept, duplicates dropped)."""
    out: list[int] = []
    for value in values or []:
        for part in str(value).split(","):
            part = part.strip()
            if not part:
                continue
            if not part.isdigit() or int(part) < 1:
                raise ValueError(f"worker counts are integers >= 1, not {part!r}")
            if int(part) not in out:
                out.append(int(part))
    return out


@dataclass
class ScaleRun:
    """One worker count's figures (see ``scale_out_run``)."""

    workers: int
    samples: int
    messages: int
    aggregate_samples_per_s: float
    wall_s: float  # first to last processed sample, across the workers
    produce_s: float  # first send to last acknowledgement of the pre-built batches (overlaps the processing)
    per_worker: list[int]  # samples each worker processed
    partitions_per_worker: list[int]
    cpu_s_per_worker: list[float]  # user+system CPU seconds of each worker process over the interval
    interval_s: float  # from the first send to the last processed sample: the CPU figures' interval
    host_cpu_busy: float  # share of all the host's cores busy over the interval (0..1)
    host_cores: int
    host_busy_cpu_s: float  # the same, in CPU seconds
    bench_cpu_s: float  # this process: sending the pre-built batches and polling the workers' /metrics
    broker_cpu_s: float | None = None  # None: not a process this bench can see as ours
    redis_cpu_s: float | None = None
    setup_s: float = 0.0  # worker start to a stable group (not measured in the rate)
    batches_per_worker: list[int] = field(default_factory=list)  # micro-batches each worker processed
    scores_per_worker: list[int] = field(default_factory=list)  # VM scores each worker computed
    busy_s_per_worker: list[float] = field(default_factory=list)  # each worker's first to last processed sample
    omp_threads: int | None = None  # OMP_NUM_THREADS of the workers (XGBoost's prediction threads); None: unset

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = dict(self.__dict__)
        # each worker's own rate over its own first to last sample (the aggregate wall where unknown)
        busy = self.busy_s_per_worker or [self.wall_s] * len(self.per_worker)
        d["per_worker_samples_per_s"] = [round(n / (b or self.wall_s), 1) if (b or self.wall_s) else 0.0 for n, b in zip(self.per_worker, busy)]
        d["cpu_util_per_worker"] = [round(c / self.interval_s, 3) if self.interval_s else 0.0 for c in self.cpu_s_per_worker]
        d["samples_per_worker_cpu_s"] = round(self.samples / sum(self.cpu_s_per_worker), 1) if sum(self.cpu_s_per_worker) else 0.0
        # host CPU not spent by the workers, the broker, Redis or this process: other jobs on the box
        ours = sum(self.cpu_s_per_worker) + self.bench_cpu_s + (self.broker_cpu_s or 0.0) + (self.redis_cpu_s or 0.0)
        d["other_cpu_s"] = round(max(0.0, self.host_busy_cpu_s - ours), 2)
        return _rounded(d)


def _rounded(v: Any) -> Any:
    if isinstance(v, float):
        return round(v, 3) if abs(v) < 10 else round(v, 1)
    if isinstance(v, list):
        return [_rounded(x) for x in v]
    if isinstance(v, dict):
        return {k: _rounded(x) for k, x in v.items()}
    return v


def scale_out_summary(runs: list[ScaleRun], *, partitions: int, shape: str, vms: int) -> dict[str, Any]:
    """The JSON ``scale_out`` section: every run, in the order run, with its speedup over the
    median 1-worker (else first) figure; the median aggregate per worker count; and
    ``speedup_2_vs_1`` (median 2-worker / median 1-worker) when both ran."""
    by_n: dict[int, list[float]] = {}
    for r in runs:
        by_n.setdefault(r.workers, []).append(r.aggregate_samples_per_s)
    median = {n: float(np.median(v)) for n, v in by_n.items()}
    base = median.get(1, runs[0].aggregate_samples_per_s if runs else 0.0)
    dicts = [r.as_dict() for r in runs]
    for d, r in zip(dicts, runs):
        d["speedup_vs_1"] = round(r.aggregate_samples_per_s / base, 3) if base else 0.0
    out: dict[str, Any] = {
        "partitions": partitions,
        "shape": shape,
        "vms": vms,
        "method": "workers start on the empty topic; pre-built record batches sent once the group is stable (no rebalance in the interval)",
        "runs": dicts,
        "aggregate_samples_per_s": {str(n): round(v, 1) for n, v in median.items()},  # median per worker count
    }
    if 1 in median and 2 in median and median[1]:
        out["speedup_2_vs_1"] = round(median[2] / median[1], 3)
    return out


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def proc_cpu_s(pid: int | None) -> float | None:
    """User + system CPU seconds of a process (its threads included; None when it is gone)."""
    if pid is None:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime


def host_cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all cores since boot, from /proc/stat (busy excludes idle and iowait)."""
    try:
        parts = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except OSError:
        return 0, 0
    total = sum(parts[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)
    return total - parts[3] - parts[4], total


def _service_pids(settings: Settings) -> dict[str, int | None]:
    """The broker's and Redis' pids when ``zhuge services`` started them (else None: CPU not reported)."""
    from app import services

    out: dict[str, int | None] = {}
    for name, paths in services.PATHS.items():
        try:
            _, _, pid_file, marker = paths(settings)
            out[name] = services.owned_pid(pid_file, marker)
        except Exception:  # noqa: BLE001 - a figure we can go without
            out[name] = None
    return out


_SAMPLES_IN = re.compile(rb"^zhuge_samples_in_total (\S+)$", re.M)
_BATCH_SUM = re.compile(rb"^zhuge_batch_latency_seconds_sum (\S+)$", re.M)
_BATCH_COUNT = re.compile(rb"^zhuge_batch_latency_seconds_count (\S+)$", re.M)


def _counters(port: int) -> tuple[float, float, float]:
    """(samples in, batch seconds sum, batch count) of one worker, read cheaply (no full parse)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read()
    got = [m.group(1) if (m := rx.search(text)) else b"0" for rx in (_SAMPLES_IN, _BATCH_SUM, _BATCH_COUNT)]
    return float(got[0]), float(got[1]), float(got[2])


@dataclass
class _Monitor:
    """Polls the workers' counters in a thread until they processed ``samples`` in all."""

    ports: list[int]
    samples: int
    timeout_s: float
    interval_s: float = 0.05
    stall_s: float = 60.0  # no worker progressed this long (a worker failing its batches): give up
    t_first: float | None = None
    t_last: float | None = None
    counts: list[float] = field(default_factory=list)
    firsts: list[float | None] = field(default_factory=list)  # per worker: its first processed sample
    lasts: list[float | None] = field(default_factory=list)  # per worker: when its count last grew
    error: BaseException | None = None

    def run(self) -> None:
        try:
            deadline = time.monotonic() + self.timeout_s
            self.counts = [0.0] * len(self.ports)
            self.firsts = [None] * len(self.ports)
            self.lasts = [None] * len(self.ports)
            progressed = time.monotonic()
            while time.monotonic() < deadline:
                if time.monotonic() - progressed > self.stall_s:
                    raise TimeoutError(f"no worker processed a sample for {self.stall_s:.0f} s ({sum(self.counts):.0f} of {self.samples})")
                for i, port in enumerate(self.ports):
                    done, lat_sum, lat_n = _counters(port)
                    now = time.perf_counter()
                    if done > 0 and self.counts[i] == 0:
                        # its first batch was processed before we saw it: count that batch's time in
                        self.firsts[i] = now - lat_sum / max(1.0, lat_n)
                        if self.t_first is None:
                            self.t_first = self.firsts[i]
                    if done > self.counts[i]:
                        self.lasts[i] = now
                        progressed = time.monotonic()
                    self.counts[i] = done
                if sum(self.counts) >= self.samples:
                    self.t_last = time.perf_counter()
                    return
                time.sleep(self.interval_s)
            raise TimeoutError(f"workers processed {sum(self.counts):.0f} of {self.samples} samples in {self.timeout_s}s")
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            self.error = exc


def omp_threads_for(workers: int, cores: int | None = None) -> int:
    """XGBoost (OpenMP) threads per worker so that the workers' threads do not outnumber the cores.

    Each worker's forecaster predicts with an OpenMP team of one thread per core by default;
    two such workers on two cores stall each other's teams at every barrier (one thread of a
    team descheduled, the others waiting): on this box that cost some runs up to 6x the
    prediction time and 3-4x the worker CPU per sample (py-spy: ``Booster.inplace_predict``).
    """
    return max(1, (cores or os.cpu_count() or 1) // max(1, workers))


@contextlib.contextmanager
def _env(name: str, value: str | None) -> Iterator[None]:
    """``os.environ[name] = value`` (None: leave it as it is) while the workers start (they copy it)."""
    if value is None:
        yield
        return
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _start_workers(settings: Settings, n: int, workdir: Path, tag: str) -> list[WorkerProcess]:
    """N workers of one group; the first alone (it may have to train the bootstrap model), the rest in parallel."""
    workers: list[WorkerProcess] = []
    try:
        workers.append(WorkerProcess.start(settings, workdir / f"{tag}-w0.log", ready_timeout=180))
        if n > 1:
            with ThreadPoolExecutor(max_workers=n - 1) as pool:
                futures = [pool.submit(WorkerProcess.start, settings, workdir / f"{tag}-w{i}.log", ready_timeout=180) for i in range(1, n)]
                errors = []
                for f in futures:
                    try:
                        workers.append(f.result())
                    except Exception as exc:  # noqa: BLE001 - stop the others first
                        errors.append(exc)
                if errors:
                    raise errors[0]
        return workers
    except BaseException:
        _stop_workers(workers)
        raise


def _stop_workers(workers: list[WorkerProcess]) -> None:
    if workers:
        with ThreadPoolExecutor(max_workers=len(workers)) as pool:
            list(pool.map(lambda w: w.stop(), workers))


def wait_group_stable(workers: list[WorkerProcess], partitions: int, *, quiet_s: float = 3.0, timeout_s: float = 120.0) -> None:
    """Until the workers own all ``partitions`` between them and no assignment changed for ``quiet_s``."""
    deadline = time.monotonic() + timeout_s
    last: tuple[tuple[float, float], ...] | None = None
    since = time.monotonic()
    while time.monotonic() < deadline:
        state = tuple((w.counter("zhuge_partitions_assigned"), w.counter("zhuge_rebalances_total")) for w in workers)
        if state != last:
            last, since = state, time.monotonic()
        elif sum(a for a, _ in state) == partitions and time.monotonic() - since >= quiet_s:
            return
        time.sleep(0.25)
    raise TimeoutError(f"the group of {len(workers)} workers did not settle on {partitions} partitions: {last}")


async def _send_prebuilt(settings: Settings, topic: str, records: list[tuple[bytes, bytes]], partitions: int, when_ready: Callable[[], float]) -> float:
    """Encode ``records`` into Kafka record batches up front, call ``when_ready`` (in a thread), then send them all.

    Partitioned by key exactly as a keyed ``send`` would (the default murmur2 partitioner),
    in order within each partition. Building the batches before the clock starts leaves the
    producer little to do during the measurement on the workers' cores (about 12 us of
    Python per message through ``send``; the workers' whole budget is a few times that).
    Returns the seconds from ``when_ready``'s return to the last acknowledgement.
    """
    from aiokafka import AIOKafkaProducer
    from aiokafka.partitioner import DefaultPartitioner

    producer = AIOKafkaProducer(**producer_kwargs(settings))
    await producer.start()
    try:
        every = list(range(partitions))
        partitioner = DefaultPartitioner()
        open_batches: dict[int, Any] = {}
        batches: list[tuple[int, Any]] = []
        for key, value in records:
            p = partitioner(key, every, every)
            batch = open_batches.get(p)
            if batch is None or batch.append(timestamp=None, key=key, value=value) is None:
                if batch is not None:
                    batches.append((p, batch))
                batch = open_batches[p] = producer.create_batch()
                if batch.append(timestamp=None, key=key, value=value) is None:
                    raise ValueError(f"a record of {len(value)} bytes does not fit an empty batch")
        batches += list(open_batches.items())
        await asyncio.to_thread(when_ready)
        t0 = time.perf_counter()
        futures = [await producer.send_batch(batch, topic, partition=p) for p, batch in batches]
        await asyncio.gather(*futures)
        return time.perf_counter() - t0
    finally:
        await producer.stop()


async def _delete_topics(settings: Settings, names: list[str]) -> None:
    """Drop this bench's own topics (best effort): the broker is the same for the next run, and may be a shared one."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(**settings.aiokafka_kwargs())
    await admin.start()
    try:
        await admin.delete_topics(names)
    except Exception:  # noqa: BLE001 - leftovers cost disk, not correctness
        pass
    finally:
        await admin.close()


def scale_out_run(
    base: Settings, n: int, *, partitions: int, shape: str, samples: int, vms: int, hosts: int, workdir: Path,
    omp_threads: int | None = None, period_s: float = SLOT_S,
) -> ScaleRun:  # fmt: skip
    """N workers in one group on a fresh ``partitions``-partition topic; samples sent once the group is stable.

    ``omp_threads``: the workers' ``OMP_NUM_THREADS`` (None: the environment's, or unset).
    """
    from app.topics import ensure_topics

    run = uuid.uuid4().hex[:8]
    settings = base.replace(
        topic_metrics=f"bench.{run}.metrics",
        topic_dlq=f"bench.{run}.dlq",
        topic_scores=f"bench.{run}.scores",
        topic_partitions=partitions,
        consumer_group=f"bench-{run}",
        redis_prefix=f"bench{run}:",
        snapshot_dir=str(workdir / f"snapshots-{run}"),
        history_url=str(workdir / f"history-{run}"),
    )
    asyncio.run(ensure_topics(settings, [settings.topic_metrics, settings.topic_dlq, settings.topic_scores], partitions=partitions))
    steps = max(1, samples // vms)
    records = fleet_records(vms, hosts, steps, batched=shape == "batched", end_ts=time.time() - SLOT_S, period_s=period_s)
    n_samples = steps * vms
    t_setup = time.monotonic()
    with _env("OMP_NUM_THREADS", None if omp_threads is None else str(omp_threads)):
        workers = _start_workers(settings, n, workdir, f"scale-{n}w-{run}")
    env_threads = os.environ.get("OMP_NUM_THREADS", "")
    threads = omp_threads if omp_threads is not None else (int(env_threads) if env_threads.isdigit() else None)
    try:
        pids = [w.proc.pid for w in workers]
        svc = _service_pids(settings)
        monitor = _Monitor([w.metrics_port for w in workers], n_samples, timeout_s=600)
        thread = threading.Thread(target=monitor.run, name="scale-monitor", daemon=True)
        before: dict[str, Any] = {}

        def when_ready() -> float:
            wait_group_stable(workers, partitions)
            before["setup_s"] = time.monotonic() - t_setup
            before["assigned"] = [int(w.counter("zhuge_partitions_assigned")) for w in workers]
            before["cpu"] = [proc_cpu_s(p) or 0.0 for p in pids]
            before["svc"] = {k: proc_cpu_s(p) for k, p in svc.items()}
            before["host"] = host_cpu_jiffies()
            before["self"] = time.process_time()
            before["t0"] = time.perf_counter()
            thread.start()
            return before["t0"]

        produce_s = asyncio.run(_send_prebuilt(settings, settings.topic_metrics, records, partitions, when_ready))
        thread.join()
        if monitor.error is not None:
            raise RuntimeError(f"{monitor.error}\n" + "\n".join(w.tail(20) for w in workers)) from monitor.error
        cpu1 = [proc_cpu_s(p) or 0.0 for p in pids]
        svc1 = {k: proc_cpu_s(p) for k, p in svc.items()}
        busy1, total1 = host_cpu_jiffies()
        self1 = time.process_time()
        sums = [w.metric_sums() for w in workers]
        assert monitor.t_last is not None
        t0 = before["t0"]
        t_first = monitor.t_first if monitor.t_first is not None else t0
        wall = max(1e-9, monitor.t_last - t_first)
        busy0, total0 = before["host"]

        def svc_delta(name: str) -> float | None:
            a, b = before["svc"].get(name), svc1.get(name)
            return None if a is None or b is None else b - a

        return ScaleRun(
            workers=n,
            samples=n_samples,
            messages=len(records),
            aggregate_samples_per_s=n_samples / wall,
            wall_s=wall,
            produce_s=produce_s,
            per_worker=[int(c) for c in monitor.counts],
            partitions_per_worker=before["assigned"],
            cpu_s_per_worker=[b - a for a, b in zip(before["cpu"], cpu1)],
            interval_s=monitor.t_last - t0,
            host_cpu_busy=(busy1 - busy0) / (total1 - total0) if total1 > total0 else 0.0,
            host_cores=os.cpu_count() or 1,
            host_busy_cpu_s=(busy1 - busy0) / _CLK_TCK,
            bench_cpu_s=self1 - before["self"],
            broker_cpu_s=svc_delta("kafka"),
            redis_cpu_s=svc_delta("redis"),
            setup_s=before["setup_s"],
            batches_per_worker=[int(m.get("zhuge_batch_latency_seconds_count", 0)) for m in sums],
            scores_per_worker=[int(m.get("zhuge_vms_scored_total", 0)) for m in sums],
            busy_s_per_worker=[(b - a) if a is not None and b is not None else 0.0 for a, b in zip(monitor.firsts, monitor.lasts)],
            omp_threads=threads,
        )
    finally:
        _stop_workers(workers)
        asyncio.run(_delete_topics(settings, [settings.topic_metrics, settings.topic_dlq, settings.topic_scores]))  # see _bench_shape


def run_pipeline_bench(
    settings: Settings, *, samples: int, vms: int, hosts: int, shapes: list[str], latency_s: float, workdir: str | None = None,
    workers: list[int] | None = None, partitions: int = 16, scale_shape: str = "per-vm", scale_samples: int | None = None,
    scale_repeats: int = 1, scale_vms: int | None = None, worker_threads: int | None = 0, scale_period_s: float = SLOT_S,
) -> dict[str, Any]:  # fmt: skip
    """Run the benchmark for each shape; the first shape's figures are also the top-level keys.

    ``workers`` (e.g. ``[1, 2]``): afterwards, one scale-out run per worker count on a
    ``partitions``-partition topic in ``scale_shape`` with ``scale_samples`` (default
    ``samples``) over ``scale_vms`` VMs (default ``vms``), under ``scale_out``; ``scale_repeats`` times round (1, 2, 1, 2, ...: on a
    shared box the pairs see similar neighbours). ``worker_threads``: the scale-out workers'
    ``OMP_NUM_THREADS``; 0 (default): ``omp_threads_for`` (cores // workers) unless the
    environment sets it; None: leave it to the environment. ``scale_period_s``: seconds between
    two samples of a VM in the scale-out fleet (300: every sample opens a new slot, so the
    forecaster runs for each; 60: for one sample in five).
    """
    root = Path(workdir or tempfile.mkdtemp(prefix="zhuge-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    settings = settings.replace(model_store=settings.model_store if os.environ.get("ZHUGE_MODEL_STORE") else str(root / "models"))
    results = {s: asyncio.run(_bench_shape(settings, s, samples, vms, hosts, root, latency_s)).as_dict() for s in shapes}
    first = results[shapes[0]] if shapes else {}
    out: dict[str, Any] = {
        **{k: first[k] for k in ("e2e_samples_per_s", "raw_consume_per_s", "reference_per_s", "ratio", "p50_ms", "p99_ms") if k in first},
        "shapes": results,
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "cpu_model": cpu_model(),
        "vms": vms,
        "hosts": hosts,
    }
    if workers:
        s_vms = scale_vms or vms
        s_hosts = max(1, round(hosts * s_vms / vms))  # the same VMs per host as the shape runs
        def threads(n: int) -> int | None:
            if worker_threads is None or (worker_threads == 0 and os.environ.get("OMP_NUM_THREADS")):
                return None
            return worker_threads or omp_threads_for(n)

        runs = [
            scale_out_run(settings, n, partitions=partitions, shape=scale_shape, samples=scale_samples or samples, vms=s_vms, hosts=s_hosts,
                          workdir=root, omp_threads=threads(n), period_s=scale_period_s)
            for _ in range(scale_repeats) for n in workers
        ]  # fmt: skip
        out["scale_out"] = scale_out_summary(runs, partitions=partitions, shape=scale_shape, vms=s_vms)
        out["scale_out"]["hosts"] = s_hosts
        out["scale_out"]["period_s"] = scale_period_s  # seconds between two samples of a VM
    return out
