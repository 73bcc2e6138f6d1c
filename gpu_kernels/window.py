"""Migration windows per VM: the strict minimum and the window a scheduler should take.

A migration started at slot t covers ``duration_slots[t]`` slots (t, t+1, ...);
its value is the worst (max) predicted downtime over those slots, because the
pause lands wherever the pre-copy ends and the forecast cannot say exactly
where; likewise its p_ok is the worst (min) p_ok over them. Windows that run
past the forecast horizon are judged on the slots that remain (the forecast
ends there). A sliding max/min is a handful of shifted maximums/minimums (spans
are a few slots), so every search is one vectorised pass in NumPy or CuPy.

Two answers per VM: :func:`best_window` is the strict minimum (what a perfect
forecast would save); :func:`recommended_window` is the earliest window that is
nearly as good and fits the target, because waiting 20 h to save 2 ms is not a
saving a scheduler wants.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from gpu_kernels.xp import module_of

# window_rule codes returned by recommended_window (index into this tuple)
WINDOW_RULES = ("now", "fits", "minimum")
RULE_NOW, RULE_FITS, RULE_MINIMUM = range(len(WINDOW_RULES))


@dataclass(frozen=True)
class WindowPolicy:
    """The tolerance and confidence a recommended window must meet (from Settings)."""

    tol_ms: float = 10.0
    tol_rel: float = 0.1
    min_p_ok: float = 0.9

    @classmethod
    def from_settings(cls, settings: Any) -> WindowPolicy:
        return cls(
            tol_ms=float(settings.window_tolerance_ms),
            tol_rel=float(settings.window_tolerance_rel),
            min_p_ok=float(settings.window_min_p_ok),
        )


def _sliding(x: Any, duration_slots: Any, xp: Any, combine: Any, past_horizon: float) -> Any:
    """``combine`` of ``x[i, t : t + span]`` per start; slots past the horizon hold ``past_horizon`` (neutral)."""
    x = xp.asarray(x)
    k, t_len = x.shape
    span = xp.clip(xp.broadcast_to(xp.asarray(duration_slots), x.shape), 1, t_len)
    longest = int(span.max()) if span.size else 1
    out = x.copy()
    for j in range(1, longest):
        shifted = xp.empty_like(x)
        shifted[:, : t_len - j] = x[:, j:]
        shifted[:, t_len - j :] = past_horizon
        out = xp.where(span > j, combine(out, shifted), out)
    return out


def window_max(x: Any, duration_slots: Any, xp: Any = None) -> Any:
    """``out[i, t] = max(x[i, t : t + duration_slots[i, t]])`` (span clipped to the horizon).

    ``duration_slots``: int array broadcastable to ``x`` or a scalar; values < 1
    count as 1. NaN in ``x`` propagates into every window covering it.
    """
    xp = xp or module_of(x)
    return _sliding(x, duration_slots, xp, xp.maximum, -np.inf)


def window_min(x: Any, duration_slots: Any, xp: Any = None) -> Any:
    """``out[i, t] = min(x[i, t : t + duration_slots[i, t]])``: :func:`window_max`'s twin (e.g. p_ok per start)."""
    xp = xp or module_of(x)
    return _sliding(x, duration_slots, xp, xp.minimum, np.inf)


def window_values(downtime_ms: Any, duration_slots: Any, xp: Any = None) -> Any:
    """Window value per start ``(k, T)``: the worst downtime over the slots a migration started there
    covers, NaN slots as +inf so no window covering one is ever chosen. ``best_window`` and
    ``recommended_window`` take it as ``values`` when the caller needs it more than once."""
    xp = xp or module_of(downtime_ms)
    x = xp.asarray(downtime_ms)
    if x.ndim != 2:
        raise ValueError(f"downtime_ms must be (k, T), got shape {tuple(x.shape)}")
    return window_max(xp.where(xp.isnan(x), xp.inf, x), duration_slots, xp)


def _pick(vals: Any, start: Any, dtype: Any, xp: Any) -> Any:
    """The window value at ``start`` per VM; NaN when it is not finite (no usable window)."""
    value = xp.take_along_axis(vals, start[:, None], axis=1)[:, 0]
    return xp.where(xp.isfinite(value), value, np.nan).astype(dtype)


def best_window(
    downtime_ms: Any, duration_slots: Any = 1, tol_ms: float = 1.0, xp: Any = None, values: Any = None
) -> tuple[Any, Any]:
    """Start index and value of the strict-minimum window per VM.

    ``downtime_ms``: ``(k, T)`` predicted downtime per start slot; ``duration_slots``:
    ``(k, T)`` or an int, the slots a migration started there covers. Best = the
    lowest window value; among windows within ``tol_ms`` of it, the earliest start
    (float noise must not push a migration later). NaN slots are never chosen; a
    VM with no finite window gets start 0 and value NaN.
    ``values``: :func:`window_values` of these, when the caller has them.
    Returns ``(start_idx int64 (k,), value (k,))``.
    """
    xp = xp or module_of(downtime_ms)
    vals = window_values(downtime_ms, duration_slots, xp) if values is None else values
    best = vals.min(axis=1)
    start = xp.argmax(vals <= best[:, None] + tol_ms, axis=1).astype(xp.int64)
    start = xp.where(xp.isfinite(best), start, 0)
    return start, _pick(vals, start, xp.asarray(downtime_ms).dtype, xp)


def recommended_window(
    downtime_ms: Any,
    duration_slots: Any,
    p_ok_per_start: Any,
    target_ms: Any,
    tol_ms: float = 10.0,
    tol_rel: float = 0.1,
    min_p_ok: float = 0.9,
    xp: Any = None,
    values: Any = None,
) -> tuple[Any, Any, Any]:
    """Start index, value and rule of the window a scheduler should take, per VM.

    A start is *near* when its window value is within ``max(tol_ms, tol_rel * min)``
    of the VM's minimum (savings smaller than that are forecast noise, not worth
    the wait), and it *fits* when it is near, its value is ``<= target_ms`` and its
    ``p_ok_per_start`` (the worst p_ok over the slots it covers, see
    :func:`window_min`) is ``>= min_p_ok``. The recommendation is the earliest start
    that fits; when none does, the earliest near one (the least bad soon).
    ``downtime_ms``/``duration_slots`` as in :func:`best_window`; ``p_ok_per_start``
    ``(k, T)``; ``target_ms`` a scalar or per VM ``(k,)``. NaN downtime or p_ok
    never fits; a VM with no finite window gets start 0, value NaN, rule minimum.
    ``values``: :func:`window_values`, when the caller has them.
    Returns ``(start_idx int64 (k,), value (k,), rule int8 (k,))``, rule an index
    into :data:`WINDOW_RULES`: now (slot 0 fits), fits (a later start fits),
    minimum (nothing fits: the fallback).
    """
    xp = xp or module_of(downtime_ms)
    vals = window_values(downtime_ms, duration_slots, xp) if values is None else values
    best = vals.min(axis=1, keepdims=True)
    with np.errstate(invalid="ignore"):  # 0 * inf (tol_rel 0, a VM without a finite window) is NaN: not near
        near = xp.isfinite(vals) & (vals <= best + xp.maximum(tol_ms, tol_rel * best))
    target = xp.asarray(target_ms)
    target = target.reshape(-1, 1) if target.ndim else target
    fits = near & (vals <= target) & (xp.asarray(p_ok_per_start) >= min_p_ok)
    any_fits = fits.any(axis=1)
    start = xp.where(any_fits, xp.argmax(fits, axis=1), xp.argmax(near, axis=1)).astype(xp.int64)
    rule = xp.where(any_fits, xp.where(start == 0, RULE_NOW, RULE_FITS), RULE_MINIMUM).astype(xp.int8)
    return start, _pick(vals, start, xp.asarray(downtime_ms).dtype, xp), rule
