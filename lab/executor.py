"""``zhuge lab migrate``: when to migrate, what zhuge predicted then, and the outcome to ``vm.migrations``.

``--at now`` migrates at once; ``--at recommended`` waits for the start of the
window zhuge publishes for the VM (``best_start`` of ``<prefix>vm:<vm>``, on the
lab clock); an ISO time waits for that lab-clock time. Right before the migration
starts, the VM's score in Redis is read: the prediction in force then for a
migration started at that moment (the correction it includes, its time and model)
goes into the ``vm.migrations`` record with the outcome, so the learned
correction compares like with like.

Which slot of the score that is: ``now_downtime_ms`` and ``now_total_s`` are
for the slot after the score's newest sample. A worker behind its agent (a busy
host; the lab's 300x clock turns one second into a slot) can hold a score whose
"now" is slots before the start: a migration started at the recommended quiet
window was recorded against the busy-phase "now" it was told to avoid (4953 ms
for a 325 ms pause). So a start past the score's first slot reads the score's
curve (``<prefix>curve:<vm>``) at the slot it falls in, the value the window
search itself compared; that slot has no predicted total (the score carries a
duration for its first slot only). The slot is then right; the forecast for it
can still be wrong (at a busy-to-quiet edge short horizons follow the last busy
samples), and the learned correction sees that error, as it would in a fleet.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from app.settings import Settings
from streams.curve import Curve, decode_curve
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


async def read_score(settings: Settings, vm: str) -> tuple[dict[str, Any] | None, Curve | None]:
    """The VM's score hash (numbers as floats) and its curve, read in one round trip.

    (None, None) when unknown or Redis is away; a curve that is missing or does not decode is None.
    """
    from streams.sinks.redis_sink import read_vm_with_curve

    client = settings.redis_client()
    try:
        score, blob = await read_vm_with_curve(client, settings.redis_prefix, vm)
    except Exception:  # noqa: BLE001 - no score is a valid answer: the migration still runs
        return None, None
    finally:
        await client.aclose()
    try:
        curve = decode_curve(blob) if blob else None
    except ValueError:
        curve = None
    return score, curve


def _finite(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float, np.floating)) and math.isfinite(x) else None


def prediction_of(score: dict[str, Any] | None, curve: Curve | None = None,
                  start: float | None = None) -> dict[str, Any] | None:  # fmt: skip
    """The ``vm.migrations`` prediction fields from a score for a migration started at ``start`` (lab clock).

    ``start`` None, no curve, or a start within the score's first slot: the
    score's ``now_*`` fields. A later start: the curve's downtime for the slot
    it falls in, no total; a start past the curve: no prediction at all.
    """
    if not score:
        return None
    downtime, total = score.get("now_downtime_ms"), _finite(score.get("now_total_s"))
    if curve is not None and start is not None and start >= curve.t0 + curve.slot_s:
        slot = int((start - curve.t0) // curve.slot_s)
        if slot >= len(curve.downtime_ms):
            return None
        downtime, total = _finite(curve.downtime_ms[slot]), None
    return {
        "predicted_downtime_ms": downtime,
        "predicted_total_ms": None if total is None else total * 1000,
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


def _utc(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S") if math.isfinite(t) else "?"


async def _sleep_until(folder: Any, when: float, state: LabState) -> LabState:
    """Sleep until the lab clock reads ``when``, re-reading the clock after each sleep.

    Why a loop: at the lab's 300x a sleep that wakes 40 ms early (or a clock re-based
    meanwhile) starts 12 lab seconds early, in the slot before the window: a run here
    started its recommended migration at 16:09:49 for a window at 16:10.
    """
    while (wait := state.clock.wall_of(when) - state.clock.wall_of(state.clock.now())) > 0:
        await asyncio.sleep(wait + 0.001)
        state = load(folder) or state
    return state


async def execute(settings: Settings, req: MigrationRequest, echo: Echo = print) -> tuple[MigrationOutcome, dict[str, Any]]:
    """Wait for the requested time, migrate, publish; returns the outcome and its ``vm.migrations`` record."""
    folder = lab_dir(settings.state_dir, req.lab)
    state = load(folder)
    if state is None or req.vm not in state.guests:
        raise ValueError(f"no guest {req.vm!r} in lab {req.lab!r}")
    score = (await read_score(settings, req.vm))[0] if req.at == "recommended" else None
    when = start_time(state, req.at, score)
    if score is not None:
        echo(f"{req.vm}: recommended window {_utc(float(score['best_start']))} UTC, {score.get('best_downtime_ms', float('nan')):.0f} ms "
             f"(score of the sample at {_utc(float(score.get('last_ts', float('nan'))))}, lab clock)")  # fmt: skip
    wait = state.clock.wall_of(when) - state.clock.wall_of(state.clock.now())
    if wait > 0:
        echo(f"{req.vm}: waiting {wait:.0f} s for {_utc(when)} UTC (lab clock)")
    state = await _sleep_until(folder, when, state)
    start = state.clock.now()
    prediction = prediction_of(*await read_score(settings, req.vm), start=start)
    pred = (prediction or {}).get("predicted_downtime_ms")
    echo(f"{req.vm}: starting at {_utc(start)} UTC (lab clock), predicted downtime "
         + (f"{pred:.0f} ms" if isinstance(pred, float) else "unknown"))
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
