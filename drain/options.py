"""Which (VM, start slot, share) options the solver sees: all of them, or a thinned set when there are too many.

Thinning is the planner's one heuristic cut of the search space (the lower
bound is then over the kept options only). When the allowed options exceed
``max_options``, each (VM, share) keeps its ``best_per_level`` lowest-downtime
starts (ties: earliest; this is "the slots where its dirty rate is lowest",
judged on the option itself, i.e. on every slot it covers), its earliest start
(so "as soon as possible" stays reachable) and any start in ``keep`` (the hint
schedules), plus every m-th start slot for the smallest stride m that fits the
budget. The budget is soft: what must be kept is kept even above it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from drain.model import OptionGrid


@dataclass(frozen=True)
class Options:
    """The flat option list, one entry per kept (VM i, start slot s, level index j)."""

    vm: np.ndarray  # int64 (m,)
    start: np.ndarray  # int64 (m,) start slot
    level: np.ndarray  # int64 (m,) index into OptionGrid.levels
    slots: np.ndarray  # int64 (m,) slots occupied
    downtime_ms: np.ndarray  # float64 (m,)
    stride: int  # 1: every allowed start kept
    allowed_total: int  # options before thinning

    def __len__(self) -> int:
        return int(self.vm.size)


def select_options(grid: OptionGrid, max_options: int = 20_000, keep: np.ndarray | None = None,
                   best_per_level: int = 8) -> Options:  # fmt: skip
    """Keep every allowed option, or thin as the module says; ``keep``: bool ``(n, S, J)`` always kept."""
    allowed = grid.allowed
    total = int(allowed.sum())
    stride = 1
    mask = allowed
    if total > max_options:
        mask, stride = _thin(grid, max_options, keep, best_per_level)
    i, s, j = np.nonzero(mask)
    return Options(
        vm=i.astype(np.int64),
        start=s.astype(np.int64),
        level=j.astype(np.int64),
        slots=grid.slots[i, s, j].astype(np.int64),
        downtime_ms=grid.downtime_ms[i, s, j].astype(np.float64),
        stride=stride,
        allowed_total=total,
    )


def _thin(grid: OptionGrid, max_options: int, keep: np.ndarray | None, best_per_level: int) -> tuple[np.ndarray, int]:
    allowed = grid.allowed
    n, n_slots, j = allowed.shape
    must = np.zeros_like(allowed) if keep is None else (keep & allowed)
    # per (VM, level) row along the start axis: the lowest-downtime starts (a stable sort keeps ties earliest)
    rows = np.where(allowed, grid.downtime_ms, np.inf).transpose(0, 2, 1).reshape(n * j, n_slots)
    best = np.argsort(rows, axis=1, kind="stable")[:, :best_per_level]
    earliest = np.argmax(rows < np.inf, axis=1)[:, None]
    picks = np.zeros((n * j, n_slots), dtype=bool)
    np.put_along_axis(picks, np.concatenate([best, earliest], axis=1), True, axis=1)
    must |= picks.reshape(n, j, n_slots).transpose(0, 2, 1) & allowed
    rest_per_slot = (allowed & ~must).sum(axis=(0, 2))  # what a stride would add, per start slot
    base = int(must.sum())
    stride = next((m for m in range(2, n_slots + 1) if base + int(rest_per_slot[::m].sum()) <= max_options), n_slots)
    on_stride = (np.arange(n_slots) % stride == 0).reshape(1, n_slots, 1)
    return must | (allowed & on_stride), stride
