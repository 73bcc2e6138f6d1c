"""Window snapshots and replay: how a worker resumes a partition without gaps.

The commit order (after Quix Streams' checkpoint) is:

1. the batch's sinks succeed (Redis, ``vm.scores``), then its events are acked
   and Faust commits those offsets in the background;
2. every ``snapshot_every_s`` the partition's window store is written with the
   offset it covers (``next_offset``: the first offset *not* in the snapshot),
   atomically (temp file, then rename).

A partition's store is (re)built whenever the first offset the worker sees for
it is not the offset its store expects (worker restart, ``kill -9``, rebalance to
another worker, partition coming back): load the newest snapshot, then replay
``[snapshot.next_offset, first_offset_seen)`` from Kafka with a plain consumer.
No snapshot: replay the whole retained window span (offsets for ``now - span``).
Snapshots are ``.npz`` arrays only (no pickle), written through fsspec, so an
object store works as well as a local directory.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import fsspec
import numpy as np

log = logging.getLogger(__name__)

OFFSET_KEY = "__next_offset__"


@dataclass
class Snapshot:
    arrays: dict[str, np.ndarray]
    next_offset: int


class SnapshotStore:
    """Per-partition window snapshots under one fsspec URL."""

    def __init__(self, url: str, group: str, topic: str) -> None:
        self.fs, root = fsspec.core.url_to_fs(url)
        self.root = f"{root.rstrip('/')}/{group}/{topic}"

    def _path(self, partition: int) -> str:
        return f"{self.root}/p{partition:04d}.npz"

    def save(self, partition: int, arrays: dict[str, np.ndarray], next_offset: int) -> None:
        buf = io.BytesIO()
        np.savez(buf, **arrays, **{OFFSET_KEY: np.asarray(next_offset, dtype=np.int64)})
        path = self._path(partition)
        tmp = f"{path}.tmp-{time.monotonic_ns()}"
        self.fs.makedirs(self.root, exist_ok=True)
        with self.fs.open(tmp, "wb") as fh:
            fh.write(buf.getvalue())
        self.fs.mv(tmp, path)

    def load(self, partition: int) -> Snapshot | None:
        path = self._path(partition)
        if not self.fs.exists(path):
            return None
        try:
            with self.fs.open(path, "rb") as fh:
                data = fh.read()
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files if k != OFFSET_KEY}
                next_offset = int(npz[OFFSET_KEY])
        except Exception as exc:  # a torn or foreign file must not stop the worker
            log.error("snapshot %s unreadable (%s): rebuilding the partition from Kafka", path, exc)
            return None
        return Snapshot(arrays, next_offset)


async def replay_range(
    settings_kwargs: dict,
    topic: str,
    partition: int,
    start: int | None,
    end: int,
    apply: Callable[[list[bytes], list[bytes | None]], None],
    *,
    since_ts: float | None = None,
    chunk: int = 5000,
) -> int:
    """Feed ``apply`` the records of ``topic[partition]`` in ``[start, end)``.

    ``start=None`` means "from the first offset whose timestamp is >= since_ts"
    (or the beginning). Returns how many records were replayed.
    """
    from aiokafka import AIOKafkaConsumer, TopicPartition

    if start is not None and start >= end:
        return 0
    tp = TopicPartition(topic, partition)
    consumer = AIOKafkaConsumer(enable_auto_commit=False, group_id=None, **settings_kwargs)
    await consumer.start()
    replayed = 0
    try:
        consumer.assign([tp])
        if start is None:
            start = 0
            if since_ts is not None:
                found = await consumer.offsets_for_times({tp: int(since_ts * 1000)})
                if found.get(tp) is not None:
                    start = found[tp].offset
                else:
                    start = end
            first = (await consumer.beginning_offsets([tp]))[tp]
            start = max(start, first)
        if start >= end:
            return 0
        consumer.seek(tp, start)
        while True:
            position = await consumer.position(tp)
            if position >= end:
                break
            batch = await consumer.getmany(tp, timeout_ms=1000, max_records=chunk)
            records = [r for r in batch.get(tp, []) if r.offset < end]
            if not records:
                continue
            apply([r.value for r in records], [r.key for r in records])
            replayed += len(records)
            if records[-1].offset >= end - 1:
                break
    finally:
        await consumer.stop()
    return replayed
