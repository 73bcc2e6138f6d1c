"""The per-batch work of a worker, independent of Faust and of the Kafka consumer.

``Pipeline.process(records)`` is the whole hot path for one micro-batch and
returns the offsets the caller may commit. The order (after Quix Streams'
checkpoint) is:

1. a partition met for the first time, or after a failure, is rebuilt: its
   newest usable snapshot plus a replay of the gap from Kafka without sinks
   (``streams.recovery.plan_recovery`` says which snapshot and from where);
   records the rebuilt windows already hold are skipped;
2. decode + validate, window-store update, eviction of VMs nothing arrived
   from for ``vm_ttl_s`` (wall clock), scoring (vectorised, in a thread);
3. sinks: DLQ and ``vm.scores`` records produced until each is acknowledged
   (``streams.sinks.kafka_out.send_all``: fresh re-sends, never a re-await),
   Redis written (scores, then evicted VMs forgotten), retried with capped
   back-off: an outage is back-pressure, the batch simply waits;
4. the partitions' next offsets advance and are returned for the commit;
5. every ``snapshot_every_s`` the stores are snapshotted with their next
   offset, the VMs still waiting for a score, and the fingerprint of the last
   record (a failed snapshot is logged and counted; Kafka still has the data):
   copied in a thread under the lock (consistent with the offset), then encoded
   and written in a thread in the background; nothing of it on the event loop.

Anything else that raises in 1-3 leaves the touched stores half-updated: they
are dropped (rebuilt from the last snapshot + Kafka on the next attempt), the
batch is retried with back-off, and after ``MAX_ATTEMPTS`` its records go to
the DLQ with the error as the reason and are skipped by later replays. A
cancelled batch (shutdown) drops its stores the same way, so a shutdown
snapshot never holds samples whose offsets were not committed.

Kept free of Faust and of the consumer so tests drive it with plain records,
an in-memory partition log and fake sinks, including crash and resume, the way
Bytewax tests recovery without a broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from app.settings import Settings
from streams.dlq import dlq_records
from streams.recovery import KafkaPartitionLog, LogRecord, SnapshotStore, plan_recovery, record_crc
from streams.schema import DecodedBatch, Rejected, decode_messages, limits_from_settings
from streams.scorer import Scorer
from streams.scores import ScoreBatch
from streams.sinks.kafka_out import OutRecord, send_all
from streams.sinks.scores_topic import score_records
from streams.window_store import WindowStore

log = logging.getLogger(__name__)

EVICT_EVERY_S = 60.0
MAX_ATTEMPTS = 3  # a batch that raises this often is dead-lettered
MAX_BACKOFF_S = 5.0
RESYNC_CHECK_S = 10.0  # how often a worker asks whether Redis still holds its scores
PENDING_KEY = "pending_vm"  # snapshot array: VMs with samples not yet scored


@dataclass(frozen=True)
class Record:
    """One Kafka record as the pipeline needs it."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes
    timestamp_ms: int | None = None  # the broker's record timestamp: when the sample arrived


@dataclass
class PartitionState:
    store: WindowStore
    next_offset: int  # the store holds every record below this offset
    redeliver_from: int  # offsets in [redeliver_from, next_offset) may come again (snapshot ahead of the commit)
    last_snapshot: float = field(default_factory=time.monotonic)
    last_evict: float = field(default_factory=time.monotonic)
    dropped_seen: int = 0  # late samples of this store already counted in the metric
    pending: set[str] = field(default_factory=set)  # VMs with samples not yet scored
    last_crc: int = -1  # fingerprint of the record at next_offset - 1
    snapshot_offset: int = -1  # next_offset of the newest snapshot taken (-1: none yet)


@dataclass
class BatchResult:
    samples: int = 0
    rejected: int = 0
    scored: int = 0
    stale: int = 0
    evicted: int = 0
    dead_lettered: int = 0  # records of a batch that kept failing, sent to the DLQ
    commit: dict[int, int] = field(default_factory=dict)  # partition -> next offset to commit


@dataclass
class _Computed:
    decoded: dict[int, DecodedBatch]
    scores: list[tuple[PartitionState, ScoreBatch]]
    evicted: list[tuple[list[str], np.ndarray]]  # (vm ids, their newest sample ts) per partition


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
        partition_log: Callable[[int], Any] | None = None,
        snapshots: SnapshotStore | None = None,
        worker_name: str | None = None,
        on_redis_reset: Callable[[], Awaitable[Any]] | None = None,
    ) -> None:
        self.settings = settings
        self.scorer = scorer
        self.producer = producer
        self.redis_sink = redis_sink
        self.history = history
        self.metrics = metrics
        self.xp = xp
        self.clock = clock
        self.limits = limits_from_settings(settings)
        self.partitions: dict[int, PartitionState] = {}
        self.snapshots = snapshots or SnapshotStore(settings.snapshot_dir, settings.consumer_group, settings.topic_metrics)
        self._partition_log = partition_log or (
            lambda p: KafkaPartitionLog(settings.aiokafka_kwargs(), settings.topic_metrics, p)
        )
        self._dead: dict[int, list[tuple[int, int]]] = {}  # partition -> dead-lettered offset ranges
        self._history_task: asyncio.Task[None] | None = None
        self._history_dropped_seen = 0
        self._history_retry_at = 0.0  # monotonic time before which a failed archive is not retried
        self.worker_name = worker_name  # for the Redis marker that tells a Redis restarted empty
        self._last_resync_check = -RESYNC_CHECK_S
        self._on_redis_reset = on_redis_reset  # shared state to write back once Redis came back empty
        self._lock = asyncio.Lock()
        self._snapshot_task: asyncio.Task[None] | None = None  # the snapshot file being written, if any

    # ------------------------------------------------------------------ partitions
    def _new_store(self) -> WindowStore:
        s = self.settings
        return WindowStore(s.window_slots, s.slot_s, s.vm_ttl_s, xp=self.xp)

    def _decode(self, records: Sequence[Record | LogRecord], now: float) -> DecodedBatch:
        return decode_messages([r.value for r in records], [r.key for r in records], now=now, limits=self.limits)

    def _seen(self, decoded: DecodedBatch, records: Sequence[Record | LogRecord], now: float) -> np.ndarray:
        """Arrival time of each sample: its record's broker timestamp, never later than now."""
        stamps = np.array([now * 1000 if r.timestamp_ms is None else r.timestamp_ms for r in records], dtype=np.float64)
        return np.minimum(stamps[decoded.source] / 1000.0, now)

    def _is_dead(self, partition: int, offset: int) -> bool:
        return any(lo <= offset <= hi for lo, hi in self._dead.get(partition, ()))

    async def _ensure_partition(self, partition: int, first_offset: int) -> PartitionState:
        """The partition's state, rebuilt when the worker has none or the offsets went backwards.

        ``first_offset`` below ``next_offset`` but not below ``redeliver_from`` is
        the expected re-delivery after a restart whose snapshot was ahead of the
        commit: ``process`` skips what the store already holds. Anything further
        back means the log changed under us (topic recreated): rebuild.
        """
        state = self.partitions.get(partition)
        if state is not None and first_offset >= state.redeliver_from:
            return state
        reason = "first sight" if state is None else f"offsets went back from {state.next_offset} to {first_offset}"
        started = time.monotonic()
        now = self.clock()
        snap = await asyncio.to_thread(self.snapshots.load, partition)
        archived = await asyncio.to_thread(self.history.archived_until, partition) if self.history is not None else None
        async with self._partition_log(partition) as plog:
            plan = await plan_recovery(snap, plog, since_ts=now - self.settings.window_span_s)
            store, pending = await asyncio.to_thread(self._restore, plan.snapshot)
            state = PartitionState(
                store=store,
                next_offset=max(first_offset, plan.start) if plan.snapshot else first_offset,
                redeliver_from=first_offset,
                dropped_seen=store.dropped_old,
                pending=pending,
            )
            # the window gets [plan.start, first_offset); the archive what it lacks before live
            # processing takes over at next_offset (rows a killed worker still buffered)
            lo, hi = plan.start, first_offset
            refill_from = archived if archived is not None and archived < state.next_offset else None
            if refill_from is not None:
                lo, hi = min(lo, refill_from), state.next_offset

            def apply(records: list[LogRecord]) -> None:
                records = [r for r in records if not self._is_dead(partition, r.offset)]
                decoded = self._decode(records, now)
                offsets = np.array([r.offset for r in records], dtype=np.int64)
                row_offsets = offsets[decoded.source]
                window = (row_offsets >= plan.start) & (row_offsets < first_offset)
                if window.any():
                    rows = decoded if window.all() else decoded.subset(window)
                    seen = self._seen(decoded, records, now)[window]
                    store.update(rows.vm, rows.host, rows.ts, rows.values, seen=seen)
                    state.pending.update(rows.vm)
                if refill_from is not None:
                    hist = (row_offsets >= refill_from) & (row_offsets < state.next_offset)
                    last = offsets[offsets < state.next_offset]
                    mark = {partition: int(last[-1]) + 1} if last.size else None
                    self.history.write(decoded if hist.all() else decoded.subset(hist), mark)  # type: ignore[union-attr]
                in_window = [r for r in records if plan.start <= r.offset < first_offset]
                if in_window:
                    last_rec = in_window[-1]
                    state.last_crc = record_crc(last_rec.key, last_rec.value, last_rec.timestamp_ms)

            replayed = await plog.replay(lo, hi, apply)
        if self.history is not None and archived is None:
            await asyncio.to_thread(self.history.mark_start, partition, state.next_offset)
        self.partitions[partition] = state
        if self.metrics is not None:
            self.metrics.recovery_replayed.inc(replayed)
            self.metrics.recovery_gap.inc(plan.gap)
        log.info(
            "partition %d ready (%s): %s, replayed %d records [%d, %d) in %.2fs%s",
            partition, reason, plan.why, replayed, plan.start, max(plan.start, first_offset), time.monotonic() - started,
            "" if refill_from is None else f"; history archive refilled from offset {refill_from} to {state.next_offset}",
        )  # fmt: skip
        if refill_from is not None and self.history is not None and self.history.flush_due():
            self._start_history_flush()
        return state

    def _restore(self, snap: Any) -> tuple[WindowStore, set[str]]:
        """The snapshot's store and pending VMs, or an empty store when it is missing or unusable."""
        if snap is None:
            return self._new_store(), set()
        try:
            store = WindowStore.restore(snap.arrays, xp=self.xp)
        except (KeyError, ValueError) as exc:  # another snapshot format: Kafka still has the data
            log.warning("snapshot unusable (%s): rebuilding from Kafka", exc)
            return self._new_store(), set()
        if store.n_slots != self.settings.window_slots or store.slot_s != self.settings.slot_s:
            log.warning("snapshot has another window shape: rebuilding from Kafka")
            return self._new_store(), set()
        pending = {str(v) for v in np.asarray(snap.arrays.get(PENDING_KEY, np.zeros(0, np.str_))).tolist()}
        return store, pending & set(store.row_of)

    def release(self, partitions: Sequence[int]) -> None:
        """Forget partitions (revoked, or half-updated by a failed batch); their next owner rebuilds them."""
        for p in partitions:
            self.partitions.pop(p, None)

    # ------------------------------------------------------------------ batch
    async def process(self, records: Sequence[Record]) -> BatchResult:
        """Handle one micro-batch end to end; returns once every sink write succeeded (or the batch was dead-lettered)."""
        if not records:
            return BatchResult()
        async with self._lock:
            if self.metrics is not None:
                self.metrics.batch_begins()
            try:
                return await self._process_with_retries(records)
            finally:
                if self.metrics is not None:
                    self.metrics.batch_ends()

    async def _process_with_retries(self, records: Sequence[Record]) -> BatchResult:
        touched = sorted({r.partition for r in records})
        delay = 0.5
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                return await self._process_once(records)
            except asyncio.CancelledError:
                self.release(touched)  # half-applied: the shutdown snapshot must not include it
                raise
            except Exception as exc:
                self.release(touched)
                if self.metrics is not None:
                    self.metrics.batch_errors.inc()
                if attempt == MAX_ATTEMPTS:
                    log.exception("batch of %d records failed %d times: dead-lettering it", len(records), attempt)
                    return await self._dead_letter(records, f"worker failed on this batch: {type(exc).__name__}: {exc}")
                log.exception("batch of %d records failed (attempt %d of %d); retrying in %.1fs",
                              len(records), attempt, MAX_ATTEMPTS, delay)  # fmt: skip
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF_S)
        raise AssertionError("unreachable")

    async def _process_once(self, records: Sequence[Record]) -> BatchResult:
        started = time.perf_counter()
        by_partition: dict[int, list[Record]] = {}
        for r in records:
            by_partition.setdefault(r.partition, []).append(r)
        states = {p: await self._ensure_partition(p, rs[0].offset) for p, rs in by_partition.items()}
        result = BatchResult(commit={p: rs[-1].offset + 1 for p, rs in by_partition.items()})
        # records the windows already hold (re-delivered after a restart) are skipped, not double-counted
        kept = {p: [r for r in rs if r.offset >= states[p].next_offset] for p, rs in by_partition.items()}
        skipped = sum(len(rs) - len(kept[p]) for p, rs in by_partition.items())
        if skipped and self.metrics is not None:
            self.metrics.recovery_skipped.inc(skipped)
        kept = {p: rs for p, rs in kept.items() if rs}
        now = self.clock()
        computed = await asyncio.to_thread(self._compute, kept, states, now)
        result.samples = sum(len(d.vm) for d in computed.decoded.values())
        result.rejected = sum(len(d.rejected) for d in computed.decoded.values())
        result.evicted = sum(len(vms) for vms, _ in computed.evicted)
        await self._write_sinks(computed, kept, result)
        for p, rs in kept.items():
            st = states[p]
            st.next_offset = max(st.next_offset, rs[-1].offset + 1)
            st.last_crc = record_crc(rs[-1].key, rs[-1].value, rs[-1].timestamp_ms)
        self._scored(computed)
        result.scored = sum(len(b) for _, b in computed.scores)
        self._observe(computed.decoded, result, started)
        await self._maybe_snapshot()
        return result

    def _compute(self, by_partition: dict[int, list[Record]], states: dict[int, PartitionState], now: float) -> _Computed:
        """CPU/GPU part of a batch, run off the event loop."""
        out = _Computed({}, [], [])
        for p, rs in by_partition.items():
            d = self._decode(rs, now)
            out.decoded[p] = d
            state = states[p]
            if len(d.vm):
                state.store.update(d.vm, d.host, d.ts, d.values, seen=self._seen(d, rs, now))
                state.pending.update(d.vm)
        for state in states.values():
            gone = self._maybe_evict(state, now)
            if gone is not None:
                out.evicted.append(gone)
            batch = self._score_pending(state, now)
            if batch is not None:
                out.scores.append((state, batch))
        return out

    def _maybe_evict(self, state: PartitionState, now: float) -> tuple[list[str], np.ndarray] | None:
        """Release VMs nothing arrived from for ``vm_ttl_s`` (wall clock: a sample's own ``ts`` cannot evict others)."""
        if time.monotonic() - state.last_evict < EVICT_EVERY_S or len(state.store) == 0:
            return None
        state.last_evict = time.monotonic()
        rows = state.store.idle_rows(now)
        if rows.size == 0:
            return None
        newest = state.store.last_ts[rows].copy()
        gone = state.store.release(rows)
        state.pending.difference_update(gone)
        log.info("evicted %d VMs silent for more than %ss", len(gone), self.settings.vm_ttl_s)
        return gone, newest

    def _score_pending(self, state: PartitionState, now: float) -> ScoreBatch | None:
        if not state.pending:
            return None
        rows = state.store.rows_of(sorted(state.pending))
        due = self.scorer.due_rows(state.store, rows, now)
        if len(due) == 0:
            return None
        return self.scorer.score(state.store, due, now)

    @staticmethod
    def _scored(computed: _Computed) -> None:
        """After the sinks took the scores: those VMs no longer wait for one."""
        for state, batch in computed.scores:
            state.pending.difference_update(batch.vm)

    async def mark_redis(self) -> None:
        """At start, before any VM is held: set this worker's Redis marker (nothing to re-score yet)."""
        if self.worker_name is None:
            return
        try:
            await self.redis_sink.held_since_last_check(self.worker_name)
            self._last_resync_check = time.monotonic()
        except Exception as exc:  # Redis away at start: the first timer check sets it (and re-scores)
            log.debug("Redis marker not set at start: %s", exc)

    async def _resync_if_redis_was_reset(self) -> None:
        """Redis came back empty: every VM this worker holds is scored again (not only those with new samples)."""
        if time.monotonic() - self._last_resync_check < RESYNC_CHECK_S or self.worker_name is None:
            return
        self._last_resync_check = time.monotonic()
        try:
            held = await self.redis_sink.held_since_last_check(self.worker_name)
        except Exception as exc:  # Redis away: the sinks report it; check again later
            log.debug("Redis marker check failed: %s", exc)
            return
        if held:
            return
        if self._on_redis_reset is not None:
            try:
                await self._on_redis_reset()
            except Exception as exc:  # Redis away again: the readers of that state repair it too
                log.warning("writing shared state back to Redis failed (%s: %s)", type(exc).__name__, exc)
        vms = 0
        for state in self.partitions.values():
            rows = state.store.active_rows()
            state.store.scored_slot[rows] = -1  # due whatever rescore_s says
            state.pending.update(state.store.vm_of_row[r] for r in rows.tolist())
            vms += rows.size
        if vms:
            log.warning("Redis holds none of this worker's scores (restarted empty?): scoring its %d VMs again", vms)

    async def flush_due(self) -> int:
        """Score pending VMs that became due with no new traffic, evict idle ones, take due snapshots and
        history flushes (a timer calls it)."""
        async with self._lock:
            await self._resync_if_redis_was_reset()
            if self.history is not None and self.history.flush_due():  # rows of a stream that went quiet
                self._start_history_flush()
            now = self.clock()

            def compute() -> _Computed:
                out = _Computed({}, [], [])
                for state in self.partitions.values():
                    if (gone := self._maybe_evict(state, now)) is not None:
                        out.evicted.append(gone)
                    if (batch := self._score_pending(state, now)) is not None:
                        out.scores.append((state, batch))
                return out

            computed = await asyncio.to_thread(compute)
            result = BatchResult(evicted=sum(len(v) for v, _ in computed.evicted))
            await self._write_sinks(computed, {}, result)
            self._scored(computed)
            scored = sum(len(b) for _, b in computed.scores)
            if self.metrics is not None:
                self.metrics.vms_evicted.inc(result.evicted)
                self.metrics.vms_scored.inc(scored)
            await self._maybe_snapshot()  # one skipped while another file was written, once traffic stops
            return scored

    # ------------------------------------------------------------------ sinks
    def _dlq_out(self, rejected: Sequence[Rejected], sources: Sequence[Any] | None) -> list[OutRecord]:
        topic = self.settings.topic_dlq
        return [OutRecord(topic, key, value, tuple(hdrs), output="dlq") for key, value, hdrs in dlq_records(rejected, sources=sources)]

    async def _write_sinks(self, computed: _Computed, records: dict[int, list[Record]], result: BatchResult) -> None:
        s = self.settings
        out: list[OutRecord] = []
        for p, d in computed.decoded.items():
            rs = records[p]
            sources = [(s.topic_metrics, p, rs[r.index].offset) if r.index >= 0 else None for r in d.rejected]
            out += self._dlq_out(d.rejected, sources)
        for _, batch in computed.scores:
            out += [OutRecord(s.topic_scores, key, value) for key, value in score_records(batch)]
        writes = [self.retry("redis", lambda b=batch: self.redis_sink.write_counts(b)) for _, batch in computed.scores]
        for written in await asyncio.gather(self._send(out), *writes):
            if written is not None:
                result.stale += written.skipped
        for vms, newest in computed.evicted:
            await self.retry("redis", lambda v=vms, t=newest: self.redis_sink.forget(v, t))
        self._archive(computed.decoded, records)

    async def _send(self, records: list[OutRecord]) -> None:
        if not records:
            return None
        m = self.metrics

        def on_error(rec: OutRecord, exc: BaseException) -> None:
            if m is not None:
                m.kafka_send_errors.labels(output=rec.output).inc()

        def on_healthy(up: bool) -> None:
            if m is not None:
                m.set_sink_up("kafka", up)

        await send_all(self.producer, records, on_error=on_error, on_healthy=on_healthy)
        return None

    def _archive(self, decoded: dict[int, DecodedBatch], records: dict[int, list[Record]]) -> None:
        """Buffer valid samples for the Parquet history, with the offset each partition's archive will
        then have reached; a flush runs in the background (best effort)."""
        if self.history is None:
            return
        due = [self.history.write(d, {p: records[p][-1].offset + 1}) for p, d in decoded.items() if records.get(p)]
        if any(due):
            self._start_history_flush()

    def _start_history_flush(self) -> None:
        if self._history_task is not None and not self._history_task.done():
            return  # one flush at a time; the next batch starts another if still due
        if time.monotonic() < self._history_retry_at:
            return  # the archive just failed: do not regroup the whole buffer on every batch

        async def flush() -> None:
            try:
                await asyncio.to_thread(self.history.flush)
                self._sink_up("history", True)
            except Exception as exc:  # the archive is best effort: rows stay buffered (bounded) for the next try
                self._sink_up("history", False)
                self._history_retry_at = time.monotonic() + self.settings.history_flush_s
                log.warning("history flush failed (%s); rows kept, next try in %.0f s", exc, self.settings.history_flush_s)

        self._history_task = asyncio.get_running_loop().create_task(flush(), name="history-flush")

    def _sink_up(self, sink: str, up: bool) -> None:
        if self.metrics is not None:
            self.metrics.set_sink_up(sink, up)

    async def retry(self, what: str, attempt: Callable[[], Any]) -> Any:
        """Retry a sink write with capped exponential back-off until it succeeds (``what``: the sink's name)."""
        delay = 0.1
        while True:
            try:
                t0 = time.perf_counter()
                out = await attempt()
                if what == "redis" and self.metrics is not None:
                    self.metrics.redis_write.observe(time.perf_counter() - t0)
                self._sink_up(what, True)
                return out
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.metrics is not None and what == "redis":
                    self.metrics.redis_errors.inc()
                self._sink_up(what, False)
                log.warning("%s write failed (%s: %s); retrying in %.1fs", what, type(exc).__name__, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF_S)

    async def _dead_letter(self, records: Sequence[Record], reason: str) -> BatchResult:
        """A batch that keeps failing: its records to the DLQ, their offsets skipped from now on."""
        by_partition: dict[int, list[Record]] = {}
        for r in records:
            by_partition.setdefault(r.partition, []).append(r)
        out: list[OutRecord] = []
        for p, rs in by_partition.items():
            self._dead.setdefault(p, []).append((rs[0].offset, rs[-1].offset))
            rejected = [Rejected(raw=r.value, key=r.key, reason=reason) for r in rs]
            out += self._dlq_out(rejected, [(self.settings.topic_metrics, p, r.offset) for r in rs])
        await self._send(out)
        if self.metrics is not None:
            self.metrics.dlq.inc(len(records))
        return BatchResult(dead_lettered=len(records), commit={p: rs[-1].offset + 1 for p, rs in by_partition.items()})

    # ------------------------------------------------------------------ snapshots
    async def _maybe_snapshot(self, force: bool = False, only: Sequence[int] | None = None) -> None:
        """Snapshot the partitions that are due (all of ``only`` with ``force``); the caller holds the lock.

        Two steps, neither on the event loop: the copy of the store (with its next
        offset, fingerprint and pending VMs) in a thread while the caller holds the
        lock, so no batch is applied to it half; then encoding and writing the file
        in a thread as a background task, without the lock, so the next batches do
        not wait for it. One file is written at a time: a partition due while
        another is being written is taken after a later batch or timer tick
        (``flush_due``); one with no new records since its last snapshot is not
        taken again. ``force`` (shutdown, revocation) takes every partition and
        waits for the files, written without deflate (about 2x the bytes in a
        quarter of the time: those snapshots race a deadline).
        """
        now = time.monotonic()
        for p, state in list(self.partitions.items()):
            if only is not None and p not in only:
                continue
            if not force and (
                now - state.last_snapshot < self.settings.snapshot_every_s or state.next_offset == state.snapshot_offset
            ):
                continue  # not due, or nothing new since the last one
            writing = self._snapshot_task
            if writing is not None and not writing.done():
                if not force:
                    return  # one file at a time: the due partitions are taken after a later batch
                await asyncio.wait({writing})  # the newer snapshot must land after the older one
            state.last_snapshot, state.snapshot_offset = now, state.next_offset
            try:
                arrays = await asyncio.to_thread(self._snapshot_arrays, state)
            except Exception as exc:  # out of memory: recovery replays more from Kafka instead
                self._snapshot_failed(p, state, exc)
                continue
            task = asyncio.get_running_loop().create_task(
                self._write_snapshot(p, state, arrays, state.next_offset, state.last_crc, deflate=not force),
                name=f"snapshot-p{p}",
            )
            self._snapshot_task = task
            if force:
                await asyncio.wait({task})  # a timeout around this leaves the write running, not torn

    @staticmethod
    def _snapshot_arrays(state: PartitionState) -> dict[str, np.ndarray]:
        """A copy of the partition's store and pending VMs (in a thread, under the pipeline lock)."""
        arrays = state.store.snapshot()
        arrays[PENDING_KEY] = np.array(sorted(state.pending), dtype=np.str_)
        return arrays

    async def _write_snapshot(
        self, p: int, state: PartitionState, arrays: dict[str, np.ndarray], next_offset: int, last_crc: int,
        deflate: bool = True,
    ) -> None:
        try:
            await asyncio.to_thread(self.snapshots.save, p, arrays, next_offset, last_crc, deflate=deflate)
        except Exception as exc:  # disk full, store down: recovery replays more from Kafka instead
            self._snapshot_failed(p, state, exc)
            return
        self._sink_up("snapshots", True)
        self._dead[p] = [(lo, hi) for lo, hi in self._dead.get(p, []) if hi >= next_offset]

    def _snapshot_failed(self, p: int, state: PartitionState, exc: BaseException) -> None:
        state.snapshot_offset = -1  # taken again when due, new records or not
        if self.metrics is not None:
            self.metrics.snapshot_errors.inc()
        self._sink_up("snapshots", False)
        log.error("snapshot of partition %d failed (%s); recovery will replay more from Kafka", p, exc)

    async def wait_snapshots(self) -> None:
        """Until the snapshot file being written in the background (if any) is written or has failed."""
        task = self._snapshot_task
        if task is not None and not task.done():
            await asyncio.wait({task})

    async def snapshot_all(self, only: Sequence[int] | None = None) -> None:
        """Snapshot every partition (or ``only`` these) now and wait for the files (shutdown, revocation)."""
        async with self._lock:
            await self._maybe_snapshot(force=True, only=only)
        await self.wait_snapshots()  # also one of a partition released meanwhile

    async def snapshot_and_release(self, partitions: Sequence[int], timeout_s: float) -> None:
        """On revocation: snapshot then forget ``partitions``; a batch stuck on a sink is not waited for longer than ``timeout_s``."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.snapshot_all(only=partitions), timeout_s)
        self.release(partitions)

    async def wait_history(self) -> None:
        task = self._history_task
        if task is not None:
            with contextlib.suppress(Exception):
                await task

    # ------------------------------------------------------------------ metrics
    def _observe(self, decoded: dict[int, DecodedBatch], result: BatchResult, started: float) -> None:
        m = self.metrics
        if m is None:
            return
        m.samples_in.inc(result.samples)
        m.samples_invalid.inc(result.rejected)
        m.dlq.inc(result.rejected)
        m.vms_scored.inc(result.scored)
        m.vms_evicted.inc(result.evicted)
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
        if self.history is not None:
            m.history_buffered.set(self.history.buffered_rows)
            dropped = self.history.dropped_rows
            if dropped > self._history_dropped_seen:
                m.history_dropped.inc(dropped - self._history_dropped_seen)
                self._history_dropped_seen = dropped
