"""The planner's answer and its JSON form (the keys other tools read; no NaN or inf ever reaches them)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from drain.baselines import BaselineResult

STRATEGIES = ("cp-sat", "all_now", "sequential", "greedy")


def json_float(x: float | None) -> float | None:
    """A float JSON can carry: NaN and +-inf become null."""
    return float(x) if x is not None and math.isfinite(x) else None


@dataclass(frozen=True)
class PlannedMigration:
    """One VM's migration in the plan (times epoch s)."""

    vm: str
    order: int  # 0-based, by start
    start: float
    end: float
    duration_s: float
    downtime_ms: float
    bw_mbps: float

    def to_json(self) -> dict[str, Any]:
        return {"vm": self.vm, "order": int(self.order), "start": json_float(self.start), "end": json_float(self.end),
                "duration_s": json_float(self.duration_s), "downtime_ms": json_float(self.downtime_ms),
                "bw_mbps": json_float(self.bw_mbps)}  # fmt: skip


@dataclass(frozen=True)
class Unplaced:
    """A VM the plan cannot move before the deadline, and why."""

    vm: str
    reason: str


@dataclass(frozen=True)
class SolverReport:
    """Where the plan came from and how good it is known to be.

    ``strategy``: which schedule was returned (``cp-sat``; a baseline when a
    feasible one beat the solver's solution; ``greedy`` when CP-SAT found
    nothing in time and no baseline was feasible). ``lower_bound_ms``: no plan
    on the grid over the kept options that places at least as many VMs has less
    total downtime (capped at this plan's own total, which a continuous-time
    baseline may bring below the grid's bound); None when CP-SAT gave no bound.
    ``wall_s``: CP-SAT's wall time.
    """

    strategy: str
    status: str
    wall_s: float
    lower_bound_ms: float | None
    options: int
    allowed_options: int = 0  # before thinning
    stride: int = 1  # start-slot stride of the thinning (1: none)

    def to_json(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "status": self.status, "wall_s": float(self.wall_s),
                "lower_bound_ms": json_float(self.lower_bound_ms), "options": int(self.options)}  # fmt: skip


@dataclass(frozen=True)
class DrainPlan:
    """Which VMs, in which order, starting when, at what share of the link."""

    host: str
    created: float
    t0: float
    deadline: float
    max_concurrent: int
    link_mbps: float
    slot_s: int
    vms: tuple[PlannedMigration, ...]
    unplaced: tuple[Unplaced, ...]
    solver: SolverReport
    baselines: dict[str, BaselineResult] = field(default_factory=dict)

    @property
    def total_downtime_ms(self) -> float:
        return float(sum(m.downtime_ms for m in self.vms))

    @property
    def worst_downtime_ms(self) -> float:
        return float(max((m.downtime_ms for m in self.vms), default=0.0))

    @property
    def makespan_s(self) -> float:
        """Last end - t0 (0 when nothing moves)."""
        return float(max((m.end - self.t0 for m in self.vms), default=0.0))

    def to_json(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "created": float(self.created),
            "t0": float(self.t0),
            "deadline": float(self.deadline),
            "max_concurrent": int(self.max_concurrent),
            "link_mbps": float(self.link_mbps),
            "slot_s": int(self.slot_s),
            "vms": [m.to_json() for m in self.vms],
            "unplaced": [{"vm": u.vm, "reason": u.reason} for u in self.unplaced],
            "total_downtime_ms": json_float(self.total_downtime_ms),
            "worst_downtime_ms": json_float(self.worst_downtime_ms),
            "makespan_s": json_float(self.makespan_s),
            "solver": self.solver.to_json(),
            "baselines": {name: {k: json_float(v) if isinstance(v, float) else v for k, v in b.summary().items()}
                          for name, b in self.baselines.items()},  # fmt: skip
        }
