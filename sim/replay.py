"""Replay a real trace into ``vm.metrics``: rows in time order across VMs, paced.

Rows come from ``sim.traces.iter_trace`` (duplicates removed, zero capacities
omitted). They are sent in trace-time buckets of one step (300 s): with
``speed`` X, bucket b goes out at wall time ``start + b * 300 / X``; ``speed 0``
sends as fast as possible. Each bucket is checked against the input contract
before sending, so replay never feeds the DLQ (rows that would fail are dropped
and counted; none are expected).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sim.traces import DEFAULT_START_TS, STEP_S, iter_trace
from streams.schema import METRICS, decode_messages


@dataclass
class ReplayStats:
    vms: int = 0
    rows_read: int = 0
    rows_sent: int = 0
    messages: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    def rates(self) -> tuple[float, float]:
        dt = max(time.monotonic() - self.started, 1e-9)
        return self.messages / dt, self.rows_sent / dt


def load_rows(fmt: str, path: Path | str, vms: str | None, start_ts: float, stats: ReplayStats) -> pd.DataFrame:
    """All selected VMs' rows in one frame sorted by ``ts`` (stable: VM order breaks ties)."""
    frames = []
    for vm, df in iter_trace(fmt, path, vms, start_ts):
        stats.vms += 1
        stats.rows_read += int(df.attrs.get("rows_read", len(df)))
        if df.attrs.get("duplicates"):
            stats.dropped["duplicate timestamp"] = stats.dropped.get("duplicate timestamp", 0) + df.attrs["duplicates"]
        frames.append(df.assign(vm=vm))
    if not frames:
        raise ValueError("no VMs selected")
    rows = pd.concat(frames, ignore_index=True)
    return rows.sort_values("ts", kind="stable").reset_index(drop=True)


async def replay(
    settings: Any,
    fmt: str,
    path: Path | str,
    *,
    vms: str | None = None,
    start_ts: float = DEFAULT_START_TS,
    speed: float = 0.0,
    batched: bool = False,
    topic: str | None = None,
    on_progress: Callable[[ReplayStats], None] | None = None,
) -> ReplayStats:
    """Send every row of the selected VMs once, in time order; returns the counts."""
    from aiokafka import AIOKafkaProducer

    from app.topics import ensure_topics
    from sim.produce import Sender, encode_rows, producer_kwargs

    topic = topic or settings.topic_metrics
    stats = ReplayStats()
    rows = load_rows(fmt, path, vms, start_ts, stats)
    ts = rows["ts"].to_numpy(np.float64)
    bucket = np.floor((ts - ts[0]) / STEP_S).astype(np.int64)
    cuts = np.flatnonzero(np.diff(bucket)) + 1
    bounds = np.concatenate([[0], cuts, [len(rows)]])
    vm = rows["vm"].astype(str).tolist()
    host = rows["host"].astype(str).tolist() if "host" in rows else None
    cols = {m: rows[m].to_numpy(np.float64) for m in METRICS if m in rows}
    await ensure_topics(settings, [topic])
    producer = AIOKafkaProducer(**producer_kwargs(settings))
    await producer.start()
    wall0 = time.monotonic()
    stats.started = wall0
    sender = Sender(producer, topic)
    try:
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            if speed > 0:
                await asyncio.sleep(max(0.0, wall0 + bucket[lo] * STEP_S / speed - time.monotonic()))
            sl = slice(int(lo), int(hi))
            records = encode_rows(vm[sl], ts[sl], {k: v[sl] for k, v in cols.items()},
                                  None if host is None else host[sl], batched=batched)
            no_future_limit = time.time() + 1e12
            n_ok = len(decode_messages([v for _, v in records], now=no_future_limit))
            if n_ok != hi - lo:  # safety net: never expected from the readers' output
                checked = decode_messages([v for _, v in records], now=no_future_limit)
                bad = {r.raw for r in checked.rejected}
                records = [r for r in records if r[1] not in bad]
                n_ok = len(decode_messages([v for _, v in records], now=no_future_limit))
                stats.dropped["failed contract"] = stats.dropped.get("failed contract", 0) + int(hi - lo) - n_ok
            await sender.send(records)
            stats.messages += len(records)
            stats.rows_sent += n_ok
            if on_progress is not None:
                on_progress(stats)
        await sender.flush()
    finally:
        await producer.stop()
    return stats
