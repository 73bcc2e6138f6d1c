"""Create Kafka topics when missing (simulator, tests and the worker call this before producing)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from app.settings import Settings


async def ensure_topics(
    settings: Settings,
    names: Iterable[str],
    partitions: int | None = None,
    replication_factor: int = 1,
    timeout_s: float = 15.0,
) -> list[str]:
    """Create each missing topic (``partitions`` defaults to ``settings.topic_partitions``).

    Returns the names created by this call. Existing topics are left as they are
    (their partition count is not changed). Waits until every topic is visible in
    the cluster metadata, so a producer that starts right after finds a leader.
    """
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError

    wanted = list(dict.fromkeys(names))
    count = settings.topic_partitions if partitions is None else partitions
    if count < 1:
        raise ValueError(f"partitions must be >= 1, not {count}")
    admin = AIOKafkaAdminClient(**settings.aiokafka_kwargs(), request_timeout_ms=int(timeout_s * 1000))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [n for n in wanted if n not in existing]
        created: list[str] = []
        if missing:
            resp = await admin.create_topics([NewTopic(n, count, replication_factor) for n in missing])
            for name, code, message in _topic_errors(resp):
                if code == 0:
                    created.append(name)
                elif code != TopicAlreadyExistsError.errno:  # lost a race with another creator: fine
                    raise RuntimeError(f"creating topic {name!r} failed: error {code} {message or ''}".strip())
        await _wait_visible(admin, wanted, timeout_s)
        return created
    finally:
        await admin.close()


def _topic_errors(resp: object) -> list[tuple[str, int, str | None]]:
    out = []
    for entry in getattr(resp, "topic_errors", []):
        name, code = entry[0], entry[1]
        message = entry[2] if len(entry) > 2 else None
        out.append((name, code, message))
    return out


async def _wait_visible(admin: object, names: list[str], timeout_s: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        described = await admin.describe_topics(names)  # type: ignore[attr-defined]
        ready = {
            d["topic"]
            for d in described
            if d.get("error_code", 0) == 0 and d.get("partitions") and all(p["leader"] >= 0 for p in d["partitions"])
        }
        if ready >= set(names):
            return
        if loop.time() > deadline:
            raise TimeoutError(f"topics {sorted(set(names) - ready)} have no leader after {timeout_s} s")
        await asyncio.sleep(0.1)


async def produce_messages(settings: Settings, messages: list[tuple[bytes, bytes]]) -> None:
    """Send ``(key, value)`` pairs to ``settings.topic_metrics`` and wait for every acknowledgement."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(**settings.aiokafka_kwargs(), linger_ms=5)
    await producer.start()
    try:
        futures = [await producer.send(settings.topic_metrics, value, key=key) for key, value in messages]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def read_from_start(settings: Settings, topic: str, n: int, timeout_s: float = 30.0) -> list[dict]:
    """Up to ``n`` JSON records of ``topic`` from its start (no consumer group), within ``timeout_s``."""
    import json
    import time

    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(topic, group_id=None, auto_offset_reset="earliest", **settings.aiokafka_kwargs())
    await consumer.start()
    out: list[dict] = []
    try:
        deadline = time.monotonic() + timeout_s
        while len(out) < n and time.monotonic() < deadline:
            for recs in (await consumer.getmany(timeout_ms=1000)).values():
                out += [json.loads(r.value) for r in recs]
    finally:
        await consumer.stop()
    return out
