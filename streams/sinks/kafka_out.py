"""Produce a batch of records and make sure every one of them lands: fresh re-sends, never re-awaits.

A failed aiokafka send future stays failed: awaiting it again returns the same
error forever (the stall the review found). ``send_all`` therefore sends every
record, waits for all of them, and sends again (a new ``producer.send``) only
those that failed, with capped exponential back-off, until each is
acknowledged. While the broker is away this is back-pressure: the caller's
batch stays unacknowledged and nothing is dropped.

At-least-once: a send that timed out may still have been written, so a re-send
can duplicate a record; consumers of ``vm.scores`` keep the score with the
newest ``last_ts`` per VM (what the Redis sink does), and DLQ readers can use
the ``zhuge-source-*`` headers to de-duplicate.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 5.0


@dataclass(frozen=True)
class OutRecord:
    topic: str
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()
    output: str = "scores"  # metric and log label: "scores", "dlq", "metrics", "migrations"


def _never_deliverable(exc: BaseException) -> bool:
    """Errors no re-send can fix (the record itself is wrong); everything else is retried."""
    from aiokafka.errors import MessageSizeTooLargeError

    return isinstance(exc, MessageSizeTooLargeError)


async def send_all(
    producer: Any,
    records: Sequence[OutRecord],
    *,
    on_error: Callable[[OutRecord, BaseException], None] | None = None,
    on_healthy: Callable[[bool], None] | None = None,
    first_backoff_s: float = 0.1,
) -> int:
    """Send every record until acknowledged; returns how many were dropped as undeliverable.

    ``on_error`` is called for each failed attempt (metrics), ``on_healthy``
    with False after a round with failures and True once everything landed.
    Cancellation (worker shutdown) propagates; the caller then does not commit.
    """
    pending = list(records)
    delay = first_backoff_s
    dropped = 0
    while pending:
        futures: list[Any] = []
        failed: list[OutRecord] = []
        errors: list[BaseException] = []
        for rec in pending:
            try:
                futures.append((rec, await producer.send(rec.topic, value=rec.value, key=rec.key, headers=list(rec.headers))))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # buffer full / metadata unavailable: raised by send() itself
                failed.append(rec)
                errors.append(exc)
        outcomes = await asyncio.gather(*(f for _, f in futures), return_exceptions=True)
        for (rec, _), outcome in zip(futures, outcomes):
            if isinstance(outcome, asyncio.CancelledError):
                raise outcome
            if isinstance(outcome, BaseException):
                failed.append(rec)
                errors.append(outcome)
        pending = []
        for rec, exc in zip(failed, errors):
            if on_error is not None:
                on_error(rec, exc)
            if _never_deliverable(exc):
                dropped += 1
                log.error("dropping a %s record for %s that Kafka can never accept: %s", rec.output, rec.topic, exc)
            else:
                pending.append(rec)
        if pending:
            if on_healthy is not None:
                on_healthy(False)
            log.warning(
                "%d of %d records to Kafka failed (%s); sending them again in %.1fs",
                len(pending), len(records), type(errors[0]).__name__, delay,
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_BACKOFF_S)
    if on_healthy is not None:
        on_healthy(True)
    return dropped
