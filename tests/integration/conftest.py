"""Real Kafka and Redis for integration tests, started by the same code as `zhuge services up`.

Fixtures:

* ``services`` (session): a ``Settings`` pointing at a broker and a Redis on free
  loopback ports, with state, model store, history and snapshots in a temp dir.
  With ``ZHUGE_TEST_KAFKA`` and ``ZHUGE_TEST_REDIS_URL`` set, those are used and
  nothing is started. Outside CI, a missing java / redis-server / mvn skips the
  integration tests with the reason; under ``CI`` it is an error, never a skip.
* ``redis_client`` (function): a synchronous redis-py client on a flushed DB.
* ``unique_topics`` (function): ``services`` with topic names and consumer group
  suffixed per test, so tests never read each other's messages. Topics are not
  created: call ``await app.topics.ensure_topics(settings, [...])`` when needed
  (the broker also auto-creates them with ``topic_partitions`` partitions).
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from app import services as svc
from app.settings import Settings

IN_CI = bool(os.environ.get("CI"))


def _settings_for(kafka: str, redis_url: str, tmp: Path) -> Settings:
    return Settings.from_env(
        kafka_bootstrap=kafka,
        redis_url=redis_url,
        state_dir=str(tmp / "state"),
        model_store=str(tmp / "models"),
        history_url=str(tmp / "history"),
        snapshot_dir=str(tmp / "snapshots"),
        metrics_port=0,
        consumer_group=f"zhuge-test-{uuid.uuid4().hex[:8]}",
    )


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    tmp = tmp_path_factory.mktemp("zhuge-services")
    kafka, redis_url = os.environ.get("ZHUGE_TEST_KAFKA"), os.environ.get("ZHUGE_TEST_REDIS_URL")
    if kafka and redis_url:
        yield _settings_for(kafka, redis_url, tmp)
        return
    settings = _settings_for(f"127.0.0.1:{svc.free_port()}", f"redis://127.0.0.1:{svc.free_port()}/0", tmp)
    missing = svc.check_tools(settings)
    if missing:
        reason = "integration services unavailable: " + "; ".join(str(m) for m in missing)
        if IN_CI:
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    try:
        svc.up(settings, echo=lambda line: None)
    except BaseException:
        svc.down(settings, echo=lambda line: None)  # whatever did start must not outlive the run
        raise
    try:
        yield settings
    finally:
        svc.down(settings, echo=lambda line: None)


@pytest.fixture
def redis_client(services: Settings) -> Iterator[object]:
    """A synchronous redis-py client on an empty database (flushed before and after)."""
    client = services.redis_client(asyncio=False)
    client.flushdb()
    try:
        yield client
    finally:
        client.flushdb()
        client.close()


def unique_topic_settings(settings: Settings, tag: str) -> Settings:
    """``settings`` with every topic and the consumer group suffixed by ``tag`` plus a random token."""
    token = f"{re.sub(r'[^A-Za-z0-9]+', '-', tag)[:40].strip('-')}-{uuid.uuid4().hex[:8]}"
    return settings.replace(
        topic_metrics=f"{settings.topic_metrics}.{token}",
        topic_dlq=f"{settings.topic_dlq}.{token}",
        topic_scores=f"{settings.topic_scores}.{token}",
        topic_migrations=f"{settings.topic_migrations}.{token}",
        consumer_group=f"{settings.consumer_group}-{token}",
    )


@pytest.fixture
def unique_topics(services: Settings, request: pytest.FixtureRequest) -> Settings:
    return unique_topic_settings(services, request.node.name)


@pytest.fixture(scope="session")
def api_fleet(services: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A worker that scored a simulated day of 60 VMs on 2 hosts, and ``zhuge api`` over its Redis (processes).

    Session-scoped (one worker for the API and the page tests), on Redis database 1.
    """
    from urllib.parse import urlsplit, urlunsplit

    from tests.integration.api_support import start_api_fleet
    from tests.integration.worker_support import isolated_worker_settings

    tmp = tmp_path_factory.mktemp("api-fleet")
    # its own Redis database: the session outlives tests whose ``redis_client`` flushes database 0
    own_db = urlunsplit(urlsplit(services.redis_url)._replace(path="/1"))
    settings = isolated_worker_settings(unique_topic_settings(services, "api").replace(redis_url=own_db), tmp, partitions=4)
    worker, fleet = start_api_fleet(settings, tmp)
    try:
        yield fleet
    finally:
        fleet.api.stop()
        worker.stop()
