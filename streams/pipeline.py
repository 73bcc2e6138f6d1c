"""The per-batch work of a worker, independent of Faust.

``Pipeline.process(records)`` is the whole hot path for one micro-batch:
decode + validate (bad -> DLQ), update the partition's window store, score the
VMs that are due, write the sinks, and only then return, so the caller acks the
batch after its Redis and ``vm.scores`` writes succeeded (at-least-once). Redis
or Kafka trouble is retried with back-off here (back-pressure), never dropped.

Kept free of Faust so tests can drive it with plain records, including crash
and resume, the way Bytewax tests recovery without a broker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from app.settings import Settings
from streams.dlq import dlq_records
from streams.recovery import SnapshotStore, replay_range
from streams.schema import DecodedBatch, decode_messages
from streams.scorer import Scorer
from streams.scores import ScoreBatch
from streams.sinks.scores_topic import score_records
from streams.window_store import WindowStore

log = logging.getLogger(__name__)

EVICT_EVERY_S = 60.0


@dataclass(frozen=True)
class Record:
    """One Kafka record as the pipeline needs it."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes


@dataclass
class PartitionState:
    store: WindowStore
    next_offset: int
    last_snapshot: float = field(default_factory=time.monotonic)
    last_evict: float = field(default_factory=time.monotonic)
    dropped_seen: int = 0  # late samples of this store already counted in the metric
    pending: set[str] = field(default_factory=set)  # VMs with samples not yet scored


@dataclass
class BatchResult:
    samples: int = 0
    rejected: int = 0
    scored: int = 0
    stale: int = 0


class Pipeline:
    """Window stores per partition plus the sinks; one instance per worker process."""

    def __init__(
        self,
        settings: Settings,
        *,
        scorer: Scorer,
        producer: Any,
        redis_sink: Any,
        history: Any | None = None,
        metrics: Any | None = None,
        xp: Any = np,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.scorer = scorer
        self.producer = producer
        self.redis_sink = redis_sink
        self.history = history
        self.metrics = metrics
        self.xp = xp
        self.clock = clock
        self.partitions: dict[int, PartitionState] = {}
        self.snapshots = SnapshotStore(settings.snapshot_dir, settings.consumer_group, settings.topic_metrics)
        self._lock = asyncio.Lock()

    # ------------------------------------------------------------------ stores
    def _new_store(self) -> WindowStore:
        s = self.settings
        return WindowStore(s.window_slots, s.slot_s, s.vm_ttl_s, xp=self.xp)

    async def _ensure_partition(self, partition: int, first_offset: int) -> PartitionState:
        """Return the partition's state, rebuilding it when the stream jumped past it.

        ``first_offset`` > the offset the store expects (restart, ``kill -9``, rebalance):
        load the newest snapshot and replay ``[snapshot offset, first_offset)`` from Kafka.
        ``first_offset`` below it (Faust re-delivering what was processed but not yet
        committed): keep the store; ``process`` skips the records it already holds.
        """
        state = self.partitions.get(partition)
        if state is not None and first_offset <= state.next_offset:
            return state
        reason = "first sight" if state is None else f"offset jump {state.next_offset} -> {first_offset}"
        started = time.monotonic()
        snap = await asyncio.to_thread(self.snapshots.load, partition)
        store = self._new_store()
        if snap is not None:
            try:
                store = WindowStore.restore(snap.arrays, xp=self.xp)
            except (KeyError, ValueError) as exc:  # another snapshot format: Kafka still has the data
                log.warning("snapshot of partition %d unusable (%s): rebuilding from Kafka", partition, exc)
                snap = None
        if snap and (store.n_slots != self.settings.window_slots or store.slot_s != self.settings.slot_s):
            log.warning("snapshot of partition %d has another window shape: rebuilding from Kafka", partition)
            store, snap = self._new_store(), None
        start = snap.next_offset if snap else None
        state = PartitionState(store=store, next_offset=max(first_offset, start or 0), dropped_seen=store.dropped_old)

        def apply(values: list[bytes], keys: list[bytes | None]) -> None:
            decoded = decode_messages(values, keys, now=self.clock())
            if len(decoded.vm):
                store.update(decoded.vm, decoded.host, decoded.ts, decoded.values)
                state.pending.update(decoded.vm)

        since = self.clock() - self.settings.window_span_s
        replayed = await replay_range(
            self.settings.aiokafka_kwargs(),
            self.settings.topic_metrics,
            partition,
            start,
            first_offset,
            apply,
            since_ts=since,
        )
        self.partitions[partition] = state
        if self.metrics is not None:
            self.metrics.recovery_replayed.inc(replayed)
        log.info(
            "partition %d ready (%s): snapshot=%s, replayed %d records up to offset %d in %.2fs",
            partition,
            reason,
            "none" if snap is None else f"offset {snap.next_offset}",
            replayed,
            first_offset,
            time.monotonic() - started,
        )
        return state

    def release(self, partitions: Sequence[int]) -> None:
        """Forget partitions this worker no longer owns (their next owner rebuilds them)."""
        for p in partitions:
            self.partitions.pop(p, None)

    # ------------------------------------------------------------------ batch
    async def process(self, records: Sequence[Record]) -> BatchResult:
        """Handle one micro-batch end to end; returns once every sink write succeeded."""
        if not records:
            return BatchResult()
        started = time.perf_counter()
        async with self._lock:
            by_partition: dict[int, list[Record]] = {}
            for r in records:
                by_partition.setdefault(r.partition, []).append(r)
            states = {p: await self._ensure_partition(p, rs[0].offset) for p, rs in by_partition.items()}
            # records the windows already hold (re-delivered after a restart) are skipped, not double-counted
            kept = {p: [r for r in rs if r.offset >= states[p].next_offset] for p, rs in by_partition.items()}
            skipped = sum(len(rs) - len(kept[p]) for p, rs in by_partition.items())
            if skipped and self.metrics is not None:
                self.metrics.recovery_skipped.inc(skipped)
            by_partition = {p: rs for p, rs in kept.items() if rs}
            now = self.clock()
            decoded, scores = await asyncio.to_thread(self._compute, by_partition, states, now)
            result = BatchResult(samples=sum(len(d.vm) for d in decoded.values()))
            result.rejected = sum(len(d.rejected) for d in decoded.values())
            await self._write_sinks(decoded, scores, result)
            for p, rs in by_partition.items():
                states[p].next_offset = max(states[p].next_offset, rs[-1].offset + 1)
            result.scored = sum(len(b) for b in scores)
            self._observe(decoded, result, started)
            await self._maybe_snapshot()
        return result

    def _compute(
        self, by_partition: dict[int, list[Record]], states: dict[int, PartitionState], now: float
    ) -> tuple[dict[int, DecodedBatch], list[ScoreBatch]]:
        """CPU/GPU part of a batch, run off the event loop."""
        decoded: dict[int, DecodedBatch] = {}
        scores: list[ScoreBatch] = []
        for p, rs in by_partition.items():
            d = decode_messages([r.value for r in rs], [r.key for r in rs], now=now)
            decoded[p] = d
            state = states[p]
            if len(d.vm):
                state.store.update(d.vm, d.host, d.ts, d.values)
                state.pending.update(d.vm)
            self._maybe_evict(state)
            batch = self._score_pending(state, now)
            if batch is not None:
                scores.append(batch)
        return decoded, scores

    def _maybe_evict(self, state: PartitionState) -> None:
        """Drop VMs silent for ``vm_ttl_s`` of *stream* time (the partition's newest sample).

        Stream time, not wall time, so that replaying old traces does not evict everything.
        """
        if time.monotonic() - state.last_evict < EVICT_EVERY_S or len(state.store) == 0:
            return
        state.last_evict = time.monotonic()
        newest = float(state.store.last_ts[state.store.active_rows()].max())
        gone = state.store.evict_idle(newest)
        if gone:
            state.pending.difference_update(gone)
            log.info("evicted %d VMs silent for more than %ss", len(gone), self.settings.vm_ttl_s)

    def _score_pending(self, state: PartitionState, now: float) -> ScoreBatch | None:
        if not state.pending:
            return None
        rows = state.store.rows_of(sorted(state.pending))
        due = self.scorer.due_rows(state.store, rows, now)
        if len(due) == 0:
            return None
        batch = self.scorer.score(state.store, due, now)
        state.pending.difference_update(batch.vm)
        return batch

    async def flush_due(self) -> int:
        """Score pending VMs that became due with no new traffic (called by a timer)."""
        async with self._lock:
            now = self.clock()
            scores = await asyncio.to_thread(
                lambda: [b for s in self.partitions.values() if (b := self._score_pending(s, now)) is not None]
            )
            result = BatchResult()
            await self._write_sinks({}, scores, result)
            return sum(len(b) for b in scores)

    # ------------------------------------------------------------------ sinks
    async def _write_sinks(
        self, decoded: dict[int, DecodedBatch], scores: list[ScoreBatch], result: BatchResult
    ) -> None:
        futures: list[Any] = []
        s = self.settings
        for d in decoded.values():
            for key, value, headers in dlq_records(d.rejected):
                futures.append(await self.producer.send(s.topic_dlq, value=value, key=key, headers=headers))
        for batch in scores:
            for key, value in score_records(batch):
                futures.append(await self.producer.send(s.topic_scores, value=value, key=key))
            written = await self.retry("redis", lambda b=batch: self.redis_sink.write_counts(b))
            result.stale += written.skipped
        if futures:
            await self.retry("kafka", lambda: asyncio.gather(*futures))
        if self.history is not None:
            flush_due = [self.history.write(d) for d in decoded.values() if len(d.vm)]
            if any(flush_due):
                try:
                    await asyncio.to_thread(self.history.flush)
                except Exception as exc:  # the archive is best effort: rows stay buffered for the next flush
                    log.warning("history flush failed (%s); rows kept for the next try", exc)

    async def retry(self, what: str, attempt: Callable[[], Any]) -> Any:
        """Retry a sink write with capped exponential back-off until it succeeds."""
        delay = 0.1
        while True:
            try:
                t0 = time.perf_counter()
                out = await attempt()
                if what == "redis" and self.metrics is not None:
                    self.metrics.redis_write.observe(time.perf_counter() - t0)
                return out
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.metrics is not None and what == "redis":
                    self.metrics.redis_errors.inc()
                log.warning("%s write failed (%s); retrying in %.1fs", what, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    # ------------------------------------------------------------------ snapshots
    async def _maybe_snapshot(self, force: bool = False) -> None:
        now = time.monotonic()
        for p, state in self.partitions.items():
            if force or now - state.last_snapshot >= self.settings.snapshot_every_s:
                arrays = state.store.snapshot()
                await asyncio.to_thread(self.snapshots.save, p, arrays, state.next_offset)
                state.last_snapshot = now

    async def snapshot_all(self) -> None:
        async with self._lock:
            await self._maybe_snapshot(force=True)

    # ------------------------------------------------------------------ metrics
    def _observe(self, decoded: dict[int, DecodedBatch], result: BatchResult, started: float) -> None:
        m = self.metrics
        if m is None:
            return
        m.samples_in.inc(result.samples)
        m.samples_invalid.inc(result.rejected)
        m.dlq.inc(result.rejected)
        m.vms_scored.inc(result.scored)
        m.batch_size.observe(result.samples)
        m.batch_latency.observe(time.perf_counter() - started)
        written = self.clock()  # after the sinks: lag = sample ts -> score in Redis
        for d in decoded.values():
            if len(d.ts):
                m.observe_lags(written - d.ts)
        for state in self.partitions.values():
            if state.store.dropped_old > state.dropped_seen:
                m.samples_late_dropped.inc(state.store.dropped_old - state.dropped_seen)
                state.dropped_seen = state.store.dropped_old
        m.window_store_vms.set(sum(len(s.store) for s in self.partitions.values()))
        m.window_store_bytes.set(sum(s.store.nbytes for s in self.partitions.values()))

