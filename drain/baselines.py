"""What drains look like without a planner, in the same model and continuous time from t0.

- ``all_now``: what count-limited tools do (Nova's max_concurrent_live_migrations,
  KubeVirt's parallel migrations per node): the VMs in the given order, K at
  once from now, each at link/K (link/n when there are fewer than K VMs); when
  one ends, the next starts at that instant.
- ``sequential``: one at a time from now at the full link, back to back.

Neither looks at the forecast, which is the point: they are what the plan must
beat. Both respect K and the link by construction, so one that converges
everywhere and ends by the deadline is a valid plan (the planner's fallback).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from drain.model import migrate_at
from drain.problem import DrainProblem


@dataclass(frozen=True)
class BaselineRow:
    """One VM's migration in a baseline (times epoch s)."""

    vm: str
    order: int
    start: float
    end: float
    duration_s: float
    downtime_ms: float  # +inf aborted / NaN unknown when not converged
    bw_mbps: float
    converged: bool
    late: bool  # ends after the deadline


@dataclass(frozen=True)
class BaselineResult:
    """A baseline's schedule and its summary; ``total``/``worst`` count converging VMs only."""

    name: str
    rows: tuple[BaselineRow, ...]
    total_downtime_ms: float
    worst_downtime_ms: float
    makespan_s: float
    not_converged: int
    late: int

    @property
    def feasible(self) -> bool:
        """A valid drain: everything converges and ends by the deadline (K and link hold by construction)."""
        return self.not_converged == 0 and self.late == 0

    def summary(self) -> dict[str, Any]:
        """The JSON summary (the keys other tools read)."""
        return {
            "total_downtime_ms": float(self.total_downtime_ms),
            "worst_downtime_ms": float(self.worst_downtime_ms),
            "makespan_s": float(self.makespan_s),
            "not_converged": int(self.not_converged),
            "late": int(self.late),
        }


def all_now(problem: DrainProblem) -> BaselineResult:
    """K at once from now at link/K each (link/n with fewer VMs), next VM when a lane frees."""
    lanes = max(1, min(problem.max_concurrent, len(problem.vms)))
    return _list_schedule(problem, "all_now", lanes)


def sequential(problem: DrainProblem) -> BaselineResult:
    """One at a time from now at the full link, back to back."""
    return _list_schedule(problem, "sequential", 1)


def _list_schedule(problem: DrainProblem, name: str, lanes: int) -> BaselineResult:
    """List scheduling on ``lanes`` equal shares of the link, VMs in the given order."""
    bw = problem.link_mbps / lanes
    free = [0.0] * lanes  # seconds after t0 each lane frees up
    deadline_off = problem.deadline - problem.t0
    rows: list[BaselineRow] = []
    for order, vm in enumerate(problem.vms):
        lane = min(range(lanes), key=lambda k: (free[k], k))
        m = migrate_at(problem, vm, free[lane], bw)
        free[lane] = m.end_off
        rows.append(BaselineRow(vm.vm, order, problem.t0 + m.start_off, problem.t0 + m.end_off, m.duration_s,
                                m.downtime_ms, bw, m.converged, m.end_off > deadline_off + 1e-6))  # fmt: skip
    ok = [r.downtime_ms for r in rows if r.converged and math.isfinite(r.downtime_ms)]
    return BaselineResult(
        name=name,
        rows=tuple(rows),
        total_downtime_ms=float(sum(ok)),
        worst_downtime_ms=float(max(ok, default=0.0)),
        makespan_s=max((r.end - problem.t0 for r in rows), default=0.0),
        not_converged=sum(not r.converged for r in rows),
        late=sum(r.late for r in rows),
    )
