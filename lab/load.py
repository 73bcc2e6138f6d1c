"""Load programs for lab guests, and the driver that plays them over the workload line.

A program maps lab time (``lab.state.LabClock``) to the workload's dirty rate
and CPU share:

- ``{"kind": "constant", "rate": 20, "cpu": 10}``;
- ``{"kind": "square", "busy_rate": 40, "quiet_rate": 2, "period_s": 86400, "busy_from_s": 28800,
  "busy_to_s": 72000}``: busy from 08:00 to 20:00 of each (lab) day, quiet otherwise;
- ``{"kind": "trace", "format": "bitbrains", "path": ".../bitbrains-rnd-2013-08", "vm": "7",
  "max_rate": 60}``: a real VM's CPU curve, its utilisation mapped linearly to a dirty
  rate of up to ``max_rate`` MiB/s (CPU share follows it too), its first sample
  aligned to the lab clock's origin and repeated when it ends.

The driver (``drive``) re-reads the lab state every tick, so it follows guests that
migrate (a new QEMU, a new control socket), and sends a guest a new ``set`` only when
its target changed.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from lab import workload
from lab.state import LabState, load

log = logging.getLogger(__name__)

Program = Callable[[float], tuple[float, float]]  # lab time -> (dirty MiB/s, cpu %)


def program(spec: dict[str, Any], origin: float) -> Program:
    """The load function a program description stands for."""
    kind = spec.get("kind", "constant")
    if kind == "constant":
        rate, cpu = float(spec.get("rate", 0.0)), float(spec.get("cpu", 0.0))
        return lambda t: (rate, cpu)
    if kind == "square":
        busy, quiet = float(spec["busy_rate"]), float(spec["quiet_rate"])
        period = float(spec.get("period_s", 86400.0))
        lo, hi = float(spec.get("busy_from_s", 8 * 3600)), float(spec.get("busy_to_s", 20 * 3600))
        cpu_busy, cpu_quiet = float(spec.get("busy_cpu", 50.0)), float(spec.get("quiet_cpu", 2.0))

        def square(t: float) -> tuple[float, float]:
            phase = math.fmod(t, period)
            return (busy, cpu_busy) if lo <= phase < hi else (quiet, cpu_quiet)

        return square
    if kind == "trace":
        return _trace_program(spec, origin)
    raise ValueError(f"unknown load program kind {kind!r} (constant, square, trace)")


def _trace_program(spec: dict[str, Any], origin: float) -> Program:
    from sim.traces import iter_trace

    found = list(iter_trace(spec.get("format", "bitbrains"), Path(spec["path"]), str(spec["vm"])))
    if not found:
        raise ValueError(f"no VM {spec['vm']!r} in {spec['path']}")
    _, df = found[0]
    ts = df["ts"].to_numpy(dtype=np.float64)
    cpu = np.nan_to_num(df["cpu_pct"].to_numpy(dtype=np.float64), nan=0.0)
    span = float(ts[-1] - ts[0]) or 300.0
    max_rate = float(spec.get("max_rate", 60.0))

    def replay(t: float) -> tuple[float, float]:
        at = ts[0] + math.fmod(max(0.0, t - origin), span)
        c = float(np.interp(at, ts, cpu))
        return max_rate * c / 100.0, c

    return replay


def targets(state: LabState, now: float) -> dict[str, tuple[float, float]]:
    """Each driven guest's (dirty rate, cpu) at lab time ``now``."""
    out = {}
    for name, guest in state.guests.items():
        if guest.load:
            out[name] = program(guest.load, state.clock.origin)(now)
    return out


async def drive(folder: Path, *, tick_s: float = 1.0, until: Callable[[], bool] = lambda: False) -> None:
    """Play every guest's program until ``until()`` (or forever); a guest mid-migration is retried next tick."""
    sent: dict[tuple[str, str], tuple[float, float]] = {}
    while not until():
        started = time.monotonic()
        state = load(folder)
        if state is not None:
            for name, (rate, cpu) in targets(state, state.clock.now()).items():
                process = state.guests[name].process
                key = (name, process.folder)
                want = (round(rate, 3), round(cpu, 1))
                if sent.get(key) == want:
                    continue
                try:
                    await workload.send(process.ctl_path, rate=want[0], cpu=want[1])
                    sent[key] = want
                except (OSError, ConnectionError, asyncio.TimeoutError) as exc:  # migrating, or not booted yet
                    log.debug("load of %s not set this tick: %s", name, exc)
        await asyncio.sleep(max(0.0, tick_s - (time.monotonic() - started)))
