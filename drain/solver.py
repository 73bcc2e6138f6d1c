"""The CP-SAT model over the kept options: who goes when, at which share, and how far from optimal that may be.

One Boolean x_o per option o = (VM, start slot, share link/j), each the presence
literal of a fixed-size optional interval [start, start + slots). Constraints:
at most one option per VM; AddCumulative over the shares in exact integer units
(capacity lcm(levels), option demand lcm/j) so the shares never exceed the
link; AddCumulative with demand 1 and capacity K so at most K run in any slot.
The same two capacities are stated again as one linear row per slot: redundant,
but it is what lets the LP bound see contention.

The lexicographic objective (unplaced VMs, then total downtime, then how late
migrations end) is one weighted sum whose weights keep the levels strictly
apart; downtime enters in floor(0.01 ms) units, so the bound it gives is a valid
lower bound on the true milliseconds (rounding can cost at most 0.01 ms a VM).
The tie-break is never proven (the absolute gap limit stops the search once
the downtime is).

Presolve is kept light: the model is a large, flat 0-1 packing on which
CP-SAT's probing spends seconds and finds nothing, while the search from the
hint with the LP closes typical hosts within a second or two."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from ortools.sat.python import cp_model

from drain.options import Options

UNITS_PER_MS = (100, 10, 1)  # downtime in the objective: 0.01 ms units, coarser only if the weights would not fit
_MAX_OBJECTIVE = 2**52  # CP-SAT reports its bound as a double: keep the objective exact in one


@dataclass(frozen=True)
class SolveResult:
    """What CP-SAT returned, with what is needed to turn its bound into milliseconds."""

    status: str
    wall_s: float
    chosen: list[int] | None  # option indices of the best solution; None: no solution found
    bound: float | None  # CP-SAT's objective bound, constant term included
    w_unplaced: int
    w_downtime: int
    tie_max: int
    units_per_ms: int

    def downtime_lower_bound_ms(self, unplaced: int) -> float | None:
        """Least total downtime (ms) of any grid plan leaving at most ``unplaced`` VMs out.

        Objective = W_u*u + W_d*U + E with 0 <= E <= tie_max, so every solution
        with u <= unplaced has U >= (bound - W_u*unplaced - tie_max) / W_d.
        """
        if self.bound is None or not math.isfinite(self.bound):
            return None
        units = math.ceil((self.bound - self.w_unplaced * unplaced - self.tie_max) / self.w_downtime - 1e-9)
        return max(0, units) / self.units_per_ms


def downtime_units(downtime_ms: np.ndarray, units_per_ms: int) -> np.ndarray:
    """Integer objective units, rounded down so sums never exceed the true milliseconds."""
    return np.floor(np.asarray(downtime_ms, dtype=np.float64) * units_per_ms).astype(np.int64)


def solve(options: Options, n_vms: int, levels: np.ndarray, max_concurrent: int, hint: list[int],
          time_limit_s: float, seed: int = 0) -> SolveResult:  # fmt: skip
    """Build and solve the model (2 workers, fixed seed: reproducible and kind to a shared machine)."""
    m = len(options)
    ends = options.start + options.slots
    per_vm = [np.flatnonzero(options.vm == i) for i in range(n_vms)]
    tie_max = int(sum(int(ends[idx].max()) for idx in per_vm if idx.size))
    w_downtime = tie_max + 1
    for units_per_ms in UNITS_PER_MS:
        units = downtime_units(options.downtime_ms, units_per_ms)
        dt_max = int(sum(int(units[idx].max()) for idx in per_vm if idx.size))
        w_unplaced = w_downtime * dt_max + tie_max + 1
        if w_unplaced * (n_vms + 1) < _MAX_OBJECTIVE:
            break

    model = cp_model.CpModel()
    x = [model.new_bool_var(f"x{o}") for o in range(m)]
    intervals = [
        model.new_optional_fixed_size_interval_var(int(options.start[o]), int(options.slots[o]), x[o], f"iv{o}")
        for o in range(m)
    ]
    for idx in per_vm:
        if idx.size > 1:
            model.add_at_most_one(x[o] for o in idx)
    cap = math.lcm(*(int(v) for v in levels))
    demand = [cap // int(levels[j]) for j in options.level]
    if m:
        model.add_cumulative(intervals, demand, cap)
        model.add_cumulative(intervals, [1] * m, max_concurrent)
        _per_slot_rows(model, x, options, demand, cap, max_concurrent)
    coef = w_downtime * units + ends - w_unplaced  # the constant W_u * n is added back below
    model.minimize(cp_model.LinearExpr.weighted_sum(x, [int(c) for c in coef]) + w_unplaced * n_vms)
    hinted = set(hint)
    for o in range(m):
        model.add_hint(x[o], o in hinted)

    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = max(float(time_limit_s), 0.001)
    solver.parameters.num_workers = 2
    solver.parameters.random_seed = seed
    solver.parameters.cp_model_probing_level = 0
    solver.parameters.max_presolve_iterations = 1
    solver.parameters.symmetry_level = 0
    solver.parameters.absolute_gap_limit = float(tie_max)
    status = solver.solve(model)
    found = status in (cp_model.OPTIMAL, cp_model.FEASIBLE)
    chosen = [o for o in range(m) if solver.boolean_value(x[o])] if found else None
    bound = float(solver.best_objective_bound) if status != cp_model.MODEL_INVALID else None
    return SolveResult(solver.status_name(status), float(solver.wall_time), chosen, bound, w_unplaced, w_downtime,
                       tie_max, units_per_ms)  # fmt: skip


def _per_slot_rows(model: cp_model.CpModel, x: list[cp_model.IntVar], options: Options, demand: list[int], cap: int,
                   max_concurrent: int) -> None:  # fmt: skip
    """The cumulatives again as one linear row per slot (time-indexed), redundant but LP-visible.

    CP-SAT's LP does not see how few options fit a busy quiet slot through the
    cumulatives alone, and its bound then stalls at the per-VM minima; these
    rows give it the per-slot capacity, which closes typical contention cases.
    """
    cover: dict[int, list[int]] = {}
    for o, (s, e) in enumerate(zip(options.start.tolist(), (options.start + options.slots).tolist())):
        for t in range(s, e):
            cover.setdefault(t, []).append(o)
    for idx in cover.values():
        if sum(demand[o] for o in idx) > cap:
            model.add(cp_model.LinearExpr.weighted_sum([x[o] for o in idx], [demand[o] for o in idx]) <= cap)
        if len(idx) > max_concurrent:
            model.add(cp_model.LinearExpr.sum([x[o] for o in idx]) <= max_concurrent)
