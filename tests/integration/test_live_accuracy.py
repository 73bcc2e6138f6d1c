"""Live accuracy end to end: a real ``zhuge worker`` fed a replay exposes, on /metrics, realised errors
equal to an offline computation on the same samples with the same model file.

The replay (``tests.accuracy_support``): 4 VMs, 40 hourly slots (so "the same slot yesterday" lies
inside it and a 6 h horizon is realised many times), one sample per VM and slot, produced one slot
at a time and scored before the next (the worker forecasts every VM at every slot, as it would in
real time), with gaps and a VM without network. The offline side rebuilds each forecast's window
with the training code (``windows_at``), runs ``build_features`` and the model loaded from the same
store, and measures every realised pair with plain loops.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from app.settings import Settings
from app.worker_process import WorkerProcess
from tests import accuracy_support as acc
from tests.integration.worker_support import isolated_worker_settings
from training.store import ModelStore

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


@pytest.fixture
def worker_settings(unique_topics: Settings, tmp_path: Path) -> Settings:
    return isolated_worker_settings(
        unique_topics, tmp_path, partitions=2, slot_s=acc.SLOT_S, window_span_s=acc.WINDOW_S, horizon_s=acc.HORIZON_S,
        accuracy_sample=1.0, batch_within_s=0.05, model_store=str(tmp_path / "models"),
    )  # fmt: skip


async def _replay_slot_by_slot(settings: Settings, worker: WorkerProcess, start: int) -> None:
    """Each slot's samples, then wait until the worker scored every VM in it (so each slot is one forecast run)."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(**settings.aiokafka_kwargs(), linger_ms=1)
    await producer.start()
    try:
        scored = 0
        for s in range(acc.SLOTS):
            messages = acc.slot_messages(start, s)
            await asyncio.gather(*[await producer.send(settings.topic_metrics, v, key=k) for k, v in messages])
            scored += len(messages)
            deadline = time.monotonic() + 30
            while await asyncio.to_thread(worker.counter, "zhuge_vms_scored_total") < scored:
                assert time.monotonic() < deadline, f"slot {s} not scored within 30 s:\n{worker.tail()}"
                assert worker.proc.poll() is None, f"worker died:\n{worker.tail()}"
                await asyncio.sleep(0.05)
    finally:
        await producer.stop()


def test_a_replayed_worker_exposes_the_realised_errors_of_an_offline_computation(worker_settings, tmp_path):
    store = ModelStore(worker_settings.model_store)
    version = store.publish(acc.test_model())
    model = store.load(version, slot_s=acc.SLOT_S)  # the file the worker serves
    start = acc.t0()

    worker = WorkerProcess.start(worker_settings, tmp_path / "worker.log", ready_timeout=90)
    try:
        assert worker.model_version() == version
        began = time.monotonic()
        asyncio.run(_replay_slot_by_slot(worker_settings, worker, start))
        replay_s = time.monotonic() - began
        samples = worker._samples()
    finally:
        assert worker.stop() == 0, worker.tail()

    got = {(s.name.rsplit("_", 1)[1], s.labels["target"], s.labels["bucket"], s.labels["method"]): float(s.value)
           for s in samples if s.name in ("zhuge_forecast_abs_error_sum", "zhuge_forecast_abs_error_count")}  # fmt: skip
    want = acc.offline_errors(start, model)
    assert len(got) == 2 * len(want) == 2 * 27
    mismatches = []
    for (t, b, m), (total, n) in want.items():
        if got[("count", t, b, m)] != n or got[("sum", t, b, m)] != pytest.approx(total, rel=1e-9, abs=1e-9):
            mismatches.append(f"{t} {b} {m}: worker {got[('sum', t, b, m)]:.6f}/{got[('count', t, b, m)]:.0f}, "
                              f"offline {total:.6f}/{n}")  # fmt: skip
    assert not mismatches, "realised errors differ from the offline computation:\n" + "\n".join(mismatches)
    assert want[("cpu_pct", "1h", "model")][1] > 100 and want[("cpu_pct", "6h", "model")][1] > 400  # not vacuous
    assert want[("cpu_pct", "24h", "model")][1] == 0  # the 6 h horizon has nothing beyond 6 h
    tracked = next(s.value for s in samples if s.name == "zhuge_forecast_tracked_vms")
    assert tracked == acc.VMS
    print(f"LIVE-ACCURACY replay of {acc.SLOTS} slots x {acc.VMS} VMs in {replay_s:.1f} s")
