"""Pre-copy live-migration downtime over VMs x slots, in closed form: the models and their dispatch.

Two models share one interface (``precopy_with``, ``p_ok``), chosen by
``PrecopyParams.model`` (``ZHUGE_DOWNTIME_MODEL``):

- ``qemu`` (default): pre-copy as QEMU runs it (``gpu_kernels.qemu_precopy``),
  checked against real migrations in the lab (``zhuge lab calibrate``);
- ``classic``: the textbook round-based model below, what zhuge shipped first
  (kept for comparison: the calibration report shows both).

The classic model (DESIGN "Models"): round 0 sends the guest's memory
M at bandwidth B; every later round re-sends what was dirtied during the round
before, so with lambda = D / B round i sends M * lambda**i. Pre-copy stops once
the remainder fits the downtime target (remainder / B <= target, like QEMU's
downtime-limit) or after ``max_rounds`` rounds; the guest is then paused to copy
the remainder: downtime = remainder / B + resume cost.

Closed form: the number of rounds is the smallest n >= 1 with
M * lambda**n <= target * B, i.e. n = ceil(log(target * B / M) / log(lambda)),
clipped to [1, max_rounds]. No Python loop over rounds, so the kernel is one
vectorised expression over any broadcastable shape (VMs x slots) in NumPy or
CuPy. lambda >= 1 never converges: the flag is False and the downtime is that
of the forced stop-and-copy with the remainder capped at M (a guest cannot have
more than all its memory dirty).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from gpu_kernels.qemu_precopy import QemuLink, qemu_precopy
from gpu_kernels.qemu_precopy import max_converging_dirty as qemu_max_converging_dirty
from gpu_kernels.xp import module_of

# z-score of the 0.9 quantile of a standard normal: lognormal fit through q50/q90.
Z90 = 1.2815515655446004

# --- dirty-rate proxy constants (see dirty_rate_proxy) ----------------------
DIRTY_MBPS_PER_BUSY_VCPU = 50.0
WRITABLE_WORKING_SET_FRACTION = 0.25


@dataclass(frozen=True)
class PrecopyParams:
    """The migration-link and policy parameters of the models (from Settings)."""

    link_mbps: float = 1250.0
    downtime_target_ms: float = 300.0  # QEMU's downtime-limit (classic: the target a round must fit)
    max_rounds: int = 30  # classic only
    resume_ms: float = 20.0
    model: str = "qemu"  # qemu | classic
    efficiency: float = 0.96  # qemu: payload share of the link
    gap_ms: float = 50.0  # qemu: where below the limit the last pass leaves the pending bytes
    timeout_s: float = 300.0  # qemu: the management layer's completion timeout
    on_timeout: str = "abort"  # qemu: abort | force

    @classmethod
    def from_settings(cls, settings: Any) -> PrecopyParams:
        return cls(
            link_mbps=float(settings.link_mbps),
            downtime_target_ms=float(settings.downtime_target_ms),
            max_rounds=int(settings.max_rounds),
            resume_ms=float(settings.resume_ms),
            model=str(settings.downtime_model),
            efficiency=float(settings.link_efficiency),
            gap_ms=float(settings.precopy_gap_ms),
            timeout_s=float(settings.migration_timeout_s),
            on_timeout=str(settings.migration_on_timeout),
        )

    def qemu_link(self) -> QemuLink:
        return QemuLink(self.downtime_target_ms, self.efficiency, self.gap_ms, self.resume_ms, self.timeout_s,
                        self.on_timeout)  # fmt: skip

    @property
    def pause_bound_ms(self) -> float:
        """The longest pause a converging migration has under this model (what a window must fit)."""
        return self.downtime_target_ms + (self.resume_ms if self.model == "qemu" else 0.0)


class Precopy(NamedTuple):
    downtime_ms: Any  # pause (stop-and-copy + resume), ms; +inf where a non-converging migration is aborted
    duration_s: Any  # whole migration: all pre-copy rounds + the pause (or until the abort), s
    converged: Any  # bool
    rounds: Any  # classic: rounds before the pause (>= 1); qemu: passes after the first


def precopy(
    mem_mb: Any,
    dirty_mbps: Any,
    bw_mbps: Any,
    target_ms: float = 300.0,
    max_rounds: int = 30,
    resume_ms: float = 20.0,
    xp: Any = None,
) -> Precopy:
    """Downtime, duration and convergence of a pre-copy migration (broadcasting).

    ``mem_mb`` (MB), ``dirty_mbps`` and ``bw_mbps`` (MB/s) broadcast against each
    other, e.g. ``(k, 1)`` memory with ``(k, T)`` dirty rates. NaN in gives NaN
    downtime/duration and ``converged`` False. Computation is in the inputs'
    floating dtype (float32 in, float32 out).
    """
    if max_rounds < 1:
        raise ValueError("max_rounds must be >= 1")
    xp = xp or module_of(dirty_mbps)
    m = xp.asarray(mem_mb)
    d = xp.asarray(dirty_mbps)
    b = xp.asarray(bw_mbps)
    dtype = xp.result_type(m.dtype, d.dtype, b.dtype, xp.float32)
    m, d, b = (a.astype(dtype, copy=False) for a in (m, d, b))
    m, d, b = xp.broadcast_arrays(m, d, b)
    tiny = np.finfo(dtype).tiny
    b = xp.maximum(b, tiny)
    d = xp.maximum(d, 0)
    m = xp.maximum(m, 0)
    target_s = dtype.type(target_ms / 1000.0)
    lam = d / b
    budget = target_s * b  # MB that fit the target
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        # rounds needed while lambda < 1: smallest n >= 1 with m * lam**n <= budget
        n_real = xp.ceil(xp.log(budget / m) / xp.log(lam))
        n_real = xp.where(xp.isnan(n_real), 1, n_real)  # lam == 0 with budget >= m, or m == 0
        n = xp.clip(n_real, 1, max_rounds)
        # float rounding around an exact integer: step one round back/forward if the test says so
        fits = m * lam**n <= budget
        back = (n > 1) & (m * lam ** (n - 1) <= budget)
        n = xp.where(back, n - 1, xp.where(~fits & (n < max_rounds), n + 1, n))
        conv = lam < 1
        n = xp.where(conv, n, dtype.type(max_rounds))
        lam_n = xp.where(conv, lam**n, 1)  # remainder fraction, capped at M when lam >= 1
        remainder = m * lam_n
        converged = conv & (remainder <= budget)
        # MB sent during the pre-copy rounds: geometric sum (n rounds of M when lam >= 1)
        near_one = xp.abs(1 - lam) < 1e-6
        geo = xp.where(conv & ~near_one, (1 - lam_n) / (1 - lam), n)
        sent = m * geo
        downtime_ms = remainder / b * 1000 + dtype.type(resume_ms)
        duration_s = sent / b + downtime_ms / 1000
    bad = xp.isnan(m) | xp.isnan(d) | xp.isnan(b)
    nan = dtype.type(np.nan)
    downtime_ms = xp.where(bad, nan, downtime_ms).astype(dtype, copy=False)
    duration_s = xp.where(bad, nan, duration_s).astype(dtype, copy=False)
    return Precopy(downtime_ms, duration_s, converged & ~bad, n.astype(xp.int32))


def precopy_with(params: PrecopyParams, mem_mb: Any, dirty_mbps: Any, bw_mbps: Any, xp: Any = None,
                 wss_mb: Any = None) -> Precopy:  # fmt: skip
    """The model ``params`` names, with its link parameters (``wss_mb``: the writable working set, qemu only)."""
    if params.model == "classic":
        return precopy(mem_mb, dirty_mbps, bw_mbps, params.downtime_target_ms, params.max_rounds, params.resume_ms, xp)
    q = qemu_precopy(mem_mb, dirty_mbps, bw_mbps, wss_mb, params.qemu_link(), xp)
    return Precopy(q.downtime_ms, q.duration_s, q.converged, q.passes)


def dirty_rate_proxy(cpu_pct: Any, vcpus: Any, mem_used_mb: Any, disk_write_kbps: Any, xp: Any = None) -> Any:
    """Estimated memory dirty rate (MB/s) when the hypervisor does not measure it.

    Reasoning, term by term:
    - guests dirty memory while they run: a fully busy vCPU of a typical server
      workload dirties on the order of tens of MB/s of distinct pages
      (``DIRTY_MBPS_PER_BUSY_VCPU`` = 50), so the rate scales with busy vCPUs,
      ``cpu_pct / 100 * vcpus`` (vcpus unknown -> 1);
    - within one pre-copy round (about a second) a guest cannot dirty more
      distinct pages than its writable working set, a fraction of the memory it
      uses (``WRITABLE_WORKING_SET_FRACTION`` = 0.25 of ``mem_used_mb``), which
      caps that term for small, busy VMs (memory unknown -> no cap);
    - buffered disk writes pass through the guest page cache and dirty it at
      the write rate: ``disk_write_kbps / 1024`` MB/s is added (unknown -> 0).
    CPU utilisation unknown -> NaN (no basis for an estimate). It is a proxy:
    the ``vm.migrations`` outcomes are what should calibrate the constants.
    """
    xp = xp or module_of(cpu_pct)
    cpu = xp.asarray(cpu_pct, dtype=xp.float32)
    vc = xp.asarray(vcpus, dtype=xp.float32)
    used = xp.asarray(mem_used_mb, dtype=xp.float32)
    wr = xp.asarray(disk_write_kbps, dtype=xp.float32)
    busy = xp.clip(cpu, 0, 100) / 100 * xp.where(xp.isnan(vc) | (vc <= 0), 1, vc)
    cpu_term = busy * DIRTY_MBPS_PER_BUSY_VCPU
    cap = xp.where(xp.isnan(used), xp.inf, WRITABLE_WORKING_SET_FRACTION * xp.maximum(used, 0))
    disk = xp.where(xp.isnan(wr), 0, xp.maximum(wr, 0) / 1024)
    return (xp.minimum(cpu_term, cap) + disk).astype(xp.float32)


def max_converging_dirty(mem_mb: Any, bw_mbps: Any, target_ms: Any, max_rounds: int, xp: Any = None) -> Any:
    """The largest dirty rate (MB/s) for which pre-copy converges under the target.

    Convergence is monotone in the dirty rate: it needs lambda < 1 and
    lambda**n <= target * B / M for some n <= max_rounds, i.e.
    lambda <= min(1, target * B / M) ** (1 / max_rounds).
    ``target_ms`` is a scalar or an array broadcasting against ``bw_mbps`` (a
    per-VM target, e.g. the target divided by a learned downtime correction).
    """
    xp = xp or module_of(mem_mb)
    m = xp.asarray(mem_mb, dtype=xp.float64)
    b = xp.asarray(bw_mbps, dtype=xp.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = xp.minimum(target_ms / 1000.0 * b / m, 1.0)
        lam_max = ratio ** (1.0 / max_rounds)
    return lam_max * b


def p_ok(
    dirty_q50: Any,
    dirty_q90: Any,
    mem_mb: Any,
    bw_mbps: Any,
    target_ms: Any = 300.0,
    max_rounds: int = 30,
    xp: Any = None,
    *,
    params: PrecopyParams | None = None,
    wss_mb: Any = None,
) -> Any:
    """Probability that the migration's pause stays under the target, in [0, 1].

    The dirty rate is modelled as lognormal through the forecast's median and
    0.9 quantile (dirty rates are positive and right-skewed, and two quantiles
    pin down exactly two parameters): mu = ln q50, sigma = (ln q90 - ln q50) / z90.
    Because success is monotone in the dirty rate, P(ok) = P(D <= D*) =
    Phi((ln D* - mu) / sigma) with D* the largest rate that still succeeds.
    ``q90 <= q50`` means no spread: a step. A median of 0 means the guest is
    idle: ok whenever D* > 0.

    Which D*: with ``params`` naming the ``qemu`` model, the largest rate whose
    migration converges within the timeout (QEMU's stop rule then keeps the
    pause under the limit, so convergence is what can fail;
    ``gpu_kernels.qemu_precopy.max_converging_dirty``). Otherwise (classic) the
    largest rate converging under ``target_ms`` within ``max_rounds``
    (:func:`max_converging_dirty`); ``target_ms`` may be per VM (an array
    broadcasting against ``bw_mbps``).
    """
    xp = xp or module_of(dirty_q50)
    q50 = xp.maximum(xp.asarray(dirty_q50, dtype=xp.float64), 0)
    q90 = xp.maximum(xp.asarray(dirty_q90, dtype=xp.float64), q50)
    if params is not None and params.model == "qemu":
        mem = xp.asarray(mem_mb, dtype=xp.float64)
        bw = xp.asarray(bw_mbps, dtype=xp.float64)
        d_star = qemu_max_converging_dirty(mem, bw, wss_mb, params.qemu_link(), xp)
    else:
        d_star = max_converging_dirty(mem_mb, bw_mbps, target_ms, max_rounds, xp)
    with np.errstate(divide="ignore", invalid="ignore"):
        sigma = (xp.log(q90) - xp.log(q50)) / Z90
        z = (xp.log(d_star) - xp.log(q50)) / sigma
        p = 0.5 * (1 + _erf(z / math.sqrt(2), xp))
        step = xp.where(d_star >= q50, 1.0, 0.0)
        p = xp.where((sigma > 0) & xp.isfinite(sigma), p, step)
        p = xp.where(q50 <= 0, xp.where(d_star > 0, 1.0, 0.0), p)
    bad = xp.isnan(xp.asarray(dirty_q50, dtype=xp.float64)) | xp.isnan(d_star)
    return xp.where(bad, np.nan, xp.clip(p, 0, 1)).astype(xp.float32)


def _erf(x: Any, xp: Any) -> Any:
    """Vectorised erf: SciPy/CuPy special when there, else Abramowitz-Stegun 7.1.26 (|err| < 1.5e-7)."""
    if xp is not np:
        import cupyx.scipy.special as sp  # noqa: PLC0415

        return sp.erf(x)
    sign = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return sign * (1.0 - poly * np.exp(-a * a))
