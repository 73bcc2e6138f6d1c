"""Window snapshots and replay: how a worker resumes a partition without gaps.

The commit order of a batch (after Quix Streams' checkpoint) is written down in
``streams.pipeline``: sinks, then offsets, then every ``snapshot_every_s`` the
partition's window store with the offset it covers (``next_offset``: the first
offset *not* in the snapshot), written atomically (temp file, then rename).

A partition's store is (re)built whenever the worker meets a partition it holds
no state for (start, ``kill -9``, rebalance, a failed batch): load the newest
snapshot, check that it belongs to the log as it is now, then replay
``[start, first offset the consumer delivers)`` from Kafka without sinks
(:func:`plan_recovery` decides ``start``):

- a snapshot whose offset lies beyond the log end, or whose last record differs
  from the record now at that offset (crc32 of key, value and timestamp), was
  taken on another incarnation of the topic (recreated, another cluster, same
  group): it is discarded, never used to skip records;
- a snapshot older than the log start (retention deleted what followed it) is
  used, the records in between are counted as a gap and logged, and the replay
  starts at the log start: the windows keep what the snapshot and the log
  still have, and the operator is told what is missing;
- no usable snapshot: replay the retained window span (offsets for ``now - span``).

Snapshots are ``.npz`` arrays only (no pickle), written through fsspec, so an
object store works as well as a local directory.
"""

from __future__ import annotations

import io
import logging
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import fsspec
import numpy as np

log = logging.getLogger(__name__)

OFFSET_KEY = "__next_offset__"
CRC_KEY = "__last_record_crc__"
NO_CRC = -1


def record_crc(key: bytes | None, value: bytes | None, timestamp_ms: int | None) -> int:
    """A fingerprint of one Kafka record: tells the same log from a recreated one at the same offset."""
    crc = zlib.crc32(key or b"")
    crc = zlib.crc32(value or b"", crc)
    return zlib.crc32(str(timestamp_ms if timestamp_ms is not None else -1).encode(), crc)


@dataclass
class Snapshot:
    arrays: dict[str, np.ndarray]
    next_offset: int
    last_record_crc: int = NO_CRC  # fingerprint of the record at next_offset - 1 (NO_CRC: unknown)


class SnapshotStore:
    """Per-partition window snapshots under one fsspec URL."""

    def __init__(self, url: str, group: str, topic: str) -> None:
        self.fs, root = fsspec.core.url_to_fs(url)
        self.root = f"{root.rstrip('/')}/{group}/{topic}"

    def _path(self, partition: int) -> str:
        return f"{self.root}/p{partition:04d}.npz"

    def save(self, partition: int, arrays: dict[str, np.ndarray], next_offset: int, last_record_crc: int = NO_CRC) -> None:
        buf = io.BytesIO()
        meta = {OFFSET_KEY: np.asarray(next_offset, dtype=np.int64), CRC_KEY: np.asarray(last_record_crc, dtype=np.int64)}
        np.savez(buf, **arrays, **meta)
        path = self._path(partition)
        tmp = f"{path}.tmp-{time.monotonic_ns()}"
        self.fs.makedirs(self.root, exist_ok=True)
        try:
            with self.fs.open(tmp, "wb") as fh:
                fh.write(buf.getvalue())
            self.fs.mv(tmp, path)
        except BaseException:
            try:  # a full disk must not also leave a torn temp file behind
                self.fs.rm(tmp)
            except Exception:  # noqa: BLE001 - best effort
                pass
            raise

    def load(self, partition: int) -> Snapshot | None:
        path = self._path(partition)
        try:
            if not self.fs.exists(path):
                return None
            with self.fs.open(path, "rb") as fh:
                data = fh.read()
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files if k not in (OFFSET_KEY, CRC_KEY)}
                next_offset = int(npz[OFFSET_KEY])
                crc = int(npz[CRC_KEY]) if CRC_KEY in npz.files else NO_CRC
        except Exception as exc:  # a torn or foreign file must not stop the worker
            log.error("snapshot %s unreadable (%s): rebuilding the partition from Kafka", path, exc)
            return None
        return Snapshot(arrays, next_offset, crc)


@dataclass(frozen=True)
class LogRecord:
    """What replay hands to ``apply``: one Kafka record."""

    offset: int
    key: bytes | None
    value: bytes
    timestamp_ms: int | None


class PartitionLog(Protocol):
    """The one partition of the input topic that a recovery reads (Kafka, or a list in tests)."""

    async def bounds(self) -> tuple[int, int]:
        """(first offset still in the log, offset the next record will get)."""

    async def offset_for_time(self, ts: float) -> int | None:
        """First offset whose record timestamp is >= ``ts`` (epoch s), None when there is none."""

    async def crc_at(self, offset: int) -> int | None:
        """``record_crc`` of the record at ``offset``, None when it is gone or was never written."""

    async def replay(self, start: int, end: int, apply: Callable[[list[LogRecord]], None]) -> int:
        """Feed ``apply`` the records in ``[start, end)`` in chunks; returns how many."""


@dataclass(frozen=True)
class RecoveryPlan:
    snapshot: Snapshot | None  # the snapshot to restore, None: start empty
    start: int  # first offset to replay
    gap: int  # records between the snapshot and the log start that retention deleted
    why: str  # for the log line


async def plan_recovery(snap: Snapshot | None, plog: PartitionLog, since_ts: float) -> RecoveryPlan:
    """Decide which snapshot (if any) to restore and where the replay starts; see the module docstring."""
    begin, end = await plog.bounds()
    why = "no snapshot"
    if snap is not None:
        if snap.next_offset > end:
            why = f"snapshot at offset {snap.next_offset} is beyond the log end {end} (topic recreated?): discarded"
            log.warning("%s", why)
            snap = None
        elif snap.next_offset > begin and snap.last_record_crc != NO_CRC and (
            await plog.crc_at(snap.next_offset - 1)
        ) != snap.last_record_crc:
            why = f"the record before snapshot offset {snap.next_offset} is not the one snapshotted (topic recreated?): discarded"
            log.warning("%s", why)
            snap = None
        elif snap.next_offset < begin:
            gap = begin - snap.next_offset
            log.warning(
                "snapshot at offset %d is older than the log start %d: %d records were deleted by retention "
                "and are missing from the windows", snap.next_offset, begin, gap,
            )
            return RecoveryPlan(snap, begin, gap, f"snapshot at {snap.next_offset}, {gap} records lost to retention")
        else:
            return RecoveryPlan(snap, snap.next_offset, 0, f"snapshot at offset {snap.next_offset}")
    found = await plog.offset_for_time(since_ts)
    start = end if found is None else max(found, begin)
    return RecoveryPlan(None, start, 0, why)


class KafkaPartitionLog:
    """``PartitionLog`` over one Kafka partition, with a plain (group-less) aiokafka consumer."""

    def __init__(self, consumer_kwargs: dict[str, Any], topic: str, partition: int, chunk: int = 5000) -> None:
        from aiokafka import TopicPartition

        self._kwargs = consumer_kwargs
        self.tp = TopicPartition(topic, partition)
        self.chunk = chunk
        self._consumer: Any = None

    async def __aenter__(self) -> KafkaPartitionLog:
        from aiokafka import AIOKafkaConsumer

        self._consumer = AIOKafkaConsumer(enable_auto_commit=False, group_id=None, auto_offset_reset="none", **self._kwargs)
        await self._consumer.start()
        self._consumer.assign([self.tp])
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._consumer.stop()

    async def bounds(self) -> tuple[int, int]:
        first = (await self._consumer.beginning_offsets([self.tp]))[self.tp]
        last = (await self._consumer.end_offsets([self.tp]))[self.tp]
        return int(first), int(last)

    async def offset_for_time(self, ts: float) -> int | None:
        found = (await self._consumer.offsets_for_times({self.tp: int(ts * 1000)})).get(self.tp)
        return None if found is None else int(found.offset)

    async def crc_at(self, offset: int) -> int | None:
        begin, end = await self.bounds()
        if not begin <= offset < end:
            return None
        self._consumer.seek(self.tp, offset)
        batch = await self._consumer.getmany(self.tp, timeout_ms=5000, max_records=1)
        for r in batch.get(self.tp, []):
            if r.offset == offset:
                return record_crc(r.key, r.value, r.timestamp)
        return None  # compacted away or a transaction marker: cannot tell, treat as different

    async def replay(self, start: int, end: int, apply: Callable[[list[LogRecord]], None]) -> int:
        if start >= end:
            return 0
        self._consumer.seek(self.tp, start)
        replayed = 0
        while (await self._consumer.position(self.tp)) < end:
            batch = await self._consumer.getmany(self.tp, timeout_ms=1000, max_records=self.chunk)
            records = [LogRecord(r.offset, r.key, r.value, r.timestamp) for r in batch.get(self.tp, []) if r.offset < end]
            if not records:
                continue
            apply(records)
            replayed += len(records)
            if records[-1].offset >= end - 1:
                break
        return replayed
