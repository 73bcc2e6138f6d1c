"""The streaming worker end to end: real traces in, scores in Redis, recovery without gaps.

Each test runs real ``zhuge worker`` processes against the real broker and Redis.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from pathlib import Path

import pytest

from app.settings import Settings
from app.worker_process import WorkerProcess
from tests.integration.worker_support import (
    assert_same_windows,
    assert_valid_score,
    bitbrains_messages,
    isolated_worker_settings,
    newest_ts,
    produce,
    reference_windows,
    snapshot_windows,
    wait_for_key,
    wait_for_scores,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]

VMS = "1-12"
ROWS_PER_VM = 400  # the last ~33 hours of each VM: more than one 24 h window


@pytest.fixture
def worker_settings(unique_topics: Settings, tmp_path: Path) -> Settings:
    return isolated_worker_settings(
        unique_topics, tmp_path, partitions=4, snapshot_every_s=1.0, batch_within_s=0.2, batch_max=500
    )


def _wait_processed(worker: WorkerProcess, samples: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while worker.counter("zhuge_samples_in_total") < samples:
        assert time.monotonic() < deadline, f"worker stuck below {samples} samples:\n{worker.tail()}"
        time.sleep(0.2)


def test_replayed_traces_end_with_a_score_per_vm_at_its_newest_sample(worker_settings: Settings, tmp_path: Path) -> None:
    messages = bitbrains_messages(VMS, ROWS_PER_VM)
    worker = WorkerProcess.start(worker_settings, tmp_path / "worker.log", ready_timeout=120)
    try:
        asyncio.run(produce(worker_settings, messages))
        sent = time.monotonic()
        hashes = wait_for_scores(worker_settings, newest_ts(messages), timeout_s=60)
        assert time.monotonic() - sent < 60
        for h in hashes.values():
            assert_valid_score(h)
        # observed migrations, each 3x slower than predicted, teach the shared correction
        migrations = [
            (vm.encode(), json.dumps({
                "vm": vm, "start": float(h["last_ts"]) + 60, "end": float(h["last_ts"]) + 70,
                "downtime_ms": 3 * float(h["now_downtime_ms"]),
            }).encode())
            for vm, h in hashes.items()
        ]
        asyncio.run(produce(worker_settings.replace(topic_metrics=worker_settings.topic_migrations), migrations))
        state = wait_for_key(worker_settings, f"{worker_settings.redis_prefix}correction")
        assert state["global"][2] == len(migrations)
        assert abs(state["global"][0] - math.log(3)) < 1e-6
    finally:
        assert worker.stop() == 0, worker.tail()
    assert_same_windows(snapshot_windows(worker_settings), reference_windows(worker_settings, messages))


@pytest.mark.parametrize(
    "snapshot_every_s, recovery",
    [(1.0, "snapshot newer than the committed offset: re-delivered records skipped"),
     (6.0, "snapshot older than the committed offset: the gap replayed from Kafka")],
    ids=["skip-redelivered", "replay-gap"],
)
def test_kill_9_mid_replay_then_restart_leaves_no_gap(
    worker_settings: Settings, tmp_path: Path, snapshot_every_s: float, recovery: str
) -> None:
    settings = worker_settings.replace(snapshot_every_s=snapshot_every_s)
    messages = bitbrains_messages(VMS, ROWS_PER_VM)
    half = len(messages) // 2
    first = WorkerProcess.start(settings, tmp_path / "first.log", ready_timeout=120)
    asyncio.run(produce(settings, messages[:half]))
    _wait_processed(first, half)
    time.sleep(snapshot_every_s + 0.5)
    asyncio.run(produce(settings, messages[half : half + 50]))  # this batch triggers a snapshot
    _wait_processed(first, half + 50)
    asyncio.run(produce(settings, messages[half + 50 : half + 550]))  # processed and committed after it
    _wait_processed(first, half + 550)
    time.sleep(2.5)  # offsets are committed every second
    first.kill9()

    asyncio.run(produce(settings, messages[half + 550 :]))
    second = WorkerProcess.start(settings, tmp_path / "second.log", ready_timeout=120)
    try:
        hashes = wait_for_scores(settings, newest_ts(messages), timeout_s=60)
        for h in hashes.values():
            assert_valid_score(h)
        if snapshot_every_s > 2:
            assert second.counter("zhuge_recovery_replayed_records_total") > 0, recovery
    finally:
        assert second.stop() == 0, second.tail()
    assert_same_windows(snapshot_windows(settings), reference_windows(settings, messages))


def test_two_workers_share_partitions_and_a_rebalance_leaves_no_gap(worker_settings: Settings, tmp_path: Path) -> None:
    messages = bitbrains_messages(VMS, ROWS_PER_VM)
    third = len(messages) // 3
    a = WorkerProcess.start(worker_settings, tmp_path / "a.log", ready_timeout=120)
    b = None
    try:
        asyncio.run(produce(worker_settings, messages[:third]))
        _wait_processed(a, third)
        b = WorkerProcess.start(worker_settings, tmp_path / "b.log", ready_timeout=120)
        asyncio.run(produce(worker_settings, messages[third:]))
        hashes = wait_for_scores(worker_settings, newest_ts(messages), timeout_s=90)
        for h in hashes.values():
            assert_valid_score(h)
        assert b.counter("zhuge_samples_in_total") > 0, "the second worker got no partition"
    finally:
        if b is not None:
            assert b.stop() == 0, b.tail()
        assert a.stop() == 0, a.tail()
    assert_same_windows(snapshot_windows(worker_settings), reference_windows(worker_settings, messages))


def test_running_worker_swaps_to_a_published_model_and_refuses_a_corrupt_one(
    worker_settings: Settings, tmp_path: Path
) -> None:
    from app.model_watch import notify_new_version
    from training.bootstrap import bootstrap_model
    from training.store import ModelStore

    settings = worker_settings.replace(model_store=str(tmp_path / "models"), model_check_s=2.0)
    store = ModelStore(settings.model_store)
    messages = bitbrains_messages("1-4", 300)
    worker = WorkerProcess.start(settings, tmp_path / "worker.log", ready_timeout=120)
    try:
        first = store.latest_version()
        assert worker.model_version() == first

        challenger = bootstrap_model(settings)
        published = store.publish(challenger, now=time.time() + 1)
        notify_new_version(settings, published)
        wait_until(lambda: worker.model_version() == published, f"worker never swapped to {published}", worker)
        asyncio.run(produce(settings, messages))
        hashes = wait_for_scores(settings, newest_ts(messages))
        assert {h["model"] for h in hashes.values()} == {published}

        corrupt = store.publish(bootstrap_model(settings), now=time.time() + 2)
        model_file = next((Path(settings.model_store) / corrupt).glob("*.ubj"))
        model_file.write_bytes(model_file.read_bytes()[:-16] + b"\0" * 16)
        notify_new_version(settings, corrupt)
        wait_until(lambda: worker.counter("zhuge_model_rejected_total") >= 1, "corrupt model not refused", worker)
        assert worker.model_version() == published
        assert worker.proc.poll() is None, "the worker must keep running"
    finally:
        assert worker.stop() == 0, worker.tail()


def wait_until(predicate, message: str, worker: WorkerProcess, timeout_s: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"{message}:\n{worker.tail()}"
        time.sleep(0.3)


def test_a_worker_started_on_a_broken_latest_serves_the_newest_version_that_loads(
    worker_settings: Settings, tmp_path: Path
) -> None:
    from tests.model_support import tiny_model
    from training.store import ModelStore

    settings = worker_settings.replace(model_store=str(tmp_path / "models"))
    store = ModelStore(settings.model_store)
    good = store.publish(tiny_model(0), now=time.time())
    broken = store.publish(tiny_model(1), now=time.time() + 1)  # LATEST, then damaged as a half-done upload would be
    model_file = next((Path(settings.model_store) / broken).glob("*.ubj"))
    model_file.write_bytes(model_file.read_bytes()[: len(model_file.read_bytes()) // 2])
    assert store.latest_version() == broken
    worker = WorkerProcess.start(settings, tmp_path / "worker.log", ready_timeout=120)
    try:
        assert worker.model_version() == good
        assert f"model {broken} REFUSED at start" in worker.tail(400)
    finally:
        assert worker.stop() == 0, worker.tail()
