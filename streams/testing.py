"""In-memory stand-ins for crash/resume tests without a broker, as Bytewax's ``TestingSource`` is.

``ListPartitionLog`` is a ``streams.recovery.PartitionLog`` over a list of
records: a recreated topic is a new list, retention is ``begin``;
``store_differences`` compares two window stores bit for bit, daily and weekly profiles
included (a restored snapshot against the store it was taken from).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from gpu_kernels.xp import to_numpy
from streams.recovery import LogRecord, record_crc
from streams.window_store import WindowStore


class ListPartitionLog:
    """``PartitionLog`` over an in-memory list of records (unit tests; a recreated topic is a new list)."""

    def __init__(self, records: Sequence[LogRecord], begin: int | None = None) -> None:
        self.records = list(records)
        self.begin = begin if begin is not None else (self.records[0].offset if self.records else 0)

    async def __aenter__(self) -> ListPartitionLog:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def bounds(self) -> tuple[int, int]:
        return self.begin, (self.records[-1].offset + 1) if self.records else self.begin

    async def offset_for_time(self, ts: float) -> int | None:
        return next((r.offset for r in self.records if r.offset >= self.begin and (r.timestamp_ms or 0) >= ts * 1000), None)

    async def crc_at(self, offset: int) -> int | None:
        r = next((r for r in self.records if r.offset == offset and r.offset >= self.begin), None)
        return None if r is None else record_crc(r.key, r.value, r.timestamp_ms)

    async def replay(self, start: int, end: int, apply: Callable[[list[LogRecord]], None]) -> int:
        chunk = [r for r in self.records if max(start, self.begin) <= r.offset < end]
        if chunk:
            apply(chunk)
        return len(chunk)


def store_differences(a: WindowStore, b: WindowStore, chunk: int = 8192) -> list[str]:
    """What differs between two stores holding the same VMs, bit for bit (NaN == NaN); empty: equal.

    Rows may be numbered differently (a restore renumbers them): VMs are matched by id.
    """
    if sorted(a.row_of) != sorted(b.row_of):
        return ["VM ids"]
    diffs = [attr for attr in ("n_slots", "slot_s", "ttl_s", "dropped_old", "hosts") if getattr(a, attr) != getattr(b, attr)]
    if diffs[:2]:  # another window shape: the arrays cannot be compared
        return diffs
    vms = sorted(a.row_of)
    ra, rb = a.rows_of(vms), b.rows_of(vms)
    theirs = b._host_arrays()
    for name, arr in a._host_arrays().items():
        x, y = arr[ra], theirs[name][rb]
        if x.dtype != y.dtype or x.tobytes() != y.tobytes():
            diffs.append(name)
    for name in ("sums", "counts", "profile", "week"):
        x, y = getattr(a, name), getattr(b, name)
        if x.dtype != y.dtype:
            diffs.append(name)
            continue
        for lo in range(0, len(vms), chunk):  # without a second copy of the whole store
            if to_numpy(x[a.xp.asarray(ra[lo : lo + chunk])]).tobytes() != to_numpy(y[b.xp.asarray(rb[lo : lo + chunk])]).tobytes():
                diffs.append(name)
                break
    return diffs
