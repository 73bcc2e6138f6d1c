"""Bad messages -> DLQ records on a real topic, read back with a plain consumer."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from streams.dlq import dlq_records
from streams.schema import decode_messages

pytestmark = pytest.mark.integration

NOW = time.time()
BAD = {
    b"garbage": (b"\x00\xffnot json", "not JSON"),
    b"types": (json.dumps({"vm": "a", "ts": NOW, "cpu_pct": "high"}).encode(), "cpu_pct: expected number"),
    b"novm": (json.dumps({"ts": NOW}).encode(), "vm: required field missing"),
    b"nan": (b'{"vm": "a", "ts": %d, "cpu_pct": NaN}' % int(NOW), "not JSON"),
    b"batch": (json.dumps([{"vm": "a", "ts": NOW}, {"vm": "b", "ts": NOW, "cpu_pct": 300}]).encode(),
               "[1].cpu_pct: must be <= 100"),
}


async def roundtrip(settings):
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    from app.topics import ensure_topics

    batch = decode_messages([v for v, _ in BAD.values()], keys=list(BAD), now=NOW)
    await ensure_topics(settings, [settings.topic_dlq])
    producer = AIOKafkaProducer(**settings.aiokafka_kwargs())
    await producer.start()
    try:
        for key, value, headers in dlq_records(batch.rejected):
            await producer.send_and_wait(settings.topic_dlq, value, key=key, headers=headers)
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(settings.topic_dlq, group_id=None, auto_offset_reset="earliest",
                                **settings.aiokafka_kwargs())
    await consumer.start()
    got = []
    try:
        deadline = time.monotonic() + 20
        while len(got) < len(BAD) and time.monotonic() < deadline:
            for recs in (await consumer.getmany(timeout_ms=300)).values():
                got += recs
    finally:
        await consumer.stop()
    return batch, got


def test_bad_messages_reach_the_dlq_with_reasons(unique_topics):
    batch, got = asyncio.run(roundtrip(unique_topics))
    assert batch.vm == ["a"]  # the good object of the batch survives
    assert len(got) == len(BAD)
    for rec in got:
        raw, expected = BAD[rec.key]
        headers = dict(rec.headers)
        assert rec.value == raw
        assert expected in headers["reason"].decode()
        assert abs(float(headers["zhuge-error-at"]) - time.time()) < 60
