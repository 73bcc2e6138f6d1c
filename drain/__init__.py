"""Host drain planner: empty host H before deadline D with the least total downtime.

"Which VMs, in which order, starting when, at what share of the migration link?"

Model (``drain.model``). Time is a grid of ``slot_s`` slots from t0. A migration
of VM i started at slot s gets the share b = link / j of the host's link for
its whole duration, j in 1..K (a "level"). Its duration is the pre-copy
model's (``gpu_kernels.downtime.precopy_with``) at the start slot's predicted
upper-quantile dirty rate and bandwidth b; it occupies ceil(duration / slot_s)
slots; its downtime is the VM's learned factor times the worst predicted pause
over those slots, as the worker's scorer judges windows. An option (i, s, j) is
allowed when it converges in every covered slot and ends by the deadline.

Decision variables (``drain.solver``). One Boolean per kept option, the
presence literal of a fixed-size optional interval [s, s + slots).

Constraints. At most one option per VM. Bandwidth: AddCumulative with capacity
L = lcm(1..J) units and demand L / j per option, which is exactly "the shares
running in a slot sum to at most the link" in integers. Concurrency:
AddCumulative with demand 1 and capacity K. Both are repeated as one linear
row per slot (redundant; it is what lets the LP bound see contention).

Objective, lexicographic, as one weighted sum with weights that keep the levels
apart: (1) fewest unplaced VMs, (2) least total downtime in 0.01 ms units
(rounded down), (3) a tiny tie-break on the sum of end slots so equal plans go
earlier.

Heuristics (where optimality is given up, and why). Slot rounding: a migration
holds its last slot whole. Thinning (``drain.options``): above ~20k options
each (VM, level) keeps its best and earliest starts plus every m-th start.
Hints (``drain.grid_plans``): the baselines snapped to the grid and a greedy
packing seed CP-SAT; the greedy plan is also the last resort. The solver runs
under a time limit with 2 workers and a fixed seed.

Lower bound (``SolverReport.lower_bound_ms``). CP-SAT's objective bound,
converted back to milliseconds (and the per-VM minima bound, whichever is
higher): no plan on the grid, over the kept options, that places at least as
many VMs has less total downtime. Capped at the returned plan's own total.

Guarantee (``drain.planner``). The baselines (``drain.baselines``: all_now,
what count-limited tools do, and sequential) run in the same model in
continuous time; a baseline that is a valid drain and beats the solver's
schedule lexicographically is returned instead (``solver.strategy``).
``check_plan`` (``drain.check``) re-verifies any plan's JSON independently.
"""

from drain.baselines import BaselineResult, BaselineRow, all_now, sequential
from drain.check import check_plan
from drain.plan import DrainPlan, PlannedMigration, SolverReport, Unplaced
from drain.planner import plan_drain
from drain.problem import DrainProblem, DrainVM

__all__ = [
    "BaselineResult",
    "BaselineRow",
    "DrainPlan",
    "DrainProblem",
    "DrainVM",
    "PlannedMigration",
    "SolverReport",
    "Unplaced",
    "all_now",
    "check_plan",
    "plan_drain",
    "sequential",
]
