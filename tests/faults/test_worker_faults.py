"""A worker an SRE can leave running: each ordinary fault, for real, and what must hold afterwards.

Every test drives real ``zhuge worker`` processes against the fault suite's own
Kafka and Redis (see conftest) and prints the figure it measured (``-s`` shows
them; the README quotes them).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from app.settings import Settings
from app.worker_process import WorkerProcess, settings_env
from streams.migrations import CORRECTION_KEY, DowntimeCorrection
from tests.faults.support import (
    Agent, FaultStack, fleet_messages, log_windows, scored_newest, through_outage, wait_until,
)
from tests.fuzz_messages import fuzz_messages, newest_per_vm
from tests.integration.worker_support import assert_same_windows, newest_ts, produce, snapshot_windows

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.timeout(420)]


def redis_call(settings: Settings, command: str, *args: object) -> object:
    """One command on the fault stack's Redis, on a connection of its own."""
    client = settings.redis_client(asyncio=False)
    try:
        return getattr(client, command)(*args)
    finally:
        client.close()


def report(name: str, **figures: object) -> None:
    print(f"\nFAULT-FIGURE {name}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


def test_a_worker_started_before_its_topics_and_any_producer_scores_the_first_samples_within_15_s(
    fault_settings: Settings, tmp_path: Path
) -> None:
    worker = WorkerProcess.start(fault_settings, tmp_path / "worker.log", ready_timeout=120)  # topics do not exist yet
    try:
        messages = fleet_messages(20, 3)
        t0 = time.monotonic()
        asyncio.run(produce(fault_settings, messages))
        took = wait_until(lambda: scored_newest(fault_settings, newest_ts(messages)) == 20, "all 20 VMs scored", 15, worker)
        report("start-order", seconds_to_all_scored=round(time.monotonic() - t0, 2), wait=round(took, 2))
    finally:
        assert worker.stop() == 0, worker.tail()


def test_a_worker_started_before_the_broker_waits_for_it_and_then_consumes(
    fault_stack: FaultStack, fault_settings: Settings, tmp_path: Path
) -> None:
    fault_stack.stop("kafka")
    log = tmp_path / "worker.log"
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "worker"], env=settings_env(fault_settings),
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)  # noqa: SIM115
    worker = WorkerProcess(proc, fault_settings.metrics_port, log)
    try:
        time.sleep(4)
        assert proc.poll() is None, worker.tail()
        assert "waiting for Kafka" in log.read_text()
        fault_stack.up("kafka")
        # metrics_port 0 in the fault settings: readiness is seen in Redis instead of /metrics
        messages = fleet_messages(10, 2)
        asyncio.run(produce(fault_settings, messages))
        took = wait_until(lambda: scored_newest(fault_settings, newest_ts(messages)) == 10, "all 10 VMs scored", 60, worker)
        report("broker-after-worker", seconds_to_all_scored_after_produce=round(took, 2))
    finally:
        assert worker.stop() == 0, worker.tail()


def test_kill_9_early_during_a_replay_then_restart_scores_every_vm_within_30_s(
    fault_settings: Settings, tmp_path: Path
) -> None:
    messages = fleet_messages(40, 60)  # 2,400 samples of 40 VMs, sent over 20 s
    first = WorkerProcess.start(fault_settings, tmp_path / "first.log", ready_timeout=120)
    agent = Agent(fault_settings, messages, seconds=20).start()
    time.sleep(4)
    first.kill9()
    restarted_at = time.monotonic()
    second = WorkerProcess.start(fault_settings, tmp_path / "second.log", ready_timeout=120)
    try:
        wait_until(lambda: second.sample("zhuge_partitions_assigned") == 4, "partitions taken over", 60, second, every_s=0.1)
        takeover = time.monotonic() - restarted_at  # process start, model load, group rejoin, partitions owned
        agent.join(60)
        ended = time.monotonic()
        took = wait_until(lambda: scored_newest(fault_settings, newest_ts(messages)) == 40,
                          "every VM scored at its newest sample", 30, second)  # fmt: skip
        report("kill-9-takeover", takeover_s=round(takeover, 2), scored_after_replay_end_s=round(time.monotonic() - ended, 2),
               replayed=second.counter("zhuge_recovery_replayed_records_total"),
               skipped=second.counter("zhuge_recovery_skipped_records_total"))  # fmt: skip
        assert took < 30
    finally:
        assert second.stop() == 0, second.tail()
    assert_same_windows(snapshot_windows(fault_settings), log_windows(fault_settings))
    # the samples the killed worker held for its next history flush were archived by the second one
    import pyarrow.dataset as ds

    table = ds.dataset(fault_settings.history_url, format="parquet", partitioning="hive").to_table(columns=["vm", "ts"])
    archived = set(zip(table.column("vm").to_pylist(), table.column("ts").to_pylist()))
    sent = {(json.loads(v)["vm"], float(json.loads(v)["ts"])) for _, v in messages}
    assert sent <= archived, f"{len(sent - archived)} of {len(sent)} samples missing from the archive"


def test_the_broker_stopped_60_s_while_the_agent_keeps_sending_then_the_same_worker_catches_up_within_30_s(
    fault_stack: FaultStack, fault_settings: Settings, tmp_path: Path
) -> None:
    run = through_outage(fault_stack, fault_settings, tmp_path / "worker.log", service="kafka", kill=False, outage_s=60)
    try:
        run.agent.join(120)
        wait_until(lambda: scored_newest(fault_settings, newest_ts(run.messages)) == 30,
                   "every VM scored at its newest sample", 60, run.worker)  # fmt: skip
        caught_up = time.monotonic() - run.back
        report("broker-outage-60s", caught_up_after_return_s=round(caught_up, 2),
               agent_done_after_return_s=round(run.agent.finished_at - run.back, 2), **run.during,
               kafka_send_errors=run.worker.counter("zhuge_kafka_send_errors_total"))  # fmt: skip
        assert run.worker.proc.pid == run.pid and run.worker.proc.poll() is None, "the worker restarted"
        assert caught_up < 30
    finally:
        assert run.worker.stop() == 0, run.worker.tail()
    assert_same_windows(snapshot_windows(fault_settings), log_windows(fault_settings))


def test_redis_killed_for_45_s_under_load_then_the_same_worker_scores_every_vm_and_loses_nothing(
    fault_stack: FaultStack, fault_settings: Settings, tmp_path: Path
) -> None:
    learned = DowntimeCorrection()  # a correction learned from 20 migrations at 3x their prediction
    learned.update(["h"] * 20, np.full(20, 300.0), np.full(20, 100.0))
    redis_call(fault_settings, "set", fault_settings.redis_prefix + CORRECTION_KEY, learned.to_json())
    run = through_outage(fault_stack, fault_settings, tmp_path / "worker.log", service="redis", kill=True, outage_s=45)
    try:  # Redis is back empty (no persistence): the worker must write what it holds again
        run.agent.join(90)
        took = wait_until(lambda: scored_newest(fault_settings, newest_ts(run.messages)) == 30,
                          "every VM scored at its newest sample", 60, run.worker)  # fmt: skip
        wait_until(lambda: redis_call(fault_settings, "get", fault_settings.redis_prefix + CORRECTION_KEY),
                   "the learned correction written back", 45, run.worker)  # fmt: skip
        back = DowntimeCorrection.from_json(redis_call(fault_settings, "get", fault_settings.redis_prefix + CORRECTION_KEY))
        assert back.observations == 20 and back.global_factor() == pytest.approx(3.0)
        vm = next(iter(newest_ts(run.messages)))
        factor = redis_call(fault_settings, "hget", f"{fault_settings.redis_prefix}vm:{vm}", "downtime_factor")
        assert float(factor) == pytest.approx(3.0), "scores after the outage must still carry the correction"
        report("redis-outage-45s", scored_after_return_s=round(time.monotonic() - run.back, 2), wait_after_agent_s=round(took, 2),
               redis_errors=run.worker.counter("zhuge_redis_errors_total"), **run.during)  # fmt: skip
        assert run.worker.proc.pid == run.pid and run.worker.proc.poll() is None, "the worker restarted"
        assert run.during["sink_up"] == 0 and (run.during["batch_stalled_s"] or 0) > 10, "the outage must show on /metrics"
    finally:
        assert run.worker.stop() == 0, run.worker.tail()
    assert_same_windows(snapshot_windows(fault_settings), log_windows(fault_settings))


def test_10000_fuzzed_messages_through_a_real_worker_all_bad_ones_dead_lettered_every_good_vm_scored(
    fault_settings: Settings, tmp_path: Path
) -> None:
    good_vms = [f"fuzz-vm-{i:03d}" for i in range(50)]
    now = time.time()
    fuzz = [m for m in fuzz_messages(10_000, seed=9, now=now, good_vms=good_vms) if len(m.value) < 1_000_000]
    # (messages above the broker's 1 MB record limit are refused by Kafka itself; the unit test covers them)
    bad = [m for m in fuzz if m.bad]
    expected = newest_per_vm(fuzz)
    worker = WorkerProcess.start(fault_settings, tmp_path / "worker.log", ready_timeout=120)
    pid = worker.proc.pid
    try:
        asyncio.run(produce(fault_settings, [(m.key or b"", m.value) for m in fuzz]))
        took = wait_until(lambda: scored_newest(fault_settings, expected) == len(expected), "every good VM scored", 60, worker)
        dlq = asyncio.run(_read_all(fault_settings, fault_settings.topic_dlq, len(bad), timeout_s=60))
        report("fuzz-10k", messages=len(fuzz), bad=len(bad), good_vms=len(expected), scored_after_send_s=round(took, 2),
               dlq_records=len(dlq))  # fmt: skip
        assert len(dlq) == len(bad)
        assert all(dict(r.headers).get("reason") for r in dlq), "a DLQ record without a reason"
        assert sorted(r.value for r in dlq) == sorted(m.value for m in bad)
        assert worker.proc.pid == pid and worker.proc.poll() is None, "the worker restarted"
        assert worker.counter("zhuge_vms_evicted_total") == 0
        assert worker.counter("zhuge_batch_errors_total") == 0
        assert worker.metric_sums()["zhuge_window_store_vms"] == len(expected)
    finally:
        assert worker.stop() == 0, worker.tail()


async def _read_all(settings: Settings, topic: str, n: int, timeout_s: float) -> list:  # type: ignore[type-arg]
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(topic, group_id=None, auto_offset_reset="earliest", enable_auto_commit=False,
                                **settings.aiokafka_kwargs())  # fmt: skip
    await consumer.start()
    out: list = []  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            got = await consumer.getmany(timeout_ms=1000)
            out += [r for recs in got.values() for r in recs]
            if len(out) >= n:
                await asyncio.sleep(1.0)  # and nothing more arrives
                out += [r for recs in (await consumer.getmany(timeout_ms=500)).values() for r in recs]
                break
    finally:
        await consumer.stop()
    return out


def test_sigterm_with_the_broker_down_exits_within_the_bound(
    fault_stack: FaultStack, fault_settings: Settings, tmp_path: Path
) -> None:
    settings = fault_settings.replace(shutdown_timeout_s=10.0)
    worker = WorkerProcess.start(settings, tmp_path / "worker.log", ready_timeout=120)
    asyncio.run(produce(settings, fleet_messages(10, 2)))
    time.sleep(3)
    fault_stack.kill("kafka")
    time.sleep(3)
    t0 = time.monotonic()
    os.killpg(worker.proc.pid, signal.SIGTERM)
    try:
        worker.proc.wait(timeout=settings.shutdown_timeout_s + 5)
    finally:
        if worker.proc.poll() is None:
            worker.kill9()
    took = time.monotonic() - t0
    report("sigterm-broker-down", exit_s=round(took, 2), bound_s=settings.shutdown_timeout_s, code=worker.proc.returncode)
    assert took <= settings.shutdown_timeout_s + 1.0
    assert worker.proc.returncode == 0
    assert "stopping: offsets committed where possible, windows snapshotted" in worker.tail(400)


def test_the_broker_stopped_45_s_under_a_realtime_simulator_holds_it_back_and_every_sample_lands(
    fault_stack: FaultStack, fault_settings: Settings, tmp_path: Path
) -> None:
    """What a user sees who runs ``zhuge simulate --realtime`` through an outage: warnings, no traceback.

    Longer than aiokafka's own retries (its request timeout, 40 s): before, the failed deliveries
    ended the simulator with a NodeNotReadyError traceback."""
    vms, steps = 20, 40
    log_path = tmp_path / "simulate.log"
    with open(log_path, "wb") as log:
        sim = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "simulate", "--realtime", "--period", "1", "--steps", str(steps),
             "--vms", str(vms), "--hosts", "2", "--per-vm"],
            env=settings_env(fault_settings), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            time.sleep(8)
            fault_stack.stop("kafka")
            down = time.monotonic()
            time.sleep(45)
            assert sim.poll() is None, log_path.read_text()[-2000:]  # still there while the broker is away
            fault_stack.up("kafka")
            back = time.monotonic()
            code = sim.wait(timeout=120)
            done_after_return = time.monotonic() - back
        finally:
            if sim.poll() is None:
                os.killpg(sim.pid, signal.SIGKILL)
    text = log_path.read_text()
    got = asyncio.run(_read_all(fault_settings, fault_settings.topic_metrics, vms * steps, 60))
    samples = {(json.loads(r.value)["vm"], json.loads(r.value)["ts"]) for r in got}
    report("simulator-broker-outage-45s", outage_s=round(back - down, 1), done_after_return_s=round(done_after_return, 1),
           records=len(got), distinct_samples=len(samples))  # fmt: skip
    assert code == 0 and "Traceback" not in text, text[-3000:]
    assert ("WARNING" in text or "ERROR" in text) and f"sent {vms * steps:,} samples" in text  # the outage showed
    assert len(samples) == vms * steps  # every period of every VM, duplicates allowed (at least once)
