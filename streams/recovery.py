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
object store works as well as a local directory. File format 2 (``FORMAT_KEY``;
files without it are format 1, a plain ``np.savez``, and still load) keeps
every value bit for bit but is about 3x smaller for a window store:

- a float array of at least ``PLANES_MIN_BYTES`` is stored as byte planes, one
  member per (last-axis column, byte of the value), ``name@c.b``, plus
  ``name@shape`` and ``name@dtype``: the sign/exponent bytes of a column of
  slot sums are nearly constant, the low mantissa bytes of a noisy one are not;
- each member is deflated (zlib level 1) when deflating a sample of it saves at
  least ``1 - DEFLATE_PAYS`` (20 %) of it, stored as it is otherwise: deflate is the
  slow part (about 55 MB/s here on random bytes, 200+ MB/s on compressible
  ones), so bytes it cannot shrink are not fed to it.

``np.load`` reads either kind of member; :meth:`SnapshotStore.load` puts the
planes back together. Writing and reading are plain blocking calls: the
pipeline runs them in a thread (``asyncio.to_thread``), never on the event loop.
"""

from __future__ import annotations

import io
import logging
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import fsspec
import numpy as np

log = logging.getLogger(__name__)

OFFSET_KEY = "__next_offset__"
CRC_KEY = "__last_record_crc__"
FORMAT_KEY = "__format__"  # the file format; absent: 1 (plain np.savez)
FILE_FORMAT = 2
NO_CRC = -1
PLANES_MIN_BYTES = 1 << 20  # smaller float arrays are stored whole
DEFLATE_LEVEL = 1  # zlib level: 6 (np.savez_compressed) takes 4x as long for 15% less
DEFLATE_PAYS = 0.8  # deflate a member when a sample of it shrinks to less than this (saves >= 20%)
_SAMPLE_BYTES = 1 << 16  # per probe; four probes spread over the member
_WRITE_BYTES = 1 << 20  # per write call into the zip member
_BLOCK = 1 << 14  # values per block when gathering/scattering byte planes (stays in the CPU cache)
_META = (OFFSET_KEY, CRC_KEY, FORMAT_KEY)


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


def _members(arrays: dict[str, np.ndarray]) -> Iterator[tuple[str, np.ndarray]]:
    """The arrays as file members: large float arrays as byte planes (see the module docstring).

    A generator: the planes of one column are gathered (blocked, so each cache
    line of the array is read once per column) only when the writer reaches them.
    """
    for name, a in arrays.items():
        if "@" in name:
            raise ValueError(f"snapshot array names cannot hold '@': {name!r}")
        a = np.asarray(a)
        if a.dtype.kind != "f" or a.nbytes < PLANES_MIN_BYTES:
            yield name, a
            continue
        a = a if a.flags.c_contiguous else a.copy(order="C")
        cols = a.shape[-1] if a.ndim >= 2 else 1
        yield f"{name}@shape", np.asarray(a.shape, dtype=np.int64)
        yield f"{name}@dtype", np.asarray(a.dtype.str)
        bytes_ = a.view(np.uint8).reshape(-1, cols, a.itemsize)
        for c in range(cols):
            planes = [np.empty(bytes_.shape[0], np.uint8) for _ in range(a.itemsize)]
            for lo in range(0, bytes_.shape[0], _BLOCK):
                block = bytes_[lo : lo + _BLOCK, c]
                for b, plane in enumerate(planes):
                    plane[lo : lo + _BLOCK] = block[:, b]
            for b, plane in enumerate(planes):
                yield f"{name}@{c}.{b}", plane
            del planes


def _from_members(names: list[str], get: Callable[[str], np.ndarray]) -> dict[str, np.ndarray]:
    """Inverse of :func:`_members`; ``get`` reads one member (the planes of one column at a time)."""
    out = {k: get(k) for k in names if "@" not in k}
    for key in names:
        if not key.endswith("@shape"):
            continue
        name = key[: -len("@shape")]
        shape = tuple(int(x) for x in get(key).tolist())
        a = np.empty(shape, dtype=np.dtype(str(get(f"{name}@dtype"))))
        cols = shape[-1] if len(shape) >= 2 else 1
        bytes_ = a.view(np.uint8).reshape(-1, cols, a.itemsize)
        for c in range(cols):
            planes = [get(f"{name}@{c}.{b}") for b in range(a.itemsize)]
            if any(p.shape != (bytes_.shape[0],) for p in planes):
                raise ValueError(f"byte planes of {name!r} do not match its shape {shape}")
            for lo in range(0, bytes_.shape[0], _BLOCK):
                block = bytes_[lo : lo + _BLOCK, c]
                for b, plane in enumerate(planes):
                    block[:, b] = plane[lo : lo + _BLOCK]
            del planes
        out[name] = a
    return out


def _deflate_pays(a: np.ndarray) -> bool:
    """Whether deflating the C-contiguous ``a`` saves enough, judged on four probes spread over it."""
    flat = a.reshape(-1).view(np.uint8)
    if flat.shape[0] <= 4 * _SAMPLE_BYTES:
        raw = flat.tobytes()
    else:
        step = flat.shape[0] // 4
        raw = b"".join(flat[i * step : i * step + _SAMPLE_BYTES].tobytes() for i in range(4))
    return len(zlib.compress(raw, DEFLATE_LEVEL)) < DEFLATE_PAYS * len(raw)


def _write_npy(out: Any, a: np.ndarray) -> None:
    """One C-contiguous array as ``.npy`` bytes, what ``np.lib.format.write_array`` writes, without its copies.

    The data goes out in 1 MiB views of the array itself: ``write_array`` copies
    16 MiB chunks into new bytes objects while holding the GIL, which the event
    loop felt as 10-30 ms stalls; deflate, crc32 and file writes release it.
    """
    if a.dtype.hasobject:
        raise ValueError("object arrays cannot go into a snapshot (no pickle)")
    np.lib.format.write_array_header_1_0(out, np.lib.format.header_data_from_array_1_0(a))
    data = memoryview(a.reshape(-1).view(np.uint8))
    for lo in range(0, data.nbytes, _WRITE_BYTES):
        out.write(data[lo : lo + _WRITE_BYTES])


def write_npz(fh: Any, arrays: dict[str, np.ndarray], deflate: bool = True) -> None:
    """``arrays`` into the binary file ``fh`` as an ``.npz`` of file format 2 (no pickle); ``deflate``: where it pays."""
    with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=DEFLATE_LEVEL, allowZip64=True) as zf:
        for name, a in _members(arrays):
            a = a if a.flags.c_contiguous else a.copy(order="C")
            member: str | zipfile.ZipInfo = f"{name}.npy"
            if not (deflate and _deflate_pays(a)):
                member = zipfile.ZipInfo(f"{name}.npy")
                member.compress_type = zipfile.ZIP_STORED
            with zf.open(member, "w", force_zip64=True) as out:
                _write_npy(out, a)


class SnapshotStore:
    """Per-partition window snapshots under one fsspec URL."""

    def __init__(self, url: str, group: str, topic: str) -> None:
        self.fs, root = fsspec.core.url_to_fs(url)
        self.root = f"{root.rstrip('/')}/{group}/{topic}"

    def _path(self, partition: int) -> str:
        return f"{self.root}/p{partition:04d}.npz"

    def save(
        self, partition: int, arrays: dict[str, np.ndarray], next_offset: int, last_record_crc: int = NO_CRC,
        deflate: bool = True,
    ) -> None:
        """Write the snapshot atomically (blocking: seconds for 100k VMs; call it in a thread).

        ``deflate=False`` stores every member as it is: about twice the bytes in a
        quarter of the time, for snapshots that race a deadline (shutdown, revocation).
        """
        meta = {
            OFFSET_KEY: np.asarray(next_offset, dtype=np.int64),
            CRC_KEY: np.asarray(last_record_crc, dtype=np.int64),
            FORMAT_KEY: np.asarray(FILE_FORMAT, dtype=np.int64),
        }
        path = self._path(partition)
        tmp = f"{path}.tmp-{time.monotonic_ns()}"
        self.fs.makedirs(self.root, exist_ok=True)
        try:
            with self.fs.open(tmp, "wb") as fh:  # streamed: no second copy of the file in memory
                write_npz(fh, {**arrays, **meta}, deflate=deflate)
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
                fmt = int(npz[FORMAT_KEY]) if FORMAT_KEY in npz.files else 1
                if fmt not in (1, FILE_FORMAT):
                    raise ValueError(f"file format {fmt} is not one this worker reads (1, {FILE_FORMAT})")
                arrays = _from_members([k for k in npz.files if k not in _META], npz.__getitem__)
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
