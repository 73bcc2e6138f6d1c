"""Rejected messages -> dead-letter records: the original bytes plus why, when and where from.

The DLQ keeps the message exactly as received (so it can be fixed and replayed)
and puts the diagnosis in headers: ``reason`` (UTF-8, at most 4 KiB),
``zhuge-error-at`` (epoch s) and, when the caller knows them, the source
coordinates ``zhuge-source-topic``, ``-partition``, ``-offset``. A value too big
for a Kafka record (above ``MAX_VALUE_BYTES``: the input contract accepts up to
1 MiB, the broker's default record limit is about the same, and headers come on
top) is cut to its first ``MAX_VALUE_BYTES`` bytes and marked
``zhuge-truncated: <original size>``: the whole message is still in the source
topic at the offset the headers name. Sending is the caller's.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from streams.schema import Rejected

MAX_REASON_BYTES = 4096  # a header, not a log: long reasons are cut
MAX_VALUE_BYTES = 512 * 1024

Source = tuple[str, int, int]  # topic, partition, offset of the rejected message


def dlq_records(
    rejected: Sequence[Rejected],
    *,
    now: float | None = None,
    sources: Sequence[Source | None] | None = None,
) -> list[tuple[bytes | None, bytes, list[tuple[str, bytes]]]]:
    """``(key, value, headers)`` per rejection; ``sources[i]`` locates ``rejected[i]`` in its topic."""
    at = f"{time.time() if now is None else now:.3f}".encode()
    out = []
    for i, r in enumerate(rejected):
        reason = r.reason.encode("utf-8", "replace")[:MAX_REASON_BYTES]
        headers = [("reason", reason), ("zhuge-error-at", at)]
        source = sources[i] if sources is not None else None
        if source is not None:
            topic, partition, offset = source
            headers += [
                ("zhuge-source-topic", topic.encode()),
                ("zhuge-source-partition", str(partition).encode()),
                ("zhuge-source-offset", str(offset).encode()),
            ]
        value = r.raw
        if len(value) > MAX_VALUE_BYTES:
            headers.append(("zhuge-truncated", str(len(value)).encode()))
            value = value[:MAX_VALUE_BYTES]
        out.append((r.key, value, headers))
    return out
