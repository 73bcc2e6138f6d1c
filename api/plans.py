"""A host's scores and curves in Redis -> a drain plan (``drain.plan_drain``), stored back in Redis.

Shared by ``POST /v1/drain`` and ``zhuge drain``. The planner re-runs the
downtime model at the link share it gives each VM, so it needs what the worker
stored per VM in ``<prefix>curve:<vm>`` (``streams.curve``): memory, working set,
the learned correction factor and the upper-quantile dirty-rate forecast, which
is mapped from the worker's 5-minute slots onto the plan's finer grid by time.
VMs the host set lists without a curve are reported as unplaced, with why.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import numpy as np

from api.reads import ScoreReads
from app.settings import Settings
from drain.planner import plan_drain
from drain.problem import DrainProblem, DrainVM
from gpu_kernels.downtime import PrecopyParams
from streams.curve import Curve


class PlanRefused(ValueError):
    """The request cannot be planned (a deadline beyond the forecast, bad limits); the message says why."""


class UnknownHost(PlanRefused):
    """No scored VMs on that host."""


def dirty_on_grid(curve: Curve, t0: float, slot_s: int, n_slots: int) -> np.ndarray:
    """The curve's upper-quantile dirty rate for plan slots ``t0 + j * slot_s`` (j < n_slots).

    Each plan slot takes the worker slot its start falls into; a plan slot past
    the forecast raises ``PlanRefused`` (a plan is only as good as its forecast).
    """
    q90 = np.maximum(curve.per_slot("dirty_mbps", 0.9), curve.per_slot("dirty_mbps", 0.5))
    starts = t0 + slot_s * np.arange(n_slots, dtype=np.float64)
    idx = np.floor((starts - curve.t0) / curve.slot_s).astype(np.int64)
    if idx[-1] >= len(q90):
        horizon_end = curve.t0 + curve.slot_s * len(q90)
        raise PlanRefused(f"the deadline is {starts[-1] + slot_s - horizon_end:.0f} s past the end of the forecast "
                          f"({len(q90) * curve.slot_s / 3600:.0f} h ahead of the newest sample): bring it closer")  # fmt: skip
    return np.maximum(np.nan_to_num(q90[np.clip(idx, 0, None)], nan=0.0), 0.0)


def unusable(curves: dict[str, Curve]) -> dict[str, str]:
    """VMs whose curve cannot be planned on, with why (the rest of the host still gets its plan)."""
    out = {}
    for vm, curve in curves.items():
        if not (math.isfinite(curve.mem_mb) and curve.mem_mb > 0):
            out[vm] = "memory size unknown (no mem_used_mb or mem_total_mb in its samples)"
        elif not (math.isfinite(curve.factor) and curve.factor > 0):
            out[vm] = f"invalid learned downtime factor {curve.factor}"
    return out


def build_problem(
    host: str, curves: dict[str, Curve], settings: Settings, now: float, deadline_s: float, max_concurrent: int,
) -> DrainProblem:
    """The planner's input for ``host``'s VMs that have a curve."""
    slot_s = int(settings.drain_slot_s)
    n_slots = max(1, math.ceil(deadline_s / slot_s - 1e-9))
    vms = [
        DrainVM(vm, curve.mem_mb, curve.wss_mb, dirty_on_grid(curve, now, slot_s, n_slots), curve.factor)
        for vm, curve in sorted(curves.items())
    ]
    return DrainProblem(host, vms, now, slot_s, now + deadline_s, max_concurrent, float(settings.link_mbps),
                        PrecopyParams.from_settings(settings))  # fmt: skip


async def plan_host_drain(
    reads: ScoreReads, settings: Settings, host: str, deadline_s: float, max_concurrent: int,
    time_limit_s: float | None = None, store: bool = True, now: float | None = None,
) -> dict[str, Any]:
    """Plan the drain of ``host`` now; the plan's JSON, also written to ``<prefix>drain:<host>`` when ``store``.

    ``now``: the plan's t0 on the clock of the samples (default the wall clock; the
    QEMU lab passes its compressed lab clock, which its agent stamps samples with).
    """
    if not deadline_s > 0:
        raise PlanRefused(f"deadline_s must be > 0 seconds from now, got {deadline_s}")
    if max_concurrent < 1:
        raise PlanRefused(f"max_concurrent must be >= 1, got {max_concurrent}")
    rows, curves = await reads.host_curves(host)
    if not rows:
        raise UnknownHost(f"no scored VMs on host {host!r} ({reads.keys.host(host)} is empty or unknown)")
    skipped = unusable(curves)
    curves = {vm: c for vm, c in curves.items() if vm not in skipped}
    now = time.time() if now is None else float(now)
    problem = build_problem(host, curves, settings, now, deadline_s, max_concurrent)
    limit = settings.drain_time_limit_s if time_limit_s is None else time_limit_s
    plan = (await asyncio.to_thread(plan_drain, problem, limit)).to_json()
    plan["unplaced"] += [
        {"vm": r["vm"], "reason": skipped.get(r["vm"], "no curve in Redis: scored by a worker that does not store curves")}
        for r in rows if r["vm"] not in curves
    ]  # fmt: skip
    if store:
        await reads.store_plan(plan, int(settings.redis_ttl_s))
    return plan
