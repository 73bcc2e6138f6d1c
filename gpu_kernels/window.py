"""Best migration window per VM: the earliest start whose whole migration stays lowest.

A migration started at slot t covers ``duration_slots[t]`` slots (t, t+1, ...);
its value is the worst (max) predicted downtime over those slots, because the
pause lands wherever the pre-copy ends and the forecast cannot say exactly
where. Windows that run past the forecast horizon are judged on the slots that
remain (the forecast ends there). The sliding max is a handful of shifted
maximums (spans are a few slots), so the search is one vectorised pass in NumPy
or CuPy.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gpu_kernels.xp import module_of


def window_max(x: Any, duration_slots: Any, xp: Any = None) -> Any:
    """``out[i, t] = max(x[i, t : t + duration_slots[i, t]])`` (span clipped to the horizon).

    ``duration_slots``: int array broadcastable to ``x`` or a scalar; values < 1
    count as 1. NaN in ``x`` propagates into every window covering it.
    """
    xp = xp or module_of(x)
    x = xp.asarray(x)
    k, t_len = x.shape
    span = xp.clip(xp.broadcast_to(xp.asarray(duration_slots), x.shape), 1, t_len)
    longest = int(span.max()) if span.size else 1
    out = x.copy()
    for j in range(1, longest):
        shifted = xp.empty_like(x)
        shifted[:, : t_len - j] = x[:, j:]
        shifted[:, t_len - j :] = -xp.inf  # past the horizon: does not count
        out = xp.where(span > j, xp.maximum(out, shifted), out)
    return out


def best_window(downtime_ms: Any, duration_slots: Any = 1, tol_ms: float = 1.0, xp: Any = None) -> tuple[Any, Any]:
    """Start index and value of the best window per VM.

    ``downtime_ms``: ``(k, T)`` predicted downtime per start slot; ``duration_slots``:
    ``(k, T)`` or an int, the slots a migration started there covers. Best = the
    lowest window value; among windows within ``tol_ms`` of it, the earliest start
    (a migration now beats one an hour later that saves a millisecond). NaN slots
    are never chosen; a VM with no finite window gets start 0 and value NaN.
    Returns ``(start_idx int64 (k,), value (k,))``.
    """
    xp = xp or module_of(downtime_ms)
    x = xp.asarray(downtime_ms)
    if x.ndim != 2:
        raise ValueError(f"downtime_ms must be (k, T), got shape {tuple(x.shape)}")
    vals = window_max(xp.where(xp.isnan(x), xp.inf, x), duration_slots, xp)
    best = vals.min(axis=1)
    near = vals <= best[:, None] + tol_ms
    start = xp.argmax(near, axis=1).astype(xp.int64)
    value = xp.take_along_axis(vals, start[:, None], axis=1)[:, 0]
    value = xp.where(xp.isfinite(value), value, np.nan).astype(x.dtype)
    start = xp.where(xp.isfinite(best), start, 0)
    return start, value
