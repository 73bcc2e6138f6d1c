"""The drain problem: the host, its VMs and their forecasts, validated once so the solver can trust them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from gpu_kernels.downtime import PrecopyParams

# Bandwidth shares are link/j for j = 1..min(K, MAX_LEVEL): exact integer units need lcm(1..j)
# (720720 at 16); a share below link/16 is too thin to converge for any real guest anyway.
MAX_LEVEL = 16


@dataclass(frozen=True, eq=False)
class DrainVM:
    """One VM to move off the host.

    ``dirty_mbps[t]``: the predicted upper-quantile dirty rate for plan slot t
    (slot 0 starts at ``DrainProblem.t0``); planning on the upper quantile keeps
    a plan safe when the guest is busier than its median. ``factor``: the learned
    multiplicative downtime correction (``streams.migrations``), applied to the
    predicted pause. ``wss_mb`` NaN: working set unknown (the model then takes
    all of memory).
    """

    vm: str
    mem_mb: float
    wss_mb: float
    dirty_mbps: np.ndarray
    factor: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.vm, str) or not self.vm:
            raise ValueError(f"DrainVM.vm must be a non-empty string, got {self.vm!r}")
        if not (math.isfinite(self.mem_mb) and self.mem_mb > 0):
            raise ValueError(f"VM {self.vm!r}: mem_mb must be finite and > 0, got {self.mem_mb!r}")
        if self.wss_mb is None:
            object.__setattr__(self, "wss_mb", math.nan)
        if not (math.isnan(self.wss_mb) or self.wss_mb >= 0):
            raise ValueError(f"VM {self.vm!r}: wss_mb must be >= 0 or NaN (unknown), got {self.wss_mb!r}")
        if not (math.isfinite(self.factor) and self.factor > 0):
            raise ValueError(f"VM {self.vm!r}: factor must be finite and > 0, got {self.factor!r}")
        dirty = np.array(self.dirty_mbps, dtype=np.float64)  # a private copy: the caller may mutate theirs
        if dirty.ndim != 1 or dirty.size == 0:
            raise ValueError(f"VM {self.vm!r}: dirty_mbps must be a non-empty 1-D array (one value per slot), "
                             f"got shape {dirty.shape}")  # fmt: skip
        dirty.setflags(write=False)
        object.__setattr__(self, "dirty_mbps", dirty)
        object.__setattr__(self, "mem_mb", float(self.mem_mb))
        object.__setattr__(self, "wss_mb", float(self.wss_mb))
        object.__setattr__(self, "factor", float(self.factor))


@dataclass(frozen=True)
class DrainProblem:
    """Empty ``host`` before ``deadline``: at most ``max_concurrent`` migrations sharing ``link_mbps``.

    ``t0`` (epoch s) is now and the start of slot 0; ``slot_s`` the plan grid.
    Every VM's ``dirty_mbps`` must cover every slot that starts before the
    deadline (``n_slots``): a forecast shorter than that is refused rather than
    extended, since a plan is only as good as the rates it was made on.
    ``link_mbps`` is the host's migration link; ``params.link_mbps`` is not used
    (the shares of this link are what the model is evaluated at).
    """

    host: str
    vms: list[DrainVM]
    t0: float
    slot_s: int
    deadline: float
    max_concurrent: int
    link_mbps: float
    params: PrecopyParams = field(default_factory=PrecopyParams)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.t0) and math.isfinite(self.deadline)):
            raise ValueError(f"t0 and deadline must be finite epoch seconds, got t0={self.t0!r}, "
                             f"deadline={self.deadline!r}")  # fmt: skip
        if self.deadline <= self.t0:
            raise ValueError(f"deadline ({self.deadline}) must be after t0 ({self.t0}): nothing can finish "
                             "before it starts")  # fmt: skip
        if isinstance(self.slot_s, bool) or not float(self.slot_s).is_integer() or self.slot_s < 1:
            raise ValueError(f"slot_s must be a whole number of seconds >= 1, got {self.slot_s!r}")
        object.__setattr__(self, "slot_s", int(self.slot_s))
        if isinstance(self.max_concurrent, bool) or not float(self.max_concurrent).is_integer() \
                or self.max_concurrent < 1:  # fmt: skip
            raise ValueError(f"max_concurrent (K) must be an integer >= 1, got {self.max_concurrent!r}")
        object.__setattr__(self, "max_concurrent", int(self.max_concurrent))
        if not (math.isfinite(self.link_mbps) and self.link_mbps > 0):
            raise ValueError(f"link_mbps must be finite and > 0, got {self.link_mbps!r}")
        if not isinstance(self.params, PrecopyParams):
            raise ValueError(f"params must be a PrecopyParams, got {type(self.params).__name__}")
        seen: set[str] = set()
        for vm in self.vms:
            if not isinstance(vm, DrainVM):
                raise ValueError(f"vms must hold DrainVM objects, got {type(vm).__name__}")
            if vm.vm in seen:
                raise ValueError(f"VM {vm.vm!r} is listed twice")
            seen.add(vm.vm)
            if vm.dirty_mbps.size < self.n_slots:
                raise ValueError(
                    f"VM {vm.vm!r}: dirty_mbps has {vm.dirty_mbps.size} slots but the plan needs {self.n_slots} "
                    f"(slots of {self.slot_s} s from t0 up to the deadline, {self.deadline - self.t0:.0f} s); "
                    "extend the forecast or bring the deadline closer"
                )

    @property
    def n_slots(self) -> int:
        """Slots that start before the deadline (the last may end after it)."""
        return max(1, math.ceil((self.deadline - self.t0) / self.slot_s - 1e-9))

    @property
    def levels(self) -> np.ndarray:
        """The share divisors j (bandwidth link/j), 1..min(K, MAX_LEVEL)."""
        return np.arange(1, min(self.max_concurrent, MAX_LEVEL) + 1)
