"""Window-store rows -> forecast -> pre-copy downtime per slot -> migration windows (a ScoreBatch).

One micro-batch step, on whichever device the store lives (NumPy or CuPy):
1. windows -> features (``gpu_kernels.features.build_features``) -> model on its
   (possibly sparse) horizon grid -> linear interpolation to every slot
   ``1..horizon_slots``;
2. migration bandwidth per slot = link - (the VM's own q90 network forecast +
   the other VMs' latest observed network on its host), floored at 10% of the
   link (a migration always gets some share: QoS / reserved migration class);
3. downtime per slot from the pre-copy model at the dirty-rate quantile the
   model's blend chose on validation (``window_quantile``: the median or q90;
   q90 for a model without one), and ``p_ok`` per slot from the two dirty-rate
   quantiles; per start slot, the worst of each over the slots a migration
   started there covers;
4. two windows (``gpu_kernels.window``): the recommended one (``best_*``,
   ``p_ok``, ``window_rule``: the earliest nearly-minimal start that fits the
   target with ``p_ok >= window_min_p_ok``) and the strict minimum (``min_*``);
   ``now_*`` describe a migration started in the first slot.
Optional correction learned from observed migrations (``streams.migrations``):
each VM's downtime per slot is multiplied by its factor f before the window
search (so "fits the target" judges the corrected pause), and ``p_ok`` asks
whether the *corrected* pause fits the target, i.e. whether the model's pause
fits ``target / f`` (the convergence margin shrinks when the model
under-predicts). Durations are left uncorrected (the pause is a small part of a
migration). Without a correction, or with all factors 1, the results are
bit-identical to the uncorrected path.
Memory M is the newest observed ``mem_used_mb`` (QEMU skips zero pages, so
used memory drives round 0), falling back to ``mem_total_mb``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from gpu_kernels.downtime import PrecopyParams, p_ok, precopy_with
from gpu_kernels.features import TARGETS, WINDOW_CHANNELS, build_features, newest_observed
from gpu_kernels.window import WINDOW_RULES, WindowPolicy, best_window, recommended_window, window_min, window_values
from gpu_kernels.xp import to_numpy
from streams.curve import encode_curves
from streams.scores import ScoreBatch

BW_FLOOR_FRACTION = 0.1
_T_DIRTY = TARGETS.index("dirty_mbps")
_T_NET = TARGETS.index("net_mbps")
_C_MEM = WINDOW_CHANNELS.index("mem_used_mb")
# score_windows' columns and their ScoreBatch dtypes
_COLUMNS = {
    "best_start": np.float64, "best_end": np.float64, "best_downtime_ms": np.float32, "p_ok": np.float32,
    "window_rule": np.str_, "min_start": np.float64, "min_end": np.float64, "min_downtime_ms": np.float32,
    "min_p_ok": np.float32, "now_downtime_ms": np.float32, "now_p_ok": np.float32, "now_total_s": np.float32,
}  # fmt: skip


def interp_weights(horizons: Any, horizon_slots: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(lo, hi, w)`` so that ``pred[:, lo] * (1 - w) + pred[:, hi] * w`` is slot 1..horizon_slots.

    Linear between grid points; flat before the first and after the last.
    """
    h = np.asarray(horizons, dtype=np.float64).reshape(-1)
    if h.size == 0 or np.any(np.diff(h) <= 0):
        raise ValueError(f"model horizons must be increasing slot counts, got {h.tolist()}")
    t = np.arange(1, horizon_slots + 1, dtype=np.float64)
    hi = np.clip(np.searchsorted(h, t, side="left"), 0, h.size - 1)
    lo = np.clip(hi - 1, 0, h.size - 1)
    lo = np.where(h[hi] == t, hi, lo)  # exact grid point
    span = h[hi] - h[lo]
    w = np.where(span > 0, (np.clip(t, h[lo], h[hi]) - h[lo]) / np.where(span > 0, span, 1), 0.0)
    return lo, hi, w.astype(np.float32)


def per_slot_quantiles(grid: Any, lo: Any, hi: Any, w: Any, xp: Any) -> Any:
    """Grid forecasts ``(k, H, ..., 2)`` (q50, q90 last) -> every slot ``(k, T, ..., 2)``.

    The median is linear between grid points; the q90 takes the larger of the two grid points
    around a slot. Why: between two grid horizons nothing says where a change happens, and an
    upper forecast that dips linearly from a busy grid point to a quiet one made the lab's
    recommended window start 45 min before its guest's busy phase ended (forecast at 10:10
    with grid points at 14:10, busy, and 16:10, quiet). The envelope waits for the quiet point.
    """
    extra = (None,) * (grid.ndim - 3)  # axes between the horizon and the quantile
    wl = (1 - w)[(None, slice(None), *extra)]
    wh = w[(None, slice(None), *extra)]
    a, b = grid[:, lo], grid[:, hi]
    q50 = a[..., 0] * wl + b[..., 0] * wh
    q90 = xp.maximum(a[..., 1], b[..., 1])
    return xp.stack([q50, q90], axis=-1)


def forecast_grid(win: Any, attrs: dict[str, Any], model: Any, slot_s: int, xp: Any, device: str) -> Any:
    """The model's forecast on its horizon grid: ``(k, H, len(TARGETS), 2 quantiles)`` float32.

    ``attrs["profile"]``, ``attrs["week"]`` (optional): the VMs' daily and weekly profiles
    (``WindowStore.profiles``, ``WindowStore.weeklies``); absent/None: unknown.
    """
    k = win.shape[0]
    last_slot = xp.asarray(attrs["last_slot"], dtype=xp.int64)
    feat_attrs = {name: xp.asarray(attrs[name], dtype=xp.float32) for name in ("mem_total_mb", "vcpus")}
    X = build_features(win, feat_attrs, last_slot, model.horizons, slot_s, xp, profile=attrs.get("profile"), week=attrs.get("week"))
    H = len(model.horizons)
    return xp.asarray(model.predict(X, device=device), dtype=xp.float32).reshape(k, H, len(TARGETS), 2)


def score_windows(
    win: Any,
    attrs: dict[str, Any],
    others_net_mbps: Any,
    model: Any,
    params: PrecopyParams,
    horizon_slots: int,
    slot_s: int,
    xp: Any,
    device: str,
    tol_ms: float = 1.0,
    downtime_factor: Any = None,
    pred: Any = None,
    policy: WindowPolicy | None = None,
    with_curve: bool = False,
) -> dict[str, np.ndarray]:
    """The scoring kernel for one chunk of VMs; returns host (NumPy) columns named as ``ScoreBatch``'s.

    ``tol_ms``: ties of the strict minimum (``min_*``): the earliest start within it.
    ``downtime_factor``: optional per-VM ``(k,)`` multiplicative correction of
    predicted downtime (None: uncorrected). ``pred``: the chunk's forecast from
    :func:`forecast_grid` when the caller has it cached (None: computed here).
    ``policy``: what the recommended window (``best_*``) must meet (None:
    ``WindowPolicy()``, the settings' defaults). ``with_curve``: also return
    ``curve_downtime_ms`` (k, T), the window value of every start slot (what
    ``streams.curve`` stores), and ``mem_mb`` (k,), the memory the model copied.
    """
    last_slot = xp.asarray(attrs["last_slot"], dtype=xp.int64)
    k = int(last_slot.shape[0])
    if pred is None:
        pred = forecast_grid(win, attrs, model, slot_s, xp, device)
    lo, hi, w = (xp.asarray(a) for a in interp_weights(model.horizons, horizon_slots))
    sub = pred[:, :, [_T_DIRTY, _T_NET], :]  # only what the downtime model needs
    q = per_slot_quantiles(sub, lo, hi, w, xp)  # (k, T, 2, 2)
    q = xp.maximum(xp.nan_to_num(q, nan=0.0), 0)
    dirty50, dirty90 = q[:, :, 0, 0], xp.maximum(q[:, :, 0, 1], q[:, :, 0, 0])
    net90 = xp.maximum(q[:, :, 1, 1], q[:, :, 1, 0])

    link = xp.float32(params.link_mbps)
    others = xp.nan_to_num(xp.asarray(others_net_mbps, dtype=xp.float32).reshape(k, 1), nan=0.0)
    bw = xp.maximum(link - (net90 + others), BW_FLOOR_FRACTION * link)

    if "mem_used_mb" in attrs:  # the newest sample's memory used (the window store keeps it per row)
        mem = xp.asarray(attrs["mem_used_mb"], dtype=xp.float32)
    else:
        mem = newest_observed(win[:, :, _C_MEM])
    mem = xp.where(xp.isnan(mem), xp.asarray(attrs["mem_total_mb"], dtype=xp.float32), mem)[:, None]

    wss = xp.asarray(attrs["wss_mb"], dtype=xp.float32)[:, None] if "wss_mb" in attrs else None
    # which quantile the downtime (and so every window) reads: the blend's validated choice
    dirty_w = dirty50 if getattr(model, "window_quantile", 0.9) == 0.5 else dirty90
    pc = precopy_with(params, mem, dirty_w, bw, xp, wss)
    dur_slots = xp.ceil(xp.nan_to_num(pc.duration_s, nan=slot_s) / slot_s)
    dur_slots = xp.clip(dur_slots, 1, horizon_slots).astype(xp.int64)
    downtime, p_target_ms = pc.downtime_ms, params.downtime_target_ms
    if downtime_factor is not None:
        f = xp.asarray(downtime_factor, dtype=xp.float64).reshape(k, 1)
        downtime = downtime * f.astype(xp.float32)
        p_target_ms = params.downtime_target_ms / f  # float64: a factor of 1 gives the target exactly
    p_slot = p_ok(dirty50, dirty90, mem, bw, p_target_ms, params.max_rounds, xp, params=params, wss_mb=wss)
    p_start = window_min(xp.nan_to_num(p_slot, nan=0.0), dur_slots, xp)  # unknown counts as not ok
    policy = policy or WindowPolicy()
    vals = window_values(downtime, dur_slots, xp)  # once: the recommendation, the minimum and the curve read it
    start, value, rule = recommended_window(
        downtime, dur_slots, p_start, params.pause_bound_ms, policy.tol_ms, policy.tol_rel, policy.min_p_ok, xp, values=vals
    )
    min_start, min_value = best_window(downtime, dur_slots, tol_ms, xp, values=vals)

    def window(at: Any) -> tuple[Any, Any, Any]:
        """(start epoch s, end epoch s, p_ok) of the windows starting at slot index ``at`` (k,)."""
        pick = at[:, None]
        begin = (last_slot + 1 + at).astype(xp.float64) * slot_s
        end = begin + xp.take_along_axis(pc.duration_s, pick, axis=1)[:, 0].astype(xp.float64)
        return begin, end, xp.take_along_axis(p_start, pick, axis=1)[:, 0]

    best_begin, best_end, best_p = window(start)
    min_begin, min_end, min_p = window(min_start)
    curve = {}
    if with_curve:
        curve = {
            "curve_downtime_ms": to_numpy(vals),
            "mem_mb": to_numpy(mem[:, 0]),
        }
    return curve | {
        "best_start": to_numpy(best_begin),
        "best_end": to_numpy(best_end),
        "best_downtime_ms": to_numpy(value.astype(xp.float32)),
        "p_ok": to_numpy(best_p.astype(xp.float32)),
        "window_rule": np.asarray(WINDOW_RULES)[to_numpy(rule)],
        "min_start": to_numpy(min_begin),
        "min_end": to_numpy(min_end),
        "min_downtime_ms": to_numpy(min_value.astype(xp.float32)),
        "min_p_ok": to_numpy(min_p.astype(xp.float32)),
        "now_downtime_ms": to_numpy(downtime[:, 0].astype(xp.float32)),
        "now_p_ok": to_numpy(p_start[:, 0].astype(xp.float32)),
        "now_total_s": to_numpy(pc.duration_s[:, 0].astype(xp.float32)),
    }


class Scorer:
    """Scores window-store rows with the current model (``model_provider()``, hot-swappable).

    ``correction``: optional object with ``factor(hosts) -> np.ndarray`` (one
    factor per VM, e.g. ``streams.migrations.DowntimeCorrection``), read once
    per chunk so a concurrent update never splits a chunk. ``tol_ms``: ties of
    the strict minimum (``min_*``); the recommended window (``best_*``) follows
    the settings' ``window_tolerance_ms``, ``window_tolerance_rel`` and
    ``window_min_p_ok``. ``curves``: attach each VM's ``streams.curve`` blob to the
    batch (what ``zhuge api`` and the drain planner read). ``accuracy``: optional
    ``streams.accuracy.LiveAccuracy``, shown every forecast run (live accuracy).
    """

    def __init__(
        self,
        settings: Any,
        model_provider: Callable[[], Any],
        xp: Any = np,
        chunk_vms: int = 32768,
        tol_ms: float = 1.0,
        correction: Any = None,
        curves: bool = True,
        accuracy: Any = None,
    ) -> None:
        self.settings = settings
        self.accuracy = accuracy  # streams.accuracy.LiveAccuracy: keeps the served forecasts of sampled VMs
        self.curves = curves
        self.model_provider = model_provider
        self.xp = xp
        self.device = "cpu" if xp is np else "gpu"
        self.params = PrecopyParams.from_settings(settings)
        self.policy = WindowPolicy.from_settings(settings)
        self.chunk_vms = int(chunk_vms)
        self.tol_ms = float(tol_ms)
        self.correction = correction
        self.forecasts_run = 0  # model runs (VMs), for metrics and tests

    def _factor(self, hosts: list[str]) -> np.ndarray | None:
        """Per-VM downtime factor, or None when there is nothing to correct (keeps results bit-identical)."""
        if self.correction is None:
            return None
        f = np.asarray(self.correction.factor(hosts), dtype=np.float64)
        return None if np.all(f == 1.0) else f

    def _forecast(self, store: Any, chunk: np.ndarray, attrs: dict[str, Any], model: Any) -> Any:
        """The chunk's forecast, running the model only for rows whose newest slot moved on.

        The forecaster's inputs are slot means, so within one slot its output is
        reused; everything downstream (memory, host traffic, downtime, window,
        p_ok) is recomputed on every score.
        """
        key = str(model.version)
        fresh = store.cached_forecast(chunk, key)
        stale = np.flatnonzero(~fresh)
        if stale.size:
            win = store.window(chunk[stale])  # the full window only where the model runs
            sub_attrs = {name: attrs[name][stale] for name in ("last_slot", "mem_total_mb", "vcpus")}
            sub_attrs["profile"] = store.profiles(chunk[stale])
            sub_attrs["week"] = store.weeklies(chunk[stale])
            pred = forecast_grid(win, sub_attrs, model, self.settings.slot_s, self.xp, self.device)
            if self.accuracy is not None:  # realised errors of earlier forecasts, then these kept (never raises)
                self.accuracy.observe(attrs["vm"], stale, sub_attrs["last_slot"], win, pred, model.horizons)
            store.put_forecast(chunk[stale], pred, key)
            self.forecasts_run += int(stale.size)
        return store.get_forecast(chunk)

    def due_rows(self, store: Any, rows: Any, now: float) -> np.ndarray:
        """Rows due for scoring: newest slot changed since last scored, or ``rescore_s`` elapsed.

        The pipeline asks only about VMs with new samples; with ``rescore_s`` 0 (default)
        all of them are due, which is cheap because the forecast is cached per slot.
        """
        rows = np.asarray(rows, dtype=np.int64)
        changed = store.last_slot[rows] != store.scored_slot[rows]
        stale = store.scored_at[rows] + self.settings.rescore_s <= now
        return rows[changed | stale]

    def score(self, store: Any, rows: Any, now: float) -> ScoreBatch:
        """Score ``rows`` of ``store`` as of ``now`` and mark them scored."""
        model = self.model_provider()
        rows = np.asarray(rows, dtype=np.int64)
        s = self.settings
        cols: dict[str, list[np.ndarray]] = {}
        vms: list[str] = []
        hosts: list[str] = []
        last_ts: list[np.ndarray] = []
        curves: list[bytes] = []
        factors: list[np.ndarray] = []
        for i in range(0, len(rows), self.chunk_vms):
            chunk = rows[i : i + self.chunk_vms]
            attrs = store.attrs(chunk)
            others = store.host_traffic_mbps(chunk, exclude_self=True)
            pred = self._forecast(store, chunk, attrs, model)
            factor = self._factor(attrs["host"])
            out = score_windows(
                None, attrs, self.xp.asarray(others), model, self.params, s.horizon_slots, s.slot_s,
                self.xp, self.device, self.tol_ms, factor, pred, self.policy, with_curve=self.curves,
            )  # fmt: skip
            if self.curves:
                t0 = (np.asarray(attrs["last_slot"], dtype=np.float64) + 1) * s.slot_s
                wss = attrs.get("wss_mb")
                curves += encode_curves(
                    t0, s.slot_s, out.pop("curve_downtime_ms"), model.horizons, to_numpy(pred), out.pop("mem_mb"),
                    None if wss is None else to_numpy(wss), factor,
                )  # fmt: skip
            for name, a in out.items():
                cols.setdefault(name, []).append(a)
            vms += attrs["vm"]
            hosts += attrs["host"]
            last_ts.append(attrs["last_ts"])
            factors.append(np.ones(len(chunk)) if factor is None else factor)
        store.mark_scored(rows, now)

        def cat(name: str, dtype: Any) -> np.ndarray:
            parts = cols.get(name, [])
            return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)

        return ScoreBatch(
            vm=vms,
            host=hosts,
            **{name: cat(name, dtype) for name, dtype in _COLUMNS.items()},
            last_ts=np.concatenate(last_ts).astype(np.float64) if last_ts else np.zeros(0),
            downtime_factor=np.concatenate(factors).astype(np.float32) if factors else np.zeros(0, np.float32),
            model=str(model.version),
            updated=float(now),
            curves=curves if self.curves else None,
        )
