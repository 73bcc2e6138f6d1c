"""Log hygiene for long outages: one line per kind of client error per interval, not ten a second.

With the broker away, aiokafka logs every failed connect, fetch and metadata
refresh at ERROR, about ten lines a second per client. An SRE needs to see the
outage, not scroll past it: ``RepeatFilter`` lets the first record of a kind
through, drops the repeats for ``every_s`` and then lets one through saying how
many were dropped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

NOISY_LOGGERS = (
    "aiokafka",
    "aiokafka.conn",
    "aiokafka.client",
    "aiokafka.cluster",
    "aiokafka.consumer.fetcher",
    "aiokafka.consumer.group_coordinator",
    "aiokafka.consumer.consumer",
    "aiokafka.producer.sender",
    "aiokafka.producer.producer",
    "faust.transport.drivers.aiokafka",
)
_MAX_KINDS = 1000


class RepeatFilter(logging.Filter):
    """Pass the first record of each (logger, level, message template) per ``every_s``; count the rest."""

    def __init__(self, every_s: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.every_s = every_s
        self.clock = clock
        self._seen: dict[tuple[str, int, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, str(record.msg))
        now = self.clock()
        since, dropped = self._seen.get(key, (-float("inf"), 0))
        if now - since < self.every_s:
            self._seen[key] = (since, dropped + 1)
            return False
        if len(self._seen) >= _MAX_KINDS:
            self._seen.clear()
        self._seen[key] = (now, 0)
        if dropped:
            record.msg = f"{record.msg} [{dropped} more like this in the last {self.every_s:.0f} s]"
        return True


def quiet_repeats(names: Iterable[str] = NOISY_LOGGERS, every_s: float = 30.0) -> RepeatFilter:
    """Attach one shared ``RepeatFilter`` to each named logger (logger filters do not reach children)."""
    shared = RepeatFilter(every_s)
    for name in names:
        logging.getLogger(name).addFilter(shared)
    return shared
