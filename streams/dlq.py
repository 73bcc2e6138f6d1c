"""Rejected messages -> dead-letter records: the original bytes plus why and when.

The DLQ keeps the message exactly as received (so it can be fixed and replayed)
and puts the diagnosis in headers. Sending is the caller's: an aiokafka producer
or a Faust topic both take ``(key, value, headers)``.
"""

from __future__ import annotations

import time

from streams.schema import Rejected

MAX_REASON_BYTES = 4096  # a header, not a log: long reasons are cut


def dlq_records(
    rejected: list[Rejected], *, now: float | None = None
) -> list[tuple[bytes | None, bytes, list[tuple[str, bytes]]]]:
    """``(key, original value, headers)`` per rejection; headers ``reason`` and ``zhuge-error-at`` (epoch s)."""
    at = f"{time.time() if now is None else now:.3f}".encode()
    out = []
    for r in rejected:
        reason = r.reason.encode("utf-8", "replace")[:MAX_REASON_BYTES]
        out.append((r.key, r.raw, [("reason", reason), ("zhuge-error-at", at)]))
    return out
