"""Why a VM is not in the plan, in words an operator can act on (raise the deadline, quiet the guest, add link)."""

from __future__ import annotations

import math

import numpy as np

from drain.model import OptionGrid
from drain.problem import DrainProblem
from gpu_kernels.downtime import max_converging_dirty
from gpu_kernels.qemu_precopy import max_converging_dirty as qemu_max_converging_dirty


def no_option_reason(problem: DrainProblem, grid: OptionGrid, i: int) -> str:
    """A VM without a single allowed option: it never converges, or never in time (judged at the full link)."""
    vm = problem.vms[i]
    link = problem.link_mbps
    dirty = vm.dirty_mbps[: problem.n_slots]
    remain = problem.deadline - problem.t0
    if np.isnan(dirty).all():
        return f"no dirty-rate forecast (all NaN) for the {problem.n_slots} slots before the deadline"
    converges = np.isfinite(grid.downtime_ms[i, :, 0])  # full link: the best a share can do
    if not converges.any():
        reason = (f"does not converge before the deadline at any share of the {link:g} MB/s link "
                  f"(lowest predicted dirty rate {np.nanmin(dirty):.0f} MB/s")  # fmt: skip
        ceiling = _max_converging_dirty(problem, i)
        if ceiling is not None:
            reason += f"; it would need below about {ceiling:.0f} MB/s"
        params = problem.params
        first_pass_s = vm.mem_mb / (link * params.efficiency)
        if params.model == "qemu" and first_pass_s >= params.timeout_s:
            reason += (f"; copying its {vm.mem_mb:.0f} MB once takes {first_pass_s:.0f} s at the full link, over "
                       f"the {params.timeout_s:.0f} s migration timeout")  # fmt: skip
        return reason + ")"
    starts = np.flatnonzero(converges)
    offsets = starts * problem.slot_s
    over = offsets + grid.duration_s[i, starts, 0] - remain
    best = int(starts[np.argmin(over)])
    need, left = float(grid.duration_s[i, best, 0]), remain - best * problem.slot_s
    where = "" if best == 0 else f" (started at t0+{best * problem.slot_s} s, the start that comes closest)"
    return f"needs {need:.0f} s at the full link but only {left:.0f} s remain before the deadline{where}"


def no_room_reason(problem: DrainProblem, status: str, strategy: str, time_limit_s: float, stride: int) -> str:
    """A VM that has options but was left out: capacity (proven) or the solver's time limit."""
    k, link = problem.max_concurrent, problem.link_mbps
    if strategy == "cp-sat" and status == "OPTIMAL":
        among = "" if stride == 1 else f" among the start slots kept (every {stride}th plus each VM's best)"
        return (f"no room before the deadline{among}: with at most {k} migrations at once sharing the {link:g} MB/s "
                "link, every schedule that moves it leaves another VM out")  # fmt: skip
    return (f"no room found for it within the {time_limit_s:g} s time limit (solver status {status}, "
            f"plan from {strategy}); a longer time limit may place it")  # fmt: skip


def _max_converging_dirty(problem: DrainProblem, i: int) -> float | None:
    """The highest dirty rate that converges at the full link (the model's closed form), when finite."""
    vm, params = problem.vms[i], problem.params
    with np.errstate(all="ignore"):
        if params.model == "qemu":
            d = qemu_max_converging_dirty(np.float64(vm.mem_mb), np.float64(problem.link_mbps), np.float64(vm.wss_mb),
                                          params.qemu_link(), np)  # fmt: skip
        else:
            d = max_converging_dirty(np.float64(vm.mem_mb), np.float64(problem.link_mbps), params.downtime_target_ms,
                                     params.max_rounds)  # fmt: skip
    d = float(np.asarray(d))
    return d if math.isfinite(d) and d > 0 else None
