"""Pre-copy as QEMU runs it, in closed form over VMs x slots (NumPy or CuPy, one code path).

What QEMU 7.x does (``migration/migration.c``, ``migration/ram.c``), and what the
lab measured (``zhuge lab calibrate``):

- the first pass sends every non-zero page (``M``; zero pages cost almost
  nothing) at the link's payload rate ``B`` (``efficiency`` x the link: TCP/IP
  framing takes about 4 %);
- there is no fixed number of rounds: QEMU keeps sending while the pending dirty
  bytes exceed ``threshold = B x downtime_limit``; when the pending estimate drops
  below it, it syncs the dirty bitmap, and stops the guest if the pending bytes
  are still below the threshold. The check runs between chunks of sending, so
  the pass ends with ``rest = B x (limit - gap)`` bytes still pending (``gap``:
  where in its last chunk the check lands, on average; a limit below the gap
  leaves ``rest = 0`` and the tail must end below the limit itself, since
  pending bytes at the stop never exceed the threshold);
- what the guest dirties meanwhile is bounded by its writable working set ``W``
  (a guest cannot dirty more distinct pages than it writes to), minus the
  pending pages it dirties again (they are sent once): each pass after the first
  is ``N' = min(W - rest, lambda x N)`` with ``lambda = D / B``, the first
  ``N_1 = min(W - rest, D x M / B)``, and the geometric tail ends once a pass
  is below the gap: ``N < B x gap``;
- the pause sends ``rest + N_last`` (just under the threshold: the pause sits
  just under the downtime limit whenever the tail took more than one pass) at the
  link rate (QEMU lifts its own ``max-bandwidth`` for it; a real link does not
  get faster) plus a fixed ``resume`` cost (device state, the destination
  starting, the last bytes in flight);
- ``lambda >= 1`` (the guest dirties at least as fast as the link sends) never
  converges unless the working set is below the gap; what happens then is the
  management layer's ``policy``: after ``timeout_s`` it **aborts** (nothing
  moves: no pause, ``converged`` false) or **forces** the pause (the whole pending
  set, ``rest + min(W - rest, D x ...)`` bytes, copied at once).

All sizes MiB, rates MiB/s. ``W`` unknown (NaN) means no saturation (``W = M``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from gpu_kernels.xp import module_of


@dataclass(frozen=True)
class QemuLink:
    """The QEMU/link/policy constants of the model (from Settings; the lab calibrates them)."""

    limit_ms: float = 300.0  # QEMU downtime-limit
    efficiency: float = 0.96  # payload share of the link rate
    gap_ms: float = 50.0  # the last chunk's mean overshoot below the limit
    resume_ms: float = 20.0
    timeout_s: float = 300.0  # the management layer's completion timeout
    on_timeout: str = "abort"  # abort | force

    @property
    def stop_gap_ms(self) -> float:
        """The gap as the stop rule sees it: never above the limit (the pause never sends more than it allows)."""
        return min(self.gap_ms, max(self.limit_ms, 0.0))


class QemuPrecopy(NamedTuple):
    downtime_ms: Any  # the pause; +inf where the policy aborts (no pause happens)
    duration_s: Any  # the whole migration (until the timeout when it aborts)
    converged: Any  # bool
    passes: Any  # passes after the first (dirty syncs minus two)


def qemu_precopy(mem_mb: Any, dirty_mbps: Any, link_mbps: Any, wss_mb: Any, link: QemuLink, xp: Any = None) -> QemuPrecopy:
    """The model over broadcastable arrays (``(k, 1)`` memory with ``(k, T)`` rates, say)."""
    xp = xp or module_of(dirty_mbps)
    m, d, b, w = _inputs(mem_mb, dirty_mbps, link_mbps, wss_mb, link, xp)
    limit_s, gap_s = link.limit_ms / 1000.0, link.stop_gap_ms / 1000.0
    rest = b * (limit_s - gap_s)
    gap = b * gap_s
    room = xp.maximum(w - rest, 0)  # new distinct dirty bytes a pass can hold
    t0 = m / b
    lam = d / b
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        n1 = xp.minimum(room, d * t0)
        shrinks = lam < 1
        done_first = n1 < gap
        # passes after the first until one is below the gap: n1 * lam**n < gap
        n = xp.ceil(xp.log(gap / n1) / xp.log(lam))
        n = xp.where(done_first, 0, xp.where(shrinks & xp.isfinite(n), xp.maximum(n, 1), np.inf))
        last = xp.where(done_first, n1, n1 * lam ** xp.where(xp.isfinite(n), n, 0))
        tail = xp.where(done_first, 0, n1 * (1 - lam**n) / (1 - lam))  # bytes of the passes after the first
        precopy_s = t0 + tail / b
        ends = (done_first | shrinks) & (precopy_s <= link.timeout_s)
        pause_s = (rest + last) / b + link.resume_ms / 1000.0
        if link.on_timeout == "force":
            forced_pause = (rest + xp.minimum(room, xp.maximum(n1, d * link.timeout_s))) / b + link.resume_ms / 1000.0
            downtime_s = xp.where(ends, pause_s, forced_pause)
            duration_s = xp.where(ends, precopy_s + pause_s, link.timeout_s + forced_pause)
        else:
            downtime_s = xp.where(ends, pause_s, np.inf)
            duration_s = xp.where(ends, precopy_s + pause_s, link.timeout_s)
    bad = xp.isnan(m) | xp.isnan(d) | xp.isnan(b)
    dtype = m.dtype
    downtime_ms = xp.where(bad, np.nan, downtime_s * 1000).astype(dtype)
    duration = xp.where(bad, np.nan, duration_s).astype(dtype)
    return QemuPrecopy(downtime_ms, duration, ends & ~bad, xp.where(ends, n, -1).astype(xp.float32))


def max_converging_dirty(mem_mb: Any, link_mbps: Any, wss_mb: Any, link: QemuLink, xp: Any = None) -> Any:
    """The largest dirty rate (MiB/s) whose migration converges within the timeout.

    Convergence is monotone in the dirty rate. Taking the tail as its continuous
    sum ``(N_1 - gap) / (1 - lambda)``, the condition ``M/B + tail/B <= timeout``
    solves in closed form: with ``Y = B (timeout - M/B)`` the bytes the tail may
    send, ``D* = (Y + gap) / (M/B + Y/B)`` while the first pass's dirt stays
    under the working set (``D* M/B <= W - rest``), else
    ``D* = B (1 - (W - rest - gap) / Y)``; below the gap it always converges.
    """
    xp = xp or module_of(mem_mb)
    m, _, b, w = _inputs(mem_mb, xp.zeros(()), link_mbps, wss_mb, link, xp)
    rest = b * (link.limit_ms - link.stop_gap_ms) / 1000.0
    gap = b * link.stop_gap_ms / 1000.0
    room = xp.maximum(w - rest, 0)
    t0 = m / b
    y = b * (link.timeout_s - t0)
    with np.errstate(divide="ignore", invalid="ignore"):
        unsat = (y + gap) / (t0 + y / b)
        sat = b * (1 - (room - gap) / y)
        d_star = xp.where(unsat * t0 <= room, unsat, sat)
        d_star = xp.where(room <= gap, np.inf, d_star)  # the whole working set fits below the gap
        d_star = xp.where(y <= 0, 0.0, xp.clip(d_star, 0, np.inf))
    return d_star


def _inputs(mem_mb: Any, dirty_mbps: Any, link_mbps: Any, wss_mb: Any, link: QemuLink, xp: Any) -> tuple[Any, ...]:
    m = xp.asarray(mem_mb)
    d = xp.asarray(dirty_mbps)
    b = xp.asarray(link_mbps)
    w = xp.asarray(np.nan if wss_mb is None else wss_mb)
    dtype = xp.result_type(m.dtype, d.dtype, b.dtype, xp.float32)
    m, d, b, w = (a.astype(dtype, copy=False) for a in (m, d, b, w))
    m, d, b, w = xp.broadcast_arrays(m, d, b, w)
    b = xp.maximum(b * dtype.type(link.efficiency), np.finfo(dtype).tiny)
    m = xp.maximum(m, 0)
    d = xp.maximum(d, 0)
    w = xp.where(xp.isnan(w), m, xp.minimum(w, xp.maximum(m, 0)))  # unknown: all of it; never above M
    return m, d, b, w
