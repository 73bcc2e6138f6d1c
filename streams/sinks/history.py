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
"""

from __future__ import annotations

import threading
import time
import uuid
from itertools import chain
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

DEFAULT_MAX_ROWS = 200_000
DEFAULT_MAX_AGE_S = 60.0


class HistorySink:
    """Buffers decoded samples and writes them as Parquet files partitioned by UTC date and hour."""

    def __init__(
        self,
        url: str,
        *,
        max_rows: int = DEFAULT_MAX_ROWS,
        max_age_s: float = DEFAULT_MAX_AGE_S,
        metrics: Sequence[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        import fsspec

        if max_rows < 1 or max_age_s <= 0:
            raise ValueError("max_rows must be >= 1 and max_age_s > 0")
        if metrics is None:
            from streams.schema import METRICS

            metrics = METRICS
        self.url = url
        self.metrics = tuple(metrics)
        self.max_rows = max_rows
        self.max_age_s = max_age_s
        self._clock = clock
        self._fs, self._root = fsspec.core.url_to_fs(url)
        self._local = "file" in (self._fs.protocol if isinstance(self._fs.protocol, tuple) else (self._fs.protocol,))
        self._lock = threading.Lock()
        self._chunks: list[tuple[list[str], list[str], np.ndarray, np.ndarray]] = []
        self._rows = 0
        self._since: float | None = None  # clock time of the oldest buffered row

    @property
    def buffered_rows(self) -> int:
        return self._rows

    def write(self, decoded: Any) -> bool:
        """Buffer a ``DecodedBatch``; True when a flush is due (row count or age reached)."""
        n = len(decoded.vm)
        if n:
            values = np.asarray(decoded.values, dtype=np.float32)
            if values.shape != (n, len(self.metrics)):
                raise ValueError(f"values has shape {values.shape}, expected ({n}, {len(self.metrics)}) for METRICS")
            ts = np.asarray(decoded.ts, dtype=np.float64)
            if ts.shape != (n,) or len(decoded.host) != n:
                raise ValueError("DecodedBatch columns vm, host, ts and values must have one length")
            with self._lock:
                self._chunks.append((list(decoded.vm), list(decoded.host), ts, values))
                self._rows += n
                if self._since is None:
                    self._since = self._clock()
        return self.flush_due()

    def flush_due(self) -> bool:
        since = self._since
        return self._rows >= self.max_rows or (since is not None and self._clock() - since >= self.max_age_s)

    def flush(self) -> list[str]:
        """Write everything buffered (blocking I/O: run it in a thread); returns the file paths written."""
        with self._lock:
            chunks, self._chunks = self._chunks, []
            self._rows, self._since = 0, None
        if not chunks:
            return []
        try:
            return self._write_files(chunks)
        except BaseException:
            with self._lock:  # keep the rows for the next try rather than lose them
                self._chunks[:0] = chunks
                self._rows += sum(len(c[0]) for c in chunks)
                self._since = self._since if self._since is not None else self._clock()
            raise

    def close(self) -> list[str]:
        """Flush what is left; call on shutdown."""
        return self.flush()

    # ------------------------------------------------------------------
    def _write_files(self, chunks: list[tuple[list[str], list[str], np.ndarray, np.ndarray]]) -> list[str]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        vm = np.array(list(chain.from_iterable(c[0] for c in chunks)), dtype=object)
        host = np.array(list(chain.from_iterable(c[1] for c in chunks)), dtype=object)
        ts = np.concatenate([c[2] for c in chunks])
        values = np.concatenate([c[3] for c in chunks])
        hour = np.floor(ts / 3600.0).astype(np.int64)
        order = np.argsort(hour, kind="stable")
        hours, starts = np.unique(hour[order], return_index=True)
        bounds = np.append(starts, len(order))
        paths: list[str] = []
        for h, lo, hi in zip(hours.tolist(), bounds[:-1].tolist(), bounds[1:].tolist()):
            idx = order[lo:hi]
            columns = {
                "vm": pa.array(vm[idx], type=pa.string()),
                "host": pa.array(host[idx], type=pa.string()),
                "ts": pa.array(ts[idx]),
            }
            vals = values[idx]
            for j, name in enumerate(self.metrics):
                columns[name] = pa.array(vals[:, j])
            table = pa.table(columns)
            stamp = np.datetime64(h, "h").astype(object)  # datetime of that UTC hour
            folder = f"{self._root.rstrip('/')}/date={stamp:%Y-%m-%d}/hour={stamp:%H}"
            name = f"part-{uuid.uuid4().hex}.parquet"
            path = f"{folder}/{name}"
            self._fs.makedirs(folder, exist_ok=True)
            if self._local:  # readers globbing *.parquet never see a half-written file
                tmp = f"{folder}/.{name}.tmp"
                with self._fs.open(tmp, "wb") as f:
                    pq.write_table(table, f, compression="zstd")
                self._fs.mv(tmp, path)
            else:  # object stores make a PUT visible atomically
                with self._fs.open(path, "wb") as f:
                    pq.write_table(table, f, compression="zstd")
            paths.append(path)
        return paths
