"""The worker's small process-level parts: member ids, flapping groups, bounded waits, quiet outages."""

from __future__ import annotations

import asyncio
import logging

import pytest

from app.deadlines import within
from app.ingest import MetricsIngest, claim_worker_id
from app.logs import RepeatFilter
from app.metrics import WorkerMetrics
from app.settings import Settings


def test_worker_ids_are_unique_per_machine_and_a_restart_gets_its_own_back(tmp_path):
    settings = Settings.from_env({}, state_dir=str(tmp_path))
    first, lock1 = claim_worker_id(settings)
    second, lock2 = claim_worker_id(settings)
    assert first != second and first.endswith("-0") and second.endswith("-1")
    lock1.close()  # the first worker exits (or is killed: the kernel drops its lock)
    again, lock3 = claim_worker_id(settings)
    assert again == first
    lock2.close(), lock3.close()


def test_an_explicit_worker_id_is_used_as_given(tmp_path):
    assert claim_worker_id(Settings.from_env({}, state_dir=str(tmp_path), worker_id="pod-7")) == ("pod-7", None)


def test_a_group_that_keeps_reassigning_partitions_is_reported_as_a_likely_duplicate_id(caplog):
    ingest = MetricsIngest(Settings.from_env({}), pipeline=None, metrics=WorkerMetrics(), worker_id="dup")  # type: ignore[arg-type]
    ingest._assigned = lambda: {0, 1}  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR, logger="app.ingest"):
        for _ in range(4):
            ingest.assigned([0, 1])
        assert not caplog.records
        ingest.assigned([0, 1])
    assert "same id 'dup'" in caplog.text
    assert ingest.metrics.rebalances._value.get() == 5


async def test_within_gives_up_on_a_task_that_ignores_its_cancellation():
    released = asyncio.Event()

    async def stubborn() -> None:
        while not released.is_set():
            try:
                await released.wait()
            except asyncio.CancelledError:
                continue  # what a client stuck on a dead socket can look like

    loop = asyncio.get_running_loop()
    t0 = loop.time()
    assert await within(stubborn(), 0.2, "a stubborn close") is False
    assert loop.time() - t0 < 1.0
    assert await within(asyncio.sleep(0), 1.0, "a quick one") is True
    released.set()  # let the left-behind task end before the loop closes


def test_repeated_client_errors_pass_once_per_interval_with_a_count():
    now = [0.0]
    f = RepeatFilter(every_s=30, clock=lambda: now[0])

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("aiokafka.conn", logging.ERROR, __file__, 1, msg, None, None)

    passed = []
    for t in range(0, 65):
        now[0] = float(t)
        for _ in range(10):  # ten a second, as aiokafka logs a refused connection
            r = record("Unable connect to node with id %s")
            if f.filter(r):
                passed.append((t, r.msg))
    assert [t for t, _ in passed] == [0, 30, 60]
    assert passed[1][1].endswith("[299 more like this in the last 30 s]")
    assert f.filter(record("another message")) is True


@pytest.mark.parametrize("heartbeat, session", [(6.0, 10.0), (0.0, 10.0)])
def test_heartbeats_must_fit_the_session_timeout(heartbeat, session):
    with pytest.raises(ValueError, match="kafka_heartbeat_s"):
        Settings.from_env({}, kafka_heartbeat_s=heartbeat, kafka_session_timeout_s=session)
