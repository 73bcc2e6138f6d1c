"""``zhuge lab migrate``: when to migrate, what zhuge predicted then, and the outcome to ``vm.migrations``.

``--at now`` migrates at once; ``--at recommended`` waits for the start of the
window zhuge publishes for the VM (``best_start`` of ``<prefix>vm:<vm>``, on the
lab clock); an ISO time waits for that lab-clock time. Right before the migration
starts, the VM's score in Redis is read: the prediction in force then
(``now_downtime_ms``, ``now_total_s``, the correction it includes, its time and model) goes into the
``vm.migrations`` record with the outcome, so the learned correction compares
like with like.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from app.settings import Settings
from lab.migrate import MigrationOutcome, MigrationPolicy, migrate
from lab.state import LabState, lab_dir, load

Echo = Callable[[str], None]


@dataclass(frozen=True)
class MigrationRequest:
    vm: str
    lab: str = "default"
    to_host: str | None = None
    at: str = "now"  # now | recommended | ISO time (lab clock)
    limit_ms: float = 300.0
    timeout_s: float = 60.0
    on_timeout: str = "abort"
    publish: bool = True


async def read_score(settings: Settings, vm: str) -> dict[str, Any] | None:
    """The VM's score hash (numbers as floats), None when unknown or Redis is away."""
    from streams.sinks.redis_sink import read_vm

    client = settings.redis_client()
    try:
        return await read_vm(client, settings.redis_prefix, vm)
    except Exception:  # noqa: BLE001 - no score is a valid answer: the migration still runs
        return None
    finally:
        await client.aclose()


def prediction_of(score: dict[str, Any] | None) -> dict[str, Any] | None:
    """The ``vm.migrations`` prediction fields from a score hash (the prediction for starting now)."""
    if not score:
        return None
    total = score.get("now_total_s")
    return {
        "predicted_downtime_ms": score.get("now_downtime_ms"),
        "predicted_total_ms": total * 1000 if isinstance(total, float) and total == total and total != float("inf") else None,
        "predicted_factor": score.get("downtime_factor"),  # None from a score written before the field
        "predicted_at": score.get("updated"), "model": score.get("model"),
    }  # fmt: skip


def start_time(state: LabState, at: str, score: dict[str, Any] | None) -> float:
    """The lab-clock time the migration should start at."""
    now = state.clock.now()
    if at == "now":
        return now
    if at == "recommended":
        if not score or not isinstance(score.get("best_start"), float):
            raise ValueError("no recommended window in Redis for this VM yet (is the worker scoring it?)")
        return max(now, float(score["best_start"]))
    try:
        when = dt.datetime.fromisoformat(at.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ValueError(f"--at must be now, recommended or an ISO time, not {at!r}") from exc
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return max(now, when.timestamp())


async def execute(settings: Settings, req: MigrationRequest, echo: Echo = print) -> tuple[MigrationOutcome, dict[str, Any]]:
    """Wait for the requested time, migrate, publish; returns the outcome and its ``vm.migrations`` record."""
    folder = lab_dir(settings.state_dir, req.lab)
    state = load(folder)
    if state is None or req.vm not in state.guests:
        raise ValueError(f"no guest {req.vm!r} in lab {req.lab!r}")
    when = start_time(state, req.at, await read_score(settings, req.vm) if req.at == "recommended" else None)
    wait = state.clock.wall_of(when) - state.clock.wall_of(state.clock.now())
    if wait > 0:
        echo(f"{req.vm}: waiting {wait:.0f} s for {dt.datetime.fromtimestamp(when, dt.timezone.utc):%Y-%m-%d %H:%M:%S} UTC (lab clock)")
        await asyncio.sleep(wait)
    prediction = prediction_of(await read_score(settings, req.vm))
    policy = MigrationPolicy(downtime_limit_ms=req.limit_ms, timeout_s=req.timeout_s, on_timeout=req.on_timeout)
    outcome = await migrate(settings.state_dir, req.lab, req.vm, req.to_host, policy)
    message = outcome.message(prediction)
    if req.publish:
        await publish(settings, [message])
    return outcome, message


async def publish(settings: Settings, messages: list[dict[str, Any]]) -> None:
    """Produce outcomes to ``vm.migrations`` (key = VM id), retried until acknowledged."""
    import msgspec
    from aiokafka import AIOKafkaProducer

    from app.topics import ensure_topics
    from streams.sinks.kafka_out import OutRecord, send_all

    await ensure_topics(settings, [settings.topic_migrations])
    producer = AIOKafkaProducer(**settings.aiokafka_kwargs(), acks="all")
    await producer.start()
    try:
        encode = msgspec.json.Encoder().encode
        await send_all(producer, [OutRecord(settings.topic_migrations, m["vm"].encode(), encode(m), output="migrations")
                                  for m in messages])  # fmt: skip
    finally:
        await producer.stop()
