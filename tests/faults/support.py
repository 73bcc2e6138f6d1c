"""Helpers of the fault suite: a stack to break, an agent that keeps sending, checks on what landed.

In the spirit of Bytewax's ABORT testing and Jepsen's checks: the services are
real, faults are real (a stopped broker, a killed Redis, ``kill -9`` of a
worker), and the verdict is about what was acknowledged: every record the log
holds is in the windows exactly once, every VM's newest sample is scored.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from app import services as svc
from app.settings import Settings
from app.worker_process import WorkerProcess
from sim.fleet import FIELDS, series
from sim.produce import encode_rows
from streams.schema import decode_messages
from streams.window_store import WindowStore

SLOT_S = 300


@dataclass
class FaultStack:
    """Kafka + Redis of the fault suite (see conftest), with the faults as methods."""

    settings: Settings

    @classmethod
    def create(cls, tmp: Path) -> FaultStack:
        settings = Settings.from_env(
            kafka_bootstrap=f"127.0.0.1:{svc.free_port()}",
            redis_url=f"redis://127.0.0.1:{svc.free_port()}/0",
            state_dir=str(tmp / "state"),
            model_store=str(tmp / "models"),
            metrics_port=0,
            topic_partitions=4,
            snapshot_every_s=2.0,
            batch_within_s=0.2,
            consumer_group="zhuge-faults",
        )
        return cls(settings)

    def missing_tools(self) -> list[str]:
        return [str(m) for m in svc.check_tools(self.settings)]

    def up(self, *names: str) -> None:
        svc.up(self.settings, echo=lambda line: None, only=names or None)

    def stop(self, name: str) -> None:
        """A clean stop (the broker flushes and deregisters)."""
        svc.down(self.settings, echo=lambda line: None, only=[name])

    def kill(self, name: str) -> None:
        """SIGKILL: what a crashed host looks like."""
        svc.down(self.settings, echo=lambda line: None, only=[name], kill=True)

    def ensure_up(self) -> None:
        self.up()

    def down(self) -> None:
        svc.down(self.settings, echo=lambda line: None)


def fleet_messages(n_vms: int, steps: int, *, seed: int = 5, end_ts: float | None = None) -> list[tuple[bytes, bytes]]:
    """``steps`` 5-minute periods of a simulated fleet, one JSON object per VM sample (key = VM id), time order."""
    end = time.time() - 60 if end_ts is None else end_ts
    data = series(n_vms, max(1, n_vms // 8), end - steps * SLOT_S, steps, SLOT_S, seed)
    vm, host = [str(v) for v in data["vm"]], [str(h) for h in data["host"]]
    out: list[tuple[bytes, bytes]] = []
    for t in range(steps):
        cols = {f: data[f][t] for f in FIELDS}
        out += encode_rows(vm, np.full(n_vms, data["ts"][t]), cols, host, batched=False)
    return out


@dataclass
class Agent:
    """A hypervisor agent in a thread: sends ``messages`` evenly over ``seconds`` and never gives up.

    Idempotent producer with a delivery timeout longer than any outage in the suite:
    during a broker outage its sends wait in the client and are retried by it (no
    duplicates), as a well-configured exporter's would be.
    """

    settings: Settings
    messages: list[tuple[bytes, bytes]]
    seconds: float
    topic: str = ""
    sent: int = 0
    acked: int = 0
    errors: list[str] = field(default_factory=list)
    finished_at: float | None = None
    _thread: threading.Thread | None = None

    def start(self) -> Agent:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), name="agent", daemon=True)
        self._thread.start()
        return self

    async def _run(self) -> None:
        from aiokafka import AIOKafkaProducer

        producer = AIOKafkaProducer(
            **self.settings.aiokafka_kwargs(), enable_idempotence=True, acks="all", linger_ms=10,
            request_timeout_ms=180_000, retry_backoff_ms=500,
        )  # fmt: skip
        await producer.start()
        topic = self.topic or self.settings.topic_metrics
        started = time.monotonic()
        futures = []
        try:
            for i, (key, value) in enumerate(self.messages):
                await asyncio.sleep(max(0.0, started + self.seconds * i / len(self.messages) - time.monotonic()))
                futures.append(await producer.send(topic, value, key=key))
                self.sent += 1
            for outcome in await asyncio.gather(*futures, return_exceptions=True):
                if isinstance(outcome, BaseException):
                    self.errors.append(repr(outcome))
                else:
                    self.acked += 1
        finally:
            await producer.stop()
            self.finished_at = time.monotonic()

    def join(self, timeout_s: float) -> None:
        assert self._thread is not None
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), f"agent still sending after {timeout_s}s ({self.sent} sent)"
        assert not self.errors, f"the agent lost messages: {self.errors[:3]}"
        assert self.acked == len(self.messages)


def log_windows(settings: Settings) -> dict[str, np.ndarray]:
    """Each VM's window when every record now in the topic is applied exactly once (no worker)."""
    return asyncio.run(_log_windows(settings))


async def _log_windows(settings: Settings) -> dict[str, np.ndarray]:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(group_id=None, enable_auto_commit=False, auto_offset_reset="earliest", **settings.aiokafka_kwargs())
    await consumer.start()
    store = WindowStore(settings.window_slots, settings.slot_s, settings.vm_ttl_s)
    try:
        tps = [TopicPartition(settings.topic_metrics, p) for p in range(settings.topic_partitions)]  # as the worker made it
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        for tp, first in (await consumer.beginning_offsets(tps)).items():
            consumer.seek(tp, first)
        for tp in tps:
            while await consumer.position(tp) < ends[tp]:
                got = await consumer.getmany(tp, timeout_ms=2000, max_records=5000)
                recs = got.get(tp, [])
                d = decode_messages([r.value for r in recs], [r.key for r in recs], now=time.time(),
                                    limits=_limits(settings))  # fmt: skip
                store.update(d.vm, d.host, d.ts, d.values)
    finally:
        await consumer.stop()
    rows = store.active_rows()
    win, attrs = store.windows(rows)
    return {vm: np.asarray(win[i]) for i, vm in enumerate(attrs["vm"])}


def _limits(settings: Settings):  # noqa: ANN202
    from streams.schema import limits_from_settings

    return limits_from_settings(settings)


def wait_until(predicate, what: str, timeout_s: float, worker: WorkerProcess | None = None, every_s: float = 0.3) -> float:  # noqa: ANN001
    """Poll ``predicate`` until true; returns the seconds it took."""
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"{what} not reached after {timeout_s}s" + (f":\n{worker.tail()}" if worker else ""))
        time.sleep(every_s)
    return time.monotonic() - t0


def scored_newest(settings: Settings, expected: dict[str, float]) -> int:
    """How many of ``expected``'s VMs have a Redis hash whose ``last_ts`` is their newest sample."""
    client = settings.redis_client(asyncio=False)
    try:
        pipe = client.pipeline(transaction=False)
        for vm in expected:
            pipe.hget(f"{settings.redis_prefix}vm:{vm}", "last_ts")
        got = pipe.execute()
    except Exception:  # noqa: BLE001 - Redis away: nothing is visibly scored
        return 0
    finally:
        client.close()
    return sum(1 for vm, ts in zip(expected, got) if ts is not None and float(ts) == expected[vm])


@dataclass
class Outage:
    """What ``through_outage`` saw: the worker (still running), its pid at start, when the service came back."""

    worker: WorkerProcess
    pid: int
    back: float  # monotonic time the service answered again
    agent: Agent
    messages: list[tuple[bytes, bytes]]
    during: dict[str, float | None]  # metrics sampled in the middle of the outage


def through_outage(
    stack: FaultStack, settings: Settings, log: Path, *, service: str, kill: bool, outage_s: float,
    vms: int = 30, before_s: float = 15.0, after_s: float = 10.0,
) -> Outage:  # fmt: skip
    """Start a worker and an agent (one sample per VM every ~second), take ``service`` away for
    ``outage_s`` (``kill``: SIGKILL, else a clean stop) ``before_s`` into the run, bring it back;
    the agent keeps sending ``after_s`` more. Returns once the service is back; the caller stops the worker."""
    seconds = before_s + outage_s + after_s
    messages = fleet_messages(vms, int(seconds) + 10)
    worker = WorkerProcess.start(settings, log, ready_timeout=120)
    agent = Agent(settings, messages, seconds=seconds).start()
    time.sleep(before_s)
    (stack.kill if kill else stack.stop)(service)
    time.sleep(outage_s / 2)
    during = {
        "sink_up": worker.sample("zhuge_sink_up", sink="kafka" if service == "kafka" else "redis"),
        "batch_stalled_s": worker.sample("zhuge_batch_stalled_seconds"),
    }
    time.sleep(outage_s / 2)
    assert worker.proc.poll() is None, f"the worker died during the outage:\n{worker.tail()}"
    stack.up(service)
    return Outage(worker, worker.proc.pid, time.monotonic(), agent, messages, during)
