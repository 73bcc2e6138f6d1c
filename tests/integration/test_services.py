"""`zhuge services` against the real processes the session fixture started (Kafka KRaft + redis-server)."""

from __future__ import annotations

import os
import socket

import pytest

from app import services as svc
from app.settings import Settings
from app.topics import ensure_topics

pytestmark = pytest.mark.integration
EXTERNAL = bool(os.environ.get("ZHUGE_TEST_KAFKA") and os.environ.get("ZHUGE_TEST_REDIS_URL"))
needs_local = pytest.mark.skipif(EXTERNAL, reason="services given by ZHUGE_TEST_*: none started here")


def test_both_services_answer(services: Settings):
    assert svc.kafka_ready(services)
    assert svc.redis_ready(services)


@needs_local
def test_up_again_is_a_no_op_on_the_same_processes(services: Settings):
    before = {st.name: st.pid for st in svc.status(services)}
    assert all(st == "running" for st in (s.state for s in svc.status(services)))
    lines: list[str] = []
    after = svc.up(services, echo=lines.append)
    assert {st.name: st.pid for st in after} == before
    assert [line.split(":")[0] for line in lines] == ["kafka", "redis"]
    assert all("already running" in line for line in lines)


async def test_ensure_topics_creates_missing_ones_with_the_partition_count(unique_topics: Settings):
    s = unique_topics
    created = await ensure_topics(s, [s.topic_metrics, s.topic_scores], partitions=3)
    assert created == [s.topic_metrics, s.topic_scores]
    again = await ensure_topics(s, [s.topic_metrics, s.topic_dlq])
    assert again == [s.topic_dlq]

    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(**s.aiokafka_kwargs())
    await admin.start()
    try:
        described = {d["topic"]: d for d in await admin.describe_topics([s.topic_metrics, s.topic_dlq])}
    finally:
        await admin.close()
    assert len(described[s.topic_metrics]["partitions"]) == 3
    assert len(described[s.topic_dlq]["partitions"]) == s.topic_partitions


def test_redis_client_fixture_starts_empty(redis_client):
    assert redis_client.dbsize() == 0
    redis_client.set("zhuge:test", b"1")
    assert redis_client.get("zhuge:test") == b"1"


@needs_local
def test_a_port_held_by_another_process_is_refused_and_nothing_starts(services: Settings, tmp_path):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        redis_port = svc.free_port()
        s = services.replace(
            kafka_bootstrap=f"127.0.0.1:{held.getsockname()[1]}",
            redis_url=f"redis://127.0.0.1:{redis_port}/0",
            state_dir=str(tmp_path),
        )
        with pytest.raises(svc.ServiceError, match="in use by a process zhuge did not start"):
            svc.up(s, echo=lambda line: None)
    assert not svc.port_in_use("127.0.0.1", redis_port)


@needs_local
def test_second_stack_runs_beside_the_first_and_down_stops_only_its_own(services: Settings, tmp_path):
    other = services.replace(
        kafka_bootstrap=f"127.0.0.1:{svc.free_port()}",
        redis_url=f"redis://:pw@127.0.0.1:{svc.free_port()}/0",
        state_dir=str(tmp_path),
    )
    first = {st.name: st.pid for st in svc.status(services)}
    try:
        states = svc.up(other, echo=lambda line: None)
        assert [st.state for st in states] == ["running", "running"]
        assert {st.pid for st in states}.isdisjoint(first.values())
        assert svc.kafka_ready(other) and svc.redis_ready(other)
        assert not svc.redis_ready(other.replace(redis_url=other.redis_url.replace(":pw@", "")))  # AUTH enforced
    finally:
        after = svc.down(other, echo=lambda line: None)
    assert [st.state for st in after] == ["stopped", "stopped"]
    assert {st.name: st.pid for st in svc.status(services)} == first
    assert svc.kafka_ready(services) and svc.redis_ready(services)
