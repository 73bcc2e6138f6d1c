"""Plans on the grid without a solver: the baselines snapped to slots and a greedy packing.

They are the solver's hint (CP-SAT starts from a good complete schedule instead
of searching for a first one) and the planner's last resort when CP-SAT returns
nothing within its time limit. Heuristics, both: neither is claimed optimal.
A grid plan is a list of option indices (into ``Options``), at most one per VM.
"""

from __future__ import annotations

import math

import numpy as np

from drain.model import OptionGrid
from drain.options import Options
from drain.problem import DrainProblem


def snapped_list_schedule(problem: DrainProblem, grid: OptionGrid, lanes: int) -> list[tuple[int, int, int]]:
    """A baseline's policy on the grid: ``lanes`` equal shares, the next VM at the slot a lane frees.

    Returns ``(vm, start slot, level index)`` triples. A VM whose option there is
    not allowed is left out (the hint then leaves it unplaced) and takes no lane.
    Empty when link/lanes is not one of the grid's shares.
    """
    if lanes > len(grid.levels):
        return []
    j = lanes - 1  # levels are 1..J, so the share link/lanes sits at index lanes - 1
    n_slots = grid.allowed.shape[1]
    free = [0] * lanes
    out: list[tuple[int, int, int]] = []
    for i in range(len(problem.vms)):
        lane = min(range(lanes), key=lambda k: (free[k], k))
        s = free[lane]
        if s < n_slots and grid.allowed[i, s, j]:
            out.append((i, s, j))
            free[lane] = s + int(grid.slots[i, s, j])
    return out


def keep_mask(grid: OptionGrid, *plans: list[tuple[int, int, int]]) -> np.ndarray:
    """Bool ``(n, S, J)`` marking the options the given plans use (so thinning keeps them)."""
    mask = np.zeros(grid.allowed.shape, dtype=bool)
    for plan in plans:
        for i, s, j in plan:
            mask[i, s, j] = True
    return mask


def to_indices(options: Options, plan: list[tuple[int, int, int]]) -> list[int]:
    """Option indices of a triple plan (triples that are not options are dropped)."""
    index = {(int(i), int(s), int(j)): o for o, (i, s, j) in enumerate(zip(options.vm, options.start, options.level))}
    return [index[t] for t in plan if t in index]


def greedy(options: Options, levels: np.ndarray, max_concurrent: int, n_vms: int) -> list[int]:
    """Most constrained VM first (fewest options), each at its lowest-downtime option that still fits.

    "Fits": at most K running and the shares summing to at most the link in
    every slot it occupies (integer share units, like the solver).
    """
    if len(options) == 0:
        return []
    cap = math.lcm(*(int(v) for v in levels))
    horizon = int((options.start + options.slots).max()) + 1
    count = np.zeros(horizon, dtype=np.int64)
    units = np.zeros(horizon, dtype=np.int64)
    per_vm = [np.flatnonzero(options.vm == i) for i in range(n_vms)]
    chosen: list[int] = []
    for i in sorted(range(n_vms), key=lambda v: (per_vm[v].size, v)):
        idx = per_vm[i]
        if idx.size == 0:
            continue
        order = np.lexsort((options.start[idx], options.start[idx] + options.slots[idx], options.downtime_ms[idx]))
        for o in idx[order]:
            s, e = int(options.start[o]), int(options.start[o] + options.slots[o])
            need = cap // int(levels[options.level[o]])
            if count[s:e].max() < max_concurrent and units[s:e].max() + need <= cap:
                count[s:e] += 1
                units[s:e] += need
                chosen.append(int(o))
                break
    return chosen


def score(options: Options, chosen: list[int], n_vms: int) -> tuple[int, float]:
    """(unplaced VMs, total downtime ms): the planner's lexicographic objective."""
    return n_vms - len(chosen), float(options.downtime_ms[chosen].sum()) if chosen else 0.0
