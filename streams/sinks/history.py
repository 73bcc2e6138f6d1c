"""History archive: valid samples buffered in memory, flushed as hourly-partitioned Parquet.

Layout under the fsspec URL (local dir or ``s3://bucket/prefix``)::

    date=YYYY-MM-DD/hour=HH/part-<uuid>.parquet

(UTC, from each sample's ``ts``), columns ``vm, host, ts`` plus one float32
column per ``streams.schema.METRICS`` field (NaN when the agent did not send
it). The retrainer reads the tree with pyarrow/Dask (hive partitioning).

Why buffered: Parquet wants big row groups and object stores want few PUTs.
Why ``flush()`` is sync: writing is blocking I/O; the worker calls
``write()`` on the event loop (cheap: it only appends array references) and,
when it returns True (or on a timer), runs ``flush()`` in a thread. A lock
swaps the buffer out at the start of a flush so writes can continue meanwhile.

Why bounded: the archive is best effort (Kafka still holds the samples), but a
worker must not run out of memory because a disk filled up or an object store
went away. Beyond ``max_buffer_rows`` the oldest rows are dropped and counted in
``dropped_rows``. A flush writes one file per UTC hour; when one fails, only the
hours not yet written go back to the buffer, so a retry never duplicates rows.

Why offset marks: rows wait in memory for up to a flush interval, so a worker killed
before its flush took them along (a ``kill -9`` a minute after a backfill left an archive
without it). Given ``marks`` (a name, the source topic), every flush records per Kafka
partition the offset after the newest record whose rows it wrote, in
``_offsets/<marks>/<partition>.json`` (pyarrow and Dask skip ``_`` paths); a partition
taken on without one gets its first mark at once (``mark_start``). A worker that takes a
partition over replays the records from that offset into the archive (``streams.pipeline``).
So the archive is at least once: a crash between a flush and its mark, or a rebalance while
the old owner still buffers rows, archives some rows twice, which the training reader
absorbs (one sample per VM and timestamp, ``training.dataset``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_MAX_ROWS = 200_000
DEFAULT_MAX_AGE_S = 60.0
DEFAULT_MAX_BUFFER_ROWS = 2_000_000


@dataclass(frozen=True)
class _Rows:
    """Equal-length columns of buffered samples (vm/host: lists from ``write``, object arrays after grouping)."""

    vm: Sequence[str]
    host: Sequence[str]
    ts: np.ndarray
    values: np.ndarray

    def __len__(self) -> int:
        return len(self.ts)

    def tail(self, start: int) -> _Rows:
        """The rows from ``start`` on (the newest ones)."""
        return _Rows(self.vm[start:], self.host[start:], self.ts[start:], self.values[start:])


class HistorySink:
    """Buffers decoded samples and writes them as Parquet files partitioned by UTC date and hour."""

    def __init__(
        self,
        url: str,
        *,
        max_rows: int = DEFAULT_MAX_ROWS,
        max_age_s: float = DEFAULT_MAX_AGE_S,
        max_buffer_rows: int = DEFAULT_MAX_BUFFER_ROWS,
        metrics: Sequence[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        marks: str | None = None,
    ) -> None:
        import fsspec

        if max_rows < 1 or max_age_s <= 0:
            raise ValueError("max_rows must be >= 1 and max_age_s > 0")
        if max_buffer_rows < max_rows:
            raise ValueError(f"max_buffer_rows ({max_buffer_rows}) must be >= max_rows ({max_rows})")
        if metrics is None:
            from streams.schema import METRICS

            metrics = METRICS
        self.url = url
        self.metrics = tuple(metrics)
        self.max_rows = max_rows
        self.max_age_s = max_age_s
        self.max_buffer_rows = max_buffer_rows
        #: Rows dropped (oldest first) because the buffer was full while flushes failed; only grows.
        self.dropped_rows = 0
        self._clock = clock
        self._fs, self._root = fsspec.core.url_to_fs(url)
        self._local = "file" in (self._fs.protocol if isinstance(self._fs.protocol, tuple) else (self._fs.protocol,))
        self._lock = threading.Lock()
        self._chunks: list[_Rows] = []
        self._rows = 0
        self._since: float | None = None  # clock time of the oldest buffered row
        self._dropping = False  # rows dropped since the last successful flush (warned once)
        self._marks_dir = f"{self._root.rstrip('/')}/_offsets/{marks}" if marks else None
        self._pending_marks: dict[int, int] = {}  # partition -> next offset, once the buffer is written

    @classmethod
    def from_settings(cls, settings: Any) -> HistorySink:
        """The worker's sink: ``ZHUGE_HISTORY_URL`` with its flush thresholds and buffer bound."""
        return cls(
            settings.history_url,
            max_rows=settings.history_flush_rows,
            max_age_s=settings.history_flush_s,
            max_buffer_rows=settings.history_buffer_rows,
            marks=settings.topic_metrics,
        )

    @property
    def buffered_rows(self) -> int:
        return self._rows

    def write(self, decoded: Any, marks: Mapping[int, int] | None = None) -> bool:
        """Buffer a ``DecodedBatch``; True when a flush is due (row count or age reached).
        ``marks``: partition -> the offset after the newest record these rows came from (taken
        with the rows, under one lock, so a flush never records a mark without its rows)."""
        n = len(decoded.vm)
        rows = None
        if n:
            values = np.asarray(decoded.values, dtype=np.float32)
            if values.shape != (n, len(self.metrics)):
                raise ValueError(f"values has shape {values.shape}, expected ({n}, {len(self.metrics)}) for METRICS")
            ts = np.asarray(decoded.ts, dtype=np.float64)
            if ts.shape != (n,) or len(decoded.host) != n:
                raise ValueError("DecodedBatch columns vm, host, ts and values must have one length")
            rows = _Rows(list(decoded.vm), list(decoded.host), ts, values)
        with self._lock:
            for p, offset in (marks or {}).items():
                self._pending_marks[p] = max(self._pending_marks.get(p, 0), int(offset))
            if rows is not None:
                self._chunks.append(rows)
                self._rows += n
                if self._since is None:
                    self._since = self._clock()
                self._drop_oldest_beyond_bound()
        return self.flush_due()

    def flush_due(self) -> bool:
        since = self._since
        return self._rows >= self.max_rows or (since is not None and self._clock() - since >= self.max_age_s)

    def flush(self) -> list[str]:
        """Write everything buffered (blocking I/O: run it in a thread); returns the file paths written.

        On a failure the hours not yet written go back to the buffer and the error is raised.
        """
        with self._lock:
            chunks, self._chunks = self._chunks, []
            marks, self._pending_marks = self._pending_marks, {}
            self._rows, self._since = 0, None
        groups = self._hour_groups(chunks) if chunks else []
        paths: list[str] = []
        for i, (hour, rows) in enumerate(groups):
            try:
                paths.append(self._write_one(hour, rows))
            except BaseException:
                self._put_back([g for _, g in groups[i:]], marks)
                raise
        try:
            self._save_marks(marks)
        except BaseException:
            self._put_back([], marks)
            raise
        if groups:
            self._end_outage()
        return paths

    def mark_start(self, partition: int, offset: int) -> None:
        """A partition without a mark, taken on at ``offset``: the archive is taken to hold what came
        before it (nothing, on a new topic; unknown, on an archive older than its marks), so that a
        worker killed before its first flush leaves a mark for the next one to refill from."""
        if self.archived_until(partition) is None:
            self._save_marks({int(partition): int(offset)})

    def archived_until(self, partition: int) -> int | None:
        """The offset of ``partition`` up to which the archive holds every record's rows
        (None: no mark, e.g. marks off or nothing flushed yet)."""
        if self._marks_dir is None:
            return None
        path = f"{self._marks_dir}/{int(partition)}.json"
        try:
            return int(json.loads(self._fs.cat_file(path))["next_offset"])
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("history offset mark %s unreadable (%s): not replaying into the archive", path, exc)
            return None

    def close(self) -> list[str]:
        """Flush what is left; call on shutdown."""
        return self.flush()

    # ------------------------------------------------------------------
    def _save_marks(self, marks: dict[int, int]) -> None:
        """Move each partition's mark forward (never back: a former owner flushing late must not undo it)."""
        if self._marks_dir is None or not marks:
            return
        self._fs.makedirs(self._marks_dir, exist_ok=True)
        for p, offset in sorted(marks.items()):
            old = self.archived_until(p)
            if old is not None and old >= offset:
                continue
            data = json.dumps({"next_offset": offset, "written": time.time()}).encode()
            path = f"{self._marks_dir}/{p}.json"
            if self._local:
                tmp = f"{self._marks_dir}/.{p}.{uuid.uuid4().hex}.tmp"
                self._fs.pipe_file(tmp, data)
                self._fs.mv(tmp, path)
            else:
                self._fs.pipe_file(path, data)

    def _put_back(self, unwritten: list[_Rows], marks: dict[int, int] | None = None) -> None:
        """Return rows a flush could not write, ahead of those written meanwhile (they are older),
        and the marks it could not record."""
        with self._lock:
            for p, offset in (marks or {}).items():
                self._pending_marks[p] = max(self._pending_marks.get(p, 0), offset)
            if not unwritten:
                return
            self._chunks[:0] = unwritten
            self._rows += sum(len(c) for c in unwritten)
            self._since = self._since if self._since is not None else self._clock()
            self._drop_oldest_beyond_bound()

    def _drop_oldest_beyond_bound(self) -> None:
        """Keep at most ``max_buffer_rows`` (caller holds the lock); warn once per outage."""
        excess = self._rows - self.max_buffer_rows
        if excess <= 0:
            return
        self._rows -= excess
        self.dropped_rows += excess
        while excess > 0:
            oldest = self._chunks[0]
            if len(oldest) <= excess:
                self._chunks.pop(0)
                excess -= len(oldest)
            else:
                self._chunks[0] = oldest.tail(excess)
                excess = 0
        if not self._dropping:
            self._dropping = True
            log.warning(
                "history archive %s unwritable or too slow: buffer full at %d rows, dropping the oldest "
                "(counted in dropped_rows) until a flush succeeds", self.url, self.max_buffer_rows,
            )

    def _end_outage(self) -> None:
        with self._lock:
            ended, self._dropping = self._dropping, False
        if ended:
            log.info("history archive %s writable again; %d rows dropped in all so far", self.url, self.dropped_rows)

    @staticmethod
    def _hour_groups(chunks: list[_Rows]) -> list[tuple[int, _Rows]]:
        """All buffered rows as one ``_Rows`` per UTC hour (epoch hours, ascending; arrival order within)."""
        vm = np.array(list(chain.from_iterable(c.vm for c in chunks)), dtype=object)
        host = np.array(list(chain.from_iterable(c.host for c in chunks)), dtype=object)
        ts = np.concatenate([c.ts for c in chunks])
        values = np.concatenate([c.values for c in chunks])
        hour = np.floor(ts / 3600.0).astype(np.int64)
        order = np.argsort(hour, kind="stable")
        hours, starts = np.unique(hour[order], return_index=True)
        bounds = np.append(starts, len(order))
        groups = []
        for h, lo, hi in zip(hours.tolist(), bounds[:-1].tolist(), bounds[1:].tolist()):
            idx = order[lo:hi]
            groups.append((h, _Rows(vm[idx], host[idx], ts[idx], values[idx])))
        return groups

    def _write_one(self, hour: int, rows: _Rows) -> str:
        """Write one hour's rows as a new Parquet file, all or nothing; returns its path."""
        stamp = np.datetime64(hour, "h").astype(object)  # datetime of that UTC hour
        folder = f"{self._root.rstrip('/')}/date={stamp:%Y-%m-%d}/hour={stamp:%H}"
        name = f"part-{uuid.uuid4().hex}.parquet"
        path = f"{folder}/{name}"
        data = self._parquet_bytes(rows)
        self._fs.makedirs(folder, exist_ok=True)
        if self._local:  # readers globbing *.parquet never see a half-written file
            tmp = f"{folder}/.{name}.tmp"
            try:
                self._fs.pipe_file(tmp, data)
                self._fs.mv(tmp, path)
            except BaseException:
                with contextlib.suppress(Exception):  # a full disk must not keep the partial file
                    self._fs.rm(tmp)
                raise
        else:  # one PUT: object stores make it visible whole or not at all
            self._fs.pipe_file(path, data)
        return path

    def _parquet_bytes(self, rows: _Rows) -> bytes:
        """Encoded in memory first, so a failing write can never leave a truncated file behind."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns = {
            "vm": pa.array(rows.vm, type=pa.string()),
            "host": pa.array(rows.host, type=pa.string()),
            "ts": pa.array(rows.ts),
        }
        for j, name in enumerate(self.metrics):
            columns[name] = pa.array(rows.values[:, j])
        sink = pa.BufferOutputStream()
        pq.write_table(pa.table(columns), sink, compression="zstd")
        return sink.getvalue().to_pybytes()
