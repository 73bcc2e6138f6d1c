"""``plan_drain``: evaluate the options, run the baselines, solve, and return the best valid schedule.

The formulation is described in the package docstring (``drain/__init__.py``).
What this module adds is the guarantee: the plan returned is never worse,
lexicographically (unplaced VMs, then total downtime), than a baseline that is
itself a valid drain, nor than the greedy grid plan, whatever the solver's time
limit or the grid's rounding cost it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from drain.baselines import BaselineResult, all_now, sequential
from drain.check import check_plan
from drain.grid_plans import greedy, keep_mask, score, snapped_list_schedule, to_indices
from drain.model import OptionGrid, option_grid
from drain.options import Options, select_options
from drain.plan import DrainPlan, PlannedMigration, SolverReport, Unplaced
from drain.problem import DrainProblem
from drain.reasons import no_option_reason, no_room_reason
from drain.solver import SolveResult, solve

__all__ = ["check_plan", "plan_drain"]


@dataclass(frozen=True)
class _Row:
    vm: int  # index into problem.vms
    start: float  # epoch s
    end: float
    duration_s: float
    downtime_ms: float
    bw_mbps: float


@dataclass(frozen=True)
class _Candidate:
    strategy: str
    rows: list[_Row]

    def key(self, n_vms: int) -> tuple[int, float]:
        return n_vms - len(self.rows), float(sum(r.downtime_ms for r in self.rows))


def plan_drain(problem: DrainProblem, time_limit_s: float = 10.0, *, max_options: int = 20_000,
               seed: int = 0) -> DrainPlan:  # fmt: skip
    """Plan the drain of ``problem.host``: CP-SAT within ``time_limit_s`` s, never worse than a valid baseline.

    ``max_options``: the option budget above which start slots are thinned
    (``drain.options``); ``seed``: CP-SAT's random seed (fixed: same input, same plan).
    """
    if not time_limit_s > 0:
        raise ValueError(f"time_limit_s must be > 0, got {time_limit_s!r}")
    if max_options < 1:
        raise ValueError(f"max_options must be >= 1, got {max_options!r}")
    created = time.time()
    n, k = len(problem.vms), problem.max_concurrent
    grid = option_grid(problem)
    baselines = {"all_now": all_now(problem), "sequential": sequential(problem)}
    snapped = [snapped_list_schedule(problem, grid, max(1, min(k, n))), snapped_list_schedule(problem, grid, 1)]
    options = select_options(grid, max_options, keep_mask(grid, *snapped))
    greedy_plan = greedy(options, grid.levels, k, n)
    hint = min([greedy_plan, *(to_indices(options, p) for p in snapped)], key=lambda c: score(options, c, n))
    result = solve(options, n, grid.levels, k, hint, time_limit_s, seed)

    candidates = []
    if result.chosen is not None:
        candidates.append(_Candidate("cp-sat", _grid_rows(problem, grid, options, result.chosen)))
    candidates += [_Candidate(name, _baseline_rows(problem, b)) for name, b in baselines.items() if b.feasible]
    if result.chosen is None:  # nothing from CP-SAT in time: the greedy grid plan is the last resort
        candidates.append(_Candidate("greedy", _grid_rows(problem, grid, options, greedy_plan)))
    best = candidates[0]
    for c in candidates[1:]:  # strictly better only: ties keep the earlier (the solver's) schedule
        (u, total), (bu, btotal) = c.key(n), best.key(n)
        if u < bu or (u == bu and total < btotal - 1e-9):
            best = c

    rows = sorted(best.rows, key=lambda r: (r.start, r.end, problem.vms[r.vm].vm))
    vms = tuple(PlannedMigration(problem.vms[r.vm].vm, order, r.start, r.end, r.duration_s, r.downtime_ms, r.bw_mbps)
                for order, r in enumerate(rows))  # fmt: skip
    placed = {r.vm for r in rows}
    has_option = grid.allowed.any(axis=(1, 2))
    unplaced = tuple(
        Unplaced(vm.vm, no_room_reason(problem, result.status, best.strategy, time_limit_s, options.stride)
                 if has_option[i] else no_option_reason(problem, grid, i))  # fmt: skip
        for i, vm in enumerate(problem.vms)
        if i not in placed
    )
    u, total = best.key(n)
    report = SolverReport(best.strategy, result.status, result.wall_s, _lower_bound(result, options, n, u, total),
                          len(options), options.allowed_total, options.stride)  # fmt: skip
    return DrainPlan(problem.host, created, problem.t0, problem.deadline, k, problem.link_mbps, problem.slot_s,
                     vms, unplaced, report, baselines)  # fmt: skip


def _grid_rows(problem: DrainProblem, grid: OptionGrid, options: Options, chosen: list[int]) -> list[_Row]:
    rows = []
    for o in chosen:
        i, s, j = int(options.vm[o]), int(options.start[o]), int(options.level[o])
        start, duration = problem.t0 + s * problem.slot_s, float(grid.duration_s[i, s, j])
        rows.append(_Row(i, start, start + duration, duration, float(grid.downtime_ms[i, s, j]), float(grid.bw_mbps[j])))
    return rows


def _baseline_rows(problem: DrainProblem, b: BaselineResult) -> list[_Row]:
    index = {vm.vm: i for i, vm in enumerate(problem.vms)}
    return [_Row(index[r.vm], r.start, r.end, r.duration_s, r.downtime_ms, r.bw_mbps) for r in b.rows]


def _lower_bound(result: SolveResult, options: Options, n: int, unplaced: int, total: float) -> float | None:
    """The best of CP-SAT's bound and the per-VM minima bound, capped at the plan's own total.

    Per-VM minima: any plan placing at least n - unplaced VMs pays at least the
    sum of the n - unplaced smallest per-VM least downtimes.
    """
    cp = result.downtime_lower_bound_ms(unplaced)
    minima = np.full(n, np.inf)
    np.minimum.at(minima, options.vm, options.downtime_ms)
    need = n - unplaced
    smallest = np.sort(minima)[:need]
    simple = float(smallest.sum()) if need and np.isfinite(smallest).all() else 0.0
    lb = simple if cp is None else max(cp, simple)
    return min(lb, total)
