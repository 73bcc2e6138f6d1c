"""The downtime model applied to drain migrations: on the plan grid (all options at once) and at any instant.

Both follow the worker's scorer (``streams.scorer``): a migration's duration is
the model's at the conditions it starts in (the start slot's dirty rate, its
bandwidth share), and its downtime is the learned factor times the WORST
predicted pause over the slots it covers, because the pause lands wherever the
pre-copy ends and the forecast cannot say exactly where. A migration that does
not converge in any covered slot is not a migration the plan may count on
(+inf downtime), whatever the abort/force policy makes of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from drain.problem import DrainProblem, DrainVM
from gpu_kernels.downtime import precopy_with
from gpu_kernels.window import window_max

_EPS = 1e-9  # slot-boundary tolerance, in slots


@dataclass(frozen=True)
class OptionGrid:
    """Every (VM i, start slot s, level j) option, shape ``(n, S, J)``; bandwidth ``link / levels[j]``."""

    levels: np.ndarray  # (J,) share divisors
    bw_mbps: np.ndarray  # (J,)
    duration_s: np.ndarray  # the model's duration at the start conditions
    slots: np.ndarray  # int64: slots it occupies on the grid, ceil(duration / slot_s) >= 1
    downtime_ms: np.ndarray  # factor x worst pause over the covered slots; +inf where not converged / NaN
    allowed: np.ndarray  # bool: converges in every covered slot and ends by the deadline


def option_grid(problem: DrainProblem) -> OptionGrid:
    """Evaluate the model once for all VMs x start slots x bandwidth shares (vectorised)."""
    n, n_slots = len(problem.vms), problem.n_slots
    levels = problem.levels
    bw = problem.link_mbps / levels.astype(np.float64)
    j = len(levels)
    if n == 0:
        empty = np.zeros((0, n_slots, j))
        return OptionGrid(levels, bw, empty, empty.astype(np.int64), empty, empty.astype(bool))
    mem = np.array([v.mem_mb for v in problem.vms]).reshape(n, 1, 1)
    wss = np.array([v.wss_mb for v in problem.vms]).reshape(n, 1, 1)
    dirty = np.stack([v.dirty_mbps[:n_slots] for v in problem.vms]).reshape(n, n_slots, 1)
    factor = np.array([v.factor for v in problem.vms]).reshape(n, 1, 1)
    pc = precopy_with(problem.params, mem, dirty, bw.reshape(1, 1, j), np, wss)
    duration = np.asarray(pc.duration_s, dtype=np.float64)
    per_slot = np.where(np.asarray(pc.converged) & np.isfinite(pc.downtime_ms), pc.downtime_ms, np.inf)
    slots = np.ceil(np.nan_to_num(duration, nan=problem.slot_s) / problem.slot_s - _EPS)
    slots = np.maximum(slots, 1).astype(np.int64)
    # worst over covered slots: window_max runs along the last axis, so (n, J, S) rows
    rows = np.broadcast_to(per_slot, (n, n_slots, j)).transpose(0, 2, 1).reshape(n * j, n_slots)
    spans = slots.transpose(0, 2, 1).reshape(n * j, n_slots)
    worst = window_max(rows, spans, np).reshape(n, j, n_slots).transpose(0, 2, 1)
    start_off = (np.arange(n_slots) * problem.slot_s).reshape(1, n_slots, 1)
    in_time = start_off + duration <= problem.deadline - problem.t0 + 1e-6
    allowed = np.isfinite(worst) & np.isfinite(duration) & in_time
    return OptionGrid(levels, bw, duration, slots, factor * worst, allowed)


@dataclass(frozen=True)
class Migration:
    """One migration at a continuous start (seconds after t0), as the baselines run them."""

    start_off: float
    duration_s: float
    downtime_ms: float  # factor x worst pause over covered slots (+inf aborted, NaN unknown)
    converged: bool  # in every covered slot

    @property
    def end_off(self) -> float:
        return self.start_off + self.duration_s


def covered_slots(start_off: float, end_off: float, slot_s: int) -> tuple[int, int]:
    """First and last slot index a migration running over [start, end) touches."""
    first = int(math.floor(start_off / slot_s + _EPS))
    last = max(first, int(math.ceil(end_off / slot_s - _EPS)) - 1)
    return first, last


def dirty_at(vm: DrainVM, first: int, last: int) -> np.ndarray:
    """The VM's dirty rates for slots first..last; past its forecast the last value is held.

    Only baselines that run late (past the deadline, so past what the problem
    requires the forecast to cover) ever read there.
    """
    idx = np.clip(np.arange(first, last + 1), 0, vm.dirty_mbps.size - 1)
    return vm.dirty_mbps[idx]


def migrate_at(problem: DrainProblem, vm: DrainVM, start_off: float, bw_mbps: float) -> Migration:
    """The model for one migration started ``start_off`` s after t0 at ``bw_mbps``."""
    params = problem.params
    first, _ = covered_slots(start_off, start_off, problem.slot_s)
    head = precopy_with(params, np.float64(vm.mem_mb), dirty_at(vm, first, first), np.float64(bw_mbps), np,
                        np.float64(vm.wss_mb))  # fmt: skip
    duration = float(head.duration_s[0])
    if not math.isfinite(duration):
        return Migration(start_off, float(problem.slot_s), math.nan, False)  # unknown rate: one slot, like the scorer
    _, last = covered_slots(start_off, start_off + duration, problem.slot_s)
    pc = precopy_with(params, np.float64(vm.mem_mb), dirty_at(vm, first, last), np.float64(bw_mbps), np,
                      np.float64(vm.wss_mb))  # fmt: skip
    downtime = np.asarray(pc.downtime_ms, dtype=np.float64)
    converged = bool(np.all(pc.converged)) and bool(np.all(np.isfinite(downtime)))
    worst = math.nan if np.isnan(downtime).any() else float(downtime.max())
    return Migration(start_off, duration, vm.factor * worst, converged)
