"""In-memory stand-ins for crash/resume tests without a broker, as Bytewax's ``TestingSource`` is.

``ListPartitionLog`` is a ``streams.recovery.PartitionLog`` over a list of
records: a recreated topic is a new list, retention is ``begin``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from streams.recovery import LogRecord, record_crc


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
