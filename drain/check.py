"""``check_plan``: verify a plan's JSON against its problem from scratch, sharing no code with the planner.

It re-derives everything a consumer relies on: the deadline, K and the link at
every instant (a sweep over start/end events, intervals half-open so a VM may
start the instant another ends), each VM exactly once, and that each row's
duration and downtime are what the model gives at its start conditions, so
a plan cannot be valid merely by claiming short migrations.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np

from drain.problem import DrainProblem
from gpu_kernels.downtime import precopy_with

_TOL_S = 1e-6  # time tolerance, s (epoch seconds carry ~2e-7 s of float rounding)
_TOL_BW = 1e-6  # MB/s
_REQUIRED = ("host", "created", "t0", "deadline", "max_concurrent", "link_mbps", "slot_s", "vms", "unplaced",
             "total_downtime_ms", "worst_downtime_ms", "makespan_s", "solver", "baselines")  # fmt: skip
_ROW_NUMBERS = ("start", "end", "duration_s", "downtime_ms", "bw_mbps")


def check_plan(problem: DrainProblem, plan_json: dict[str, Any]) -> list[str]:
    """Every way ``plan_json`` breaks the problem's rules, as sentences; an empty list means valid."""
    out = [f"missing key {k!r}" for k in _REQUIRED if k not in plan_json]
    if plan_json.get("host", problem.host) != problem.host:
        out.append(f"plan is for host {plan_json.get('host')!r}, the problem for {problem.host!r}")
    rows = [r for r in plan_json.get("vms", []) if isinstance(r, dict)]
    known = {vm.vm: vm for vm in problem.vms}
    seen: Counter[str] = Counter()
    good: list[dict[str, Any]] = []
    for r in rows:
        name = r.get("vm")
        seen[name] += 1
        if name not in known:
            out.append(f"plan moves {name!r}, which is not on the host")
            continue
        bad = [k for k in _ROW_NUMBERS if not _finite(r.get(k))]
        if bad:
            out.append(f"{name}: {', '.join(bad)} missing or not a finite number")
            continue
        out += _row_violations(problem, r)
        good.append(r)
    for u in plan_json.get("unplaced", []):
        name = u.get("vm") if isinstance(u, dict) else None
        seen[name] += 1
        if name not in known:
            out.append(f"unplaced lists {name!r}, which is not on the host")
        elif not (isinstance(u.get("reason"), str) and u["reason"]):
            out.append(f"{name}: unplaced without a reason")
    out += [f"{name} appears {c} times (placed or unplaced)" for name, c in seen.items() if c > 1]
    out += [f"{name} is neither placed nor unplaced" for name in known if name not in seen]
    out += _concurrency_violations(problem, good)
    orders = [r.get("order") for r in sorted(good, key=lambda r: r["start"])]
    if sorted(o for o in orders if isinstance(o, int)) != list(range(len(good))) or any(
        a["start"] > b["start"] + _TOL_S for a, b in zip(good, good[1:])
    ):
        out.append("vms are not sorted by start with order 0, 1, 2, ...")
    total = plan_json.get("total_downtime_ms")
    if _finite(total) and abs(total - sum(r["downtime_ms"] for r in good)) > 1e-6 * max(1.0, abs(total)):
        out.append(f"total_downtime_ms {total} is not the sum of the rows' downtime")
    return out


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _row_violations(problem: DrainProblem, r: dict[str, Any]) -> list[str]:
    name, start, end, dur, bw = r["vm"], r["start"], r["end"], r["duration_s"], r["bw_mbps"]
    out = []
    if start < problem.t0 - _TOL_S:
        out.append(f"{name}: starts at {start}, before t0 {problem.t0}")
    if end > problem.deadline + _TOL_S:
        out.append(f"{name}: ends at {end}, {end - problem.deadline:.1f} s after the deadline {problem.deadline}")
    if abs(end - start - dur) > _TOL_S * 10:
        out.append(f"{name}: end - start = {end - start} s but duration_s = {dur}")
    if not 0 < bw <= problem.link_mbps + _TOL_BW:
        out.append(f"{name}: bw_mbps {bw} is not within (0, link {problem.link_mbps}]")
        return out
    return out + _model_violations(problem, r)


def _model_violations(problem: DrainProblem, r: dict[str, Any]) -> list[str]:
    """Duration at the start slot's rate, and factor x the worst pause over every slot it covers."""
    vm = next(v for v in problem.vms if v.vm == r["vm"])
    slot = problem.slot_s
    first = int(math.floor((r["start"] - problem.t0) / slot + 1e-6))
    last = max(first, int(math.ceil((r["end"] - problem.t0) / slot - 1e-6)) - 1)
    if first < 0 or last >= vm.dirty_mbps.size:
        return []  # outside the forecast: the start/deadline checks already speak for it
    dirty = vm.dirty_mbps[first : last + 1].astype(np.float64)
    pc = precopy_with(problem.params, np.float64(vm.mem_mb), dirty, np.float64(r["bw_mbps"]), np,
                      np.float64(vm.wss_mb))  # fmt: skip
    out = []
    want = float(pc.duration_s[0])
    if not abs(want - r["duration_s"]) <= 1e-6 * max(1.0, want):
        out.append(f"{vm.vm}: duration_s {r['duration_s']:.3f} but the model gives {want:.3f} s at its start")
    if not (np.all(pc.converged) and np.all(np.isfinite(pc.downtime_ms))):
        out.append(f"{vm.vm}: does not converge in every slot it covers ({first}..{last})")
        return out
    pause = vm.factor * float(np.max(pc.downtime_ms))
    if abs(pause - r["downtime_ms"]) > 1e-6 * max(1.0, pause):
        out.append(f"{vm.vm}: downtime_ms {r['downtime_ms']:.3f} but the model gives {pause:.3f} (worst over its slots)")
    return out


def _concurrency_violations(problem: DrainProblem, rows: list[dict[str, Any]]) -> list[str]:
    """Sweep the start/end events: running count <= K and shares <= link at every instant."""
    events = []
    for r in rows:
        if r["end"] - _TOL_S > r["start"]:
            events.append((r["start"], 1, r["bw_mbps"], r["vm"]))
            events.append((r["end"] - _TOL_S, 0, -r["bw_mbps"], r["vm"]))  # ends sort before starts at a tie
    events.sort(key=lambda e: (e[0], e[1]))
    out: list[str] = []
    running, bw = 0, 0.0
    for t, kind, d_bw, name in events:
        running += 1 if kind else -1
        bw += d_bw
        if kind and running > problem.max_concurrent:
            out.append(f"{running} migrations run at {t} (from {name} starting), above K = {problem.max_concurrent}")
        if kind and bw > problem.link_mbps + _TOL_BW:
            out.append(f"the shares sum to {bw:.3f} MB/s at {t} (from {name} starting), above the "
                       f"{problem.link_mbps:g} MB/s link")  # fmt: skip
    return out
