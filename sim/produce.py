"""Encode columnar samples as contract messages and produce them to Kafka, batched.

Two shapes (README "Contract"):
- per-VM: one JSON object per sample, key = VM id;
- batched: one JSON array per host and period (what a hypervisor agent sends),
  key = the first VM id of that array. The key only spreads load: a host's
  VMs stay together on one partition as long as the host's first VM is stable,
  and workers never rely on the key for correctness.

``simulate`` drives a ``Fleet`` through this, in real time or as fast as possible.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np

from streams.schema import METRICS

_encoder = msgspec.json.Encoder()
Record = tuple[bytes, bytes]  # (key, value)


def encode_rows(
    vm: Sequence[str],
    ts: np.ndarray,
    columns: Mapping[str, np.ndarray],
    host: Sequence[str] | None = None,
    *,
    batched: bool = False,
    decimals: int = 3,
) -> list[Record]:
    """Rows -> ``(key, value)`` records; NaN values are omitted (missing field), never sent."""
    n = len(vm)
    names = [m for m in METRICS if m in columns]
    cols: list[list[float]] = []
    has_nan: list[bool] = []
    for m in names:
        a = np.round(np.asarray(columns[m], dtype=np.float64), decimals)
        cols.append(a.tolist())
        has_nan.append(bool(np.isnan(a).any()))
    ts_list = np.asarray(ts, dtype=np.float64).tolist()
    host_list = list(host) if host is not None else None
    rows: list[dict[str, Any]] = []
    for i in range(n):  # one dict per sample: the JSON encoder needs objects
        d: dict[str, Any] = {"vm": vm[i], "ts": ts_list[i]}
        if host_list is not None:
            d["host"] = host_list[i]
        for name, col, nan in zip(names, cols, has_nan):
            v = col[i]
            if not nan or v == v:
                d[name] = v
        rows.append(d)
    if not batched:
        return [(vm[i].encode(), _encoder.encode(rows[i])) for i in range(n)]
    groups = np.asarray(host_list if host_list is not None else ["" for _ in range(n)], dtype=object)
    order = np.argsort(groups, kind="stable")
    uniq, starts = np.unique(groups[order], return_index=True)
    bounds = list(starts) + [n]
    out: list[Record] = []
    for g in range(len(uniq)):
        idx = order[bounds[g]: bounds[g + 1]]
        out.append((vm[idx[0]].encode(), _encoder.encode([rows[k] for k in idx])))
    return out


def producer_kwargs(settings: Any) -> dict[str, Any]:
    """aiokafka producer options for throughput: linger, large batches, lz4 when installed."""
    kw = dict(settings.aiokafka_kwargs(), linger_ms=20, max_batch_size=512 * 1024, acks=1)
    try:
        import lz4  # noqa: F401

        kw["compression_type"] = "lz4"
    except ImportError:
        pass
    return kw


class Sender:
    """Enqueue records without awaiting each delivery; wait only when many are pending.

    Awaiting every small batch would cost a linger period each (a replay sends
    thousands of tiny buckets), so deliveries are awaited every ``max_pending``
    records and at ``flush``. Records that failed (the broker away, a leader moving)
    are sent again there by ``streams.sinks.kafka_out.send_all``, with capped back-off
    and a warning per round, until Kafka acknowledges them: an outage holds the
    producer back and loses nothing, as for the worker and the agent.
    """

    def __init__(self, producer: Any, topic: str, max_pending: int = 20_000) -> None:
        self.producer, self.topic, self.max_pending = producer, topic, max_pending
        self._records: list[Record] = []
        self._futures: list[asyncio.Future[Any] | None] = []  # None: ``send`` itself raised

    async def send(self, records: Sequence[Record]) -> None:
        for rec in records:
            try:
                future = await self.producer.send(self.topic, rec[1], key=rec[0])
            except asyncio.CancelledError:
                raise
            except Exception:  # buffer full or no metadata (the broker away): sent again at flush
                future = None
            self._records.append(rec)
            self._futures.append(future)
            if len(self._futures) >= self.max_pending:
                await self.flush()

    async def flush(self) -> None:
        from streams.sinks.kafka_out import OutRecord, send_all

        records, futures = self._records, self._futures
        self._records, self._futures = [], []
        outcomes = await asyncio.gather(*(f for f in futures if f is not None), return_exceptions=True)
        if len(outcomes) == len(futures) and not any(isinstance(o, BaseException) for o in outcomes):
            return  # the common case: everything acknowledged
        done = iter(outcomes)
        failed = []
        for rec, future in zip(records, futures):
            outcome = None if future is None else next(done)
            if isinstance(outcome, asyncio.CancelledError):
                raise outcome
            if future is None or isinstance(outcome, BaseException):
                failed.append(rec)
        await send_all(self.producer, [OutRecord(self.topic, key, value, output="metrics") for key, value in failed])


async def send_records(producer: Any, topic: str, records: Sequence[Record], chunk: int = 20_000) -> None:
    """Send and wait for every delivery."""
    sender = Sender(producer, topic, chunk)
    await sender.send(records)
    await sender.flush()


@dataclass
class Progress:
    """Running totals shown while producing and in the final summary."""

    started: float
    messages: int = 0
    samples: int = 0
    periods: int = 0

    def rates(self) -> tuple[float, float]:
        dt = max(time.monotonic() - self.started, 1e-9)
        return self.messages / dt, self.samples / dt


async def simulate(
    settings: Any,
    *,
    n_vms: int,
    n_hosts: int,
    start_ts: float,
    n_steps: int | None,
    period_s: float,
    realtime: bool,
    batched: bool,
    seed: int,
    topic: str,
    on_progress: Callable[[Progress], None] | None = None,
) -> Progress:
    """Produce ``n_steps`` periods (None = until cancelled) of a seeded fleet to ``topic``."""
    from aiokafka import AIOKafkaProducer

    from app.topics import ensure_topics
    from sim.fleet import FIELDS, Fleet

    await ensure_topics(settings, [topic])
    fleet = Fleet(n_vms, n_hosts, seed)
    producer = AIOKafkaProducer(**producer_kwargs(settings))
    await producer.start()
    prog = Progress(started=time.monotonic())
    sender = Sender(producer, topic)
    try:
        step = 0
        while n_steps is None or step < n_steps:
            ts = start_ts + step * period_s
            if realtime:
                await asyncio.sleep(max(0.0, ts - time.time()))
            s = fleet.sample(ts)
            records = encode_rows(s.vm, np.full(n_vms, ts), {f: getattr(s, f) for f in FIELDS}, s.host,
                                  batched=batched)
            await sender.send(records)
            if realtime:
                await sender.flush()
            prog.messages += len(records)
            prog.samples += n_vms
            prog.periods += 1
            step += 1
            if on_progress is not None:
                on_progress(prog)
        await sender.flush()
    finally:
        await producer.stop()  # flushes what is queued, also on Ctrl-C
    return prog
