"""Window tensor -> forecast feature matrix: the ONE feature code for training and serving.

Pure functions over arrays with a single NumPy/CuPy code path (the array module is
taken from the input), so a model trained offline sees exactly the features the
streaming scorer builds. Imports nothing but NumPy.

Layout (see ARCHITECTURE.md): ``win (k, S, C)`` float32 oldest -> newest, NaN gaps,
channels ``WINDOW_CHANNELS``; rows of ``X`` are VM-major (row ``i * H + j`` = VM i at
horizon j). Features that do not depend on the horizon are computed once per VM on
``(k, F_vm)`` and broadcast, never H times.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import numpy as np

WINDOW_CHANNELS: tuple[str, ...] = ("cpu_pct", "dirty_mbps", "net_mbps", "mem_used_mb")
TARGETS: tuple[str, ...] = ("cpu_pct", "dirty_mbps", "net_mbps")
QUANTILES: tuple[float, ...] = (0.5, 0.9)

#: Targets modelled on a log1p scale (heavy-tailed rates); both features and labels.
LOG1P_TARGETS: frozenset[str] = frozenset({"dirty_mbps", "net_mbps"})

SPEC_VERSION = 4
DAY_S = 86400
WEEK_S = 7 * DAY_S
HOUR_S = 3600
#: Spans (seconds) of the level/spread statistics over the newest part of the window.
SPANS_S: tuple[int, ...] = (HOUR_S, 6 * HOUR_S, DAY_S)
_SPAN_TAGS = {HOUR_S: "1h", 6 * HOUR_S: "6h", DAY_S: "24h"}
_STATS = ("mean", "std", "min", "max")
#: Slots of the robust recent level (median) and the short mean: 15 min of 5-min slots.
LEVEL_S = 900
#: CPU percentages counted as idle / saturated (batch VMs jump between the two).
CPU_IDLE_PCT, CPU_BUSY_PCT = 1.0, 99.0
#: The feature the booster's label is measured from (``training.fit.label_offset``), per target
#: short name. ``{s}_level`` (median of the newest 15 min) was tried beyond 1 h: it lost at 6 h on
#: Bitbrains, so persistence stays the anchor.
LABEL_BASE = "{s}_last"
#: The booster's label can also be divided by a per-VM scale (``training.fit.label_scale``), e.g.
#: ``"{s}_std_24h"``, the VM's spread over the newest 24 h on the label scale, floored per target so
#: idle VMs do not blow up. Off (None): on the validation splits it lost on Azure (cpu MAE
#: 1.438 / 1.749 / 2.015 at 1 h / 6 h / 24 h vs 1.423 / 1.704 / 2.000) and was mixed on Bitbrains
#: (cpu 24 h 9.67 vs 9.83 for the boosters, dirty-rate 1 h 8.60 vs 8.04).
LABEL_SCALE: str | None = None
LABEL_SCALE_FLOOR = {"cpu": 1.0, "dirty": 0.1, "net": 0.1}
#: Weight of the newest day in the daily profile (an EWMA per time-of-day slot, ``folded``). 0.15 and 0.6
#: scored the same as 0.3 on the Azure validation split (cpu MAE at 1 h / 6 h / 24 h: 1.428 / 1.698 /
#: 2.005 and 1.424 / 1.701 / 1.993 vs 1.423 / 1.704 / 2.000).
PROFILE_ALPHA = 0.3
#: Weight of the newest week in the weekly profile (an EWMA per hour of the week, ``folded``). Chosen on
#: the training part only (first 70 % of the time axis) of the shared traces, with the profile at the
#: target hour as a forecast on its own against persistence, cpu MAE at 24 h: Bitbrains 0.914 / 0.886 /
#: 0.890 for 1.0 / 0.6 / 0.3 (at 20 h 0.949 / 0.916 / 0.910), Azure 1.59 / 1.56 / 1.57 (no weekly cycle
#: there: the blend's validation keeps it out).
WEEK_ALPHA = 0.6
#: Epoch day 0 (1970-01-01) was a Thursday; Monday = 0.
_EPOCH_DOW = 3

#: Short name of each target in feature names (``cpu_last``, ``dirty_yday``, ...).
SHORT_NAMES: dict[str, str] = {"cpu_pct": "cpu", "dirty_mbps": "dirty", "net_mbps": "net"}


def _vm_feature_names() -> list[str]:
    names: list[str] = []
    for t in TARGETS:
        s = SHORT_NAMES[t]
        names.append(f"{s}_last")
        for span in SPANS_S:
            names += [f"{s}_{stat}_{_SPAN_TAGS[span]}" for stat in _STATS]
        names.append(f"{s}_trend_1h")
        names += [f"{s}_mean_15m", f"{s}_level", f"{s}_last_dev_1h"]
        names += [f"{s}_prof_err_1h", f"{s}_prof_err_24h", f"{s}_persist_err_24h", f"{s}_periodic", f"{s}_week_err_24h"]
    names += ["cpu_idle_frac_1h", "cpu_busy_frac_1h"]
    names += ["staleness_slots", "vcpus", "mem_total_mb", "mem_util"]
    return names


def _horizon_feature_names() -> list[str]:
    names: list[str] = []
    for t in TARGETS:
        s = SHORT_NAMES[t]
        names += [f"{s}_yday", f"{s}_yday_1h", f"{s}_week", f"{s}_prof", f"{s}_yday_delta", f"{s}_prof_delta"]
    names += ["horizon_h", "tod_sin", "tod_cos", "dow"]
    return names


VM_FEATURE_NAMES: tuple[str, ...] = tuple(_vm_feature_names())
HORIZON_FEATURE_NAMES: tuple[str, ...] = tuple(_horizon_feature_names())
FEATURE_NAMES: tuple[str, ...] = VM_FEATURE_NAMES + HORIZON_FEATURE_NAMES


def _spec() -> dict[str, Any]:
    return {
        "version": SPEC_VERSION,
        "names": list(FEATURE_NAMES),
        "window_channels": list(WINDOW_CHANNELS),
        "targets": list(TARGETS),
        "quantiles": list(QUANTILES),
        "spans_s": list(SPANS_S),
        "transforms": {t: ("log1p" if t in LOG1P_TARGETS else "identity") for t in TARGETS},
        "label": f"booster learns transform(y) - {LABEL_BASE} (NaN -> 0), see training.fit.label_offset",
        "label_scale": [LABEL_SCALE, LABEL_SCALE_FLOOR] if LABEL_SCALE else None,
        "level": f"median of the newest {LEVEL_S} s (else last); mean_15m over the same span; last_dev_1h = last - mean_1h",
        "cpu_frac": [CPU_IDLE_PCT, CPU_BUSY_PCT],
        "yday": "value at target slot - 1 day; mean of 1 h centred on it",
        "week": f"EWMA (alpha {WEEK_ALPHA}/week) per hour of the week of the hour means (its first"
        " min(hour, window) of slots) folded when the hour's first slot left the window; at the target slot's hour",
        "time": "target slot tod sin/cos, dow Monday=0 (UTC)",
        "profile": f"EWMA (alpha {PROFILE_ALPHA}/day) per time-of-day slot of the slot means that left the window;"
        " prof = at the target slot; prof_err_* = mean |x - prof| over the newest 1 h / 24 h;"
        " persist_err_24h = mean |x_t - x_(t-1h)| over the newest 24 h; periodic = corr(x, prof) over the window;"
        " week_err_24h = mean |x - week| over the newest 24 h;"
        " *_delta = yday / prof minus last",
    }


#: sha256 of the canonical feature spec; a model records it and a worker refuses unknown ones.
FEATURE_SPEC_HASH: str = hashlib.sha256(
    json.dumps(_spec(), sort_keys=True, separators=(",", ":")).encode()
).hexdigest()


def array_module(a: Any) -> Any:
    """NumPy or CuPy, whichever owns ``a`` (CuPy imported only when ``a`` is a CuPy array)."""
    if type(a).__module__.split(".")[0] == "cupy":
        import cupy

        return cupy
    return np


def _masked_stats(x: Any, xp: Any) -> tuple[Any, Any, Any, Any]:
    """NaN-aware mean, std, min, max over the last axis; NaN where no value (no warnings)."""
    valid = ~xp.isnan(x)
    n = valid.sum(axis=-1)
    has = n > 0
    denom = xp.maximum(n, 1).astype(x.dtype)
    x0 = xp.where(valid, x, 0)
    mean = x0.sum(axis=-1) / denom
    dev = xp.where(valid, x - mean[..., None], 0)
    std = xp.sqrt((dev * dev).sum(axis=-1) / denom)
    mn = xp.where(valid, x, xp.inf).min(axis=-1)
    mx = xp.where(valid, x, -xp.inf).max(axis=-1)
    nan = xp.asarray(xp.nan, dtype=x.dtype)
    return (xp.where(has, mean, nan), xp.where(has, std, nan), xp.where(has, mn, nan), xp.where(has, mx, nan))


def _masked_mean(x: Any, xp: Any) -> Any:
    return _masked_stats(x, xp)[0]


def _masked_median(x: Any, xp: Any) -> Any:
    """NaN-aware median over the last axis (short spans); NaN where no value (no warnings)."""
    n = (~xp.isnan(x)).sum(axis=-1)
    srt = xp.sort(x, axis=-1)  # NaN sort last on NumPy and CuPy
    lo = xp.take_along_axis(srt, xp.maximum((n - 1) // 2, 0)[..., None], axis=-1)[..., 0]
    hi = xp.take_along_axis(srt, (n // 2)[..., None].clip(0, x.shape[-1] - 1), axis=-1)[..., 0]
    return xp.where(n > 0, (lo + hi) * x.dtype.type(0.5), x.dtype.type(xp.nan))


def newest_observed(hist: Any) -> Any:
    """Newest non-NaN value of each row of ``hist (n, S)`` (oldest -> newest); NaN when none. NumPy or CuPy."""
    xp = array_module(hist)
    valid = ~xp.isnan(hist)
    S = hist.shape[-1]
    if S == 0:
        return xp.full(hist.shape[0], xp.nan, dtype=hist.dtype)
    idx = S - 1 - xp.argmax(valid[:, ::-1], axis=-1)
    val = xp.take_along_axis(hist, idx[:, None], axis=-1)[:, 0]
    return xp.where(valid.any(axis=-1), val, hist.dtype.type(np.nan))


def _span_slots(span_s: int, slot_s: int, S: int) -> int:
    return int(min(S, max(1, span_s // slot_s)))


def _targets_view(win: Any, xp: Any) -> Any:
    """(k, S, C) window -> (k, len(TARGETS), S) on the model's scale (log1p for rates)."""
    idx = [WINDOW_CHANNELS.index(t) for t in TARGETS]
    tw = xp.ascontiguousarray(win[:, :, idx].transpose(0, 2, 1)).astype(xp.float32)
    logs = [i for i, t in enumerate(TARGETS) if t in LOG1P_TARGETS]
    tw[:, logs, :] = xp.log1p(xp.maximum(tw[:, logs, :], 0))
    return tw


def _vm_features(win: Any, tw: Any, attrs: Mapping[str, Any], slot_s: int, xp: Any, prof: Any) -> Any:
    """Horizon-independent features, (k, len(VM_FEATURE_NAMES))."""
    k, S, _ = win.shape
    cols: list[Any] = []
    valid = ~xp.isnan(tw)  # (k, T, S)
    last_idx = S - 1 - xp.argmax(valid[:, :, ::-1], axis=-1)  # newest observed slot
    last = xp.take_along_axis(tw, last_idx[..., None], axis=-1)[..., 0]
    last = xp.where(valid.any(axis=-1), last, xp.float32(xp.nan))
    n1h = _span_slots(HOUR_S, slot_s, S)
    per_span = [_masked_stats(tw[:, :, S - _span_slots(sp, slot_s, S) :], xp) for sp in SPANS_S]
    prev = tw[:, :, max(0, S - 2 * n1h) : S - n1h] if S > n1h else tw[:, :, :0]
    prev_mean = _masked_mean(prev, xp) if prev.shape[-1] else xp.full((k, len(TARGETS)), xp.nan, xp.float32)
    trend = per_span[0][0] - prev_mean
    recent = tw[:, :, S - _span_slots(LEVEL_S, slot_s, S) :]
    mean_15m = _masked_mean(recent, xp)
    level = _masked_median(recent, xp)
    level = xp.where(xp.isnan(level), last, level)  # nothing in the newest 15 min: the last value
    last_dev = last - per_span[0][0]
    for t in range(len(TARGETS)):
        cols.append(last[:, t])
        for stats in per_span:
            cols += [s[:, t] for s in stats]
        cols += [trend[:, t], mean_15m[:, t], level[:, t], last_dev[:, t]]
        cols += [prof[:, t, i] for i in range(prof.shape[-1])]
    cpu_1h = tw[:, TARGETS.index("cpu_pct"), S - n1h :]
    observed = ~xp.isnan(cpu_1h)
    for in_state in (cpu_1h <= CPU_IDLE_PCT, cpu_1h >= CPU_BUSY_PCT):  # share of observed slots idle / busy
        cols.append(_masked_mean(xp.where(observed, in_state.astype(xp.float32), xp.float32(xp.nan)), xp))
    any_valid = ~xp.isnan(win).all(axis=-1)  # (k, S): any channel observed
    newest = S - 1 - xp.argmax(any_valid[:, ::-1], axis=-1)
    staleness = xp.where(any_valid.any(axis=-1), (S - 1 - newest).astype(xp.float32), xp.float32(xp.nan))
    vcpus = xp.asarray(attrs["vcpus"], dtype=xp.float32).reshape(k)
    mem_total = xp.asarray(attrs["mem_total_mb"], dtype=xp.float32).reshape(k)
    mem_used = _masked_mean(win[:, S - n1h :, WINDOW_CHANNELS.index("mem_used_mb")].astype(xp.float32), xp)
    ok = mem_total > 0
    mem_util = xp.where(ok, mem_used / xp.where(ok, mem_total, 1), xp.float32(xp.nan))
    cols += [staleness, vcpus, mem_total, mem_util]
    return xp.stack(cols, axis=1).astype(xp.float32)


def _lagged(tw: Any, lag_slots: int, h: Any, xp: Any) -> Any:
    """Value at absolute slot ``target - lag`` (window index S-1-lag+h); (k, T, H), NaN outside."""
    S = tw.shape[-1]
    idx = S - 1 - lag_slots + h
    ok = (idx >= 0) & (idx < S)
    vals = tw[:, :, xp.clip(idx, 0, S - 1)]
    return xp.where(ok[None, None, :], vals, xp.float32(xp.nan))


def _lagged_mean(tw: Any, lag_slots: int, width: int, h: Any, xp: Any) -> Any:
    """NaN-aware mean of ``width`` slots centred on ``target - lag``; (k, T, H)."""
    S = tw.shape[-1]
    idx = (S - 1 - lag_slots + h)[:, None] + (xp.arange(width) - width // 2)[None, :]  # (H, w)
    ok = (idx >= 0) & (idx < S)
    vals = tw[:, :, xp.clip(idx, 0, S - 1)]  # (k, T, H, w)
    return _masked_mean(xp.where(ok, vals, xp.float32(xp.nan)), xp)


# --- daily profile ------------------------------------------------------------------
#
# Why: a 24 h window holds one example of each time of day, so "what happens at 14:00" rests on
# one day. The profile keeps, per VM and time-of-day slot, an EWMA over the earlier days of the
# slot means that *left* the window (the window store folds a slot in when its ring position is
# reused), so serving needs (k, slots per day, targets) floats more per VM, and training
# reconstructs the same state from the series (``profiles_at``).


def slots_per_day(slot_s: int) -> int:
    return max(1, DAY_S // int(slot_s))


def folded(old: Any, x: Any, alpha: float = PROFILE_ALPHA, xp: Any = None) -> Any:
    """One EWMA step of the profile: ``x`` (NaN = no value) folded into ``old`` (NaN = empty)."""
    xp = array_module(old) if xp is None else xp
    a = old.dtype.type(alpha)
    new = xp.where(xp.isnan(old), x, old + a * (x - old))
    return xp.where(xp.isnan(x), old, new)


def periodic_ewma(values: Any, period: int, alpha: float, xp: Any = None) -> Any:
    """``values (V, T, ...)`` -> the EWMA (``folded``) of each phase ``t % period`` right after
    column ``t`` was folded in (same shape, NaN before any): one vectorised step per period."""
    xp = array_module(values) if xp is None else xp
    T = values.shape[1]
    out = xp.full(values.shape, xp.nan, dtype=xp.float32)
    for d in range(0, T, period):
        hi = min(T, d + period)
        prev = out[:, d - period : hi - period] if d >= period else xp.full_like(out[:, d:hi], xp.nan)
        out[:, d:hi] = folded(prev, values[:, d:hi].astype(xp.float32), alpha, xp)
    return out


def profile_history(values: Any, slot_s: int, alpha: float = PROFILE_ALPHA, xp: Any = None) -> Any:
    """``values (V, T, len(TARGETS))`` raw slot means -> the profile state of each slot's
    time of day right after slot ``t`` was folded in (``(V, T, len(TARGETS))``, NaN before any)."""
    return periodic_ewma(values, slots_per_day(slot_s), alpha, xp)


def profiles_at(
    series: Any, first_slot: int, origins: Any, window_slots: int, slot_s: int, alpha: float = PROFILE_ALPHA, xp: Any = None
) -> Any:
    """The window store's profile at each origin: ``series (V, T, C)`` -> ``(V * n_o, P, len(TARGETS))``,
    VM-major like ``windows_at``: tod slot ``j`` holds the EWMA of the slots with that time of day
    up to the newest one that had left a window ending at the origin (index ``<= origin - S``)."""
    xp = array_module(series) if xp is None else xp
    V = series.shape[0]
    P = slots_per_day(slot_s)
    cols = [WINDOW_CHANNELS.index(t) for t in TARGETS]
    hist = profile_history(series[:, :, cols], slot_s, alpha, xp)
    o = xp.asarray(origins, dtype=xp.int64).reshape(-1)
    left = o - int(window_slots)  # newest index that has left the window
    j = xp.arange(P, dtype=xp.int64)
    t_star = left[:, None] - ((left[:, None] - (j[None, :] - int(first_slot))) % P)  # (n_o, P)
    ok = t_star >= 0
    prof = hist[:, xp.clip(t_star, 0, None)]  # (V, n_o, P, TG)
    prof = xp.where(ok[None, :, :, None], prof, xp.float32(xp.nan))
    return prof.reshape(V * o.shape[0], P, len(TARGETS))


def _profile_view(profile: Any, abs_slots: Any, xp: Any) -> Any:
    """``profile (k, P, TG)`` raw, ``abs_slots (k, n)`` -> ``(k, TG, n)`` on the model's scale."""
    P = profile.shape[1]
    vals = xp.take_along_axis(profile, (abs_slots % P)[:, :, None], axis=1)  # (k, n, TG)
    vals = vals.transpose(0, 2, 1).astype(xp.float32)
    logs = [i for i, t in enumerate(TARGETS) if t in LOG1P_TARGETS]
    vals[:, logs, :] = xp.log1p(xp.maximum(vals[:, logs, :], 0))
    return vals


# --- weekly profile -----------------------------------------------------------------
#
# Why: a weekly cycle (batch jobs on the same weekday) is out of reach of a 24 h window, and a
# week of slots per VM would cost 7x the window. The weekly profile keeps, per VM and hour of
# the week, an EWMA over the earlier weeks of that hour's mean: (k, 168, targets) floats at
# 5-min slots. The window store folds an hour in when its first slot leaves the window (the
# rest of the hour is still in it then; a sample more than a window late for that hour is not
# counted), and training rebuilds the same state from the series (``weeklies_at``).


def week_bucket_slots(slot_s: int) -> int:
    """Slots per bucket of the weekly profile: an hour's worth (one slot when slots are longer)."""
    return max(1, HOUR_S // int(slot_s))


def week_buckets(slot_s: int) -> int:
    """Buckets per week; absolute slot ``s`` is in bucket ``(s // week_bucket_slots) % week_buckets``."""
    return max(1, WEEK_S // (week_bucket_slots(slot_s) * int(slot_s)))


def bucket_means(values: Any, first_slot: int, slot_s: int, span: int, xp: Any = None) -> tuple[Any, int]:
    """``values (V, T, TG)`` (slot ``t`` = absolute ``first_slot + t``) -> the NaN-aware mean of the
    first ``span`` slots of each weekly-profile bucket ``(V, n_b, TG)`` and the absolute bucket
    number of column 0 (what the window store folds: the bucket's slots still in its window)."""
    xp = array_module(values) if xp is None else xp
    B = week_bucket_slots(slot_s)
    V, T, TG = values.shape
    b0 = int(first_slot) // B
    lead = int(first_slot) - b0 * B
    n_b = -(-(T + lead) // B)
    grid = xp.full((V, n_b * B, TG), xp.nan, dtype=xp.float32)
    grid[:, lead : lead + T] = values
    return _masked_mean(grid.reshape(V, n_b, B, TG)[:, :, : min(span, B)].transpose(0, 1, 3, 2), xp), b0


def weeklies_at(
    series: Any, first_slot: int, origins: Any, window_slots: int, slot_s: int, alpha: float = WEEK_ALPHA, xp: Any = None
) -> Any:
    """The window store's weekly profile at each origin: ``series (V, T, C)`` -> ``(V * n_o, W, TG)``
    (W = ``week_buckets``), VM-major like ``windows_at``: bucket ``b`` holds the EWMA over the
    buckets ``b`` whose first slot had left a window ending at the origin (absolute slot
    ``<= first_slot + origin - window_slots``)."""
    xp = array_module(series) if xp is None else xp
    V = series.shape[0]
    B, W = week_bucket_slots(slot_s), week_buckets(slot_s)
    cols = [WINDOW_CHANNELS.index(t) for t in TARGETS]
    means, b0 = bucket_means(series[:, :, cols].astype(xp.float32), first_slot, slot_s, int(window_slots), xp)
    hist = periodic_ewma(means, W, alpha, xp)  # bucket column c's state after it was folded
    o = xp.asarray(origins, dtype=xp.int64).reshape(-1)
    newest = (int(first_slot) + o - int(window_slots)) // B  # newest bucket folded (absolute)
    j = xp.arange(W, dtype=xp.int64)
    b_star = newest[:, None] - ((newest[:, None] - j[None, :]) % W) - b0  # (n_o, W) column in hist
    ok = b_star >= 0
    week = hist[:, xp.clip(b_star, 0, None)]  # (V, n_o, W, TG)
    week = xp.where(ok[None, :, :, None], week, xp.float32(xp.nan))
    return week.reshape(V * o.shape[0], W, len(TARGETS))


def _weekly_view(week: Any, abs_slots: Any, slot_s: int, xp: Any) -> Any:
    """``week (k, W, TG)`` raw, ``abs_slots (k, n)`` -> ``(k, TG, n)`` on the model's scale."""
    return _profile_view(week, abs_slots // week_bucket_slots(slot_s), xp)


def _profile_features(tw: Any, profile: Any, week: Any, last_slot: Any, slot_s: int, xp: Any) -> Any:
    """Per-VM profile features ``(k, TG, 5)``: prof_err_1h, prof_err_24h, persist_err_24h, periodic, week_err_24h."""
    k, T, S = tw.shape
    n1h = _span_slots(HOUR_S, slot_s, S)
    nday = _span_slots(DAY_S, slot_s, S)
    abs_w = last_slot[:, None] - S + 1 + xp.arange(S, dtype=xp.int64)[None, :]
    prof_w = xp.full_like(tw, xp.nan) if profile is None else _profile_view(profile, abs_w, xp)
    week_w = xp.full_like(tw, xp.nan) if week is None else _weekly_view(week, abs_w, slot_s, xp)
    week_e24 = _masked_mean(xp.abs(tw - week_w)[:, :, S - nday :], xp)
    err = xp.abs(tw - prof_w)
    e1 = _masked_mean(err[:, :, S - n1h :], xp)
    e24 = _masked_mean(err[:, :, S - nday :], xp)
    tail = tw[:, :, S - nday :]
    step = xp.abs(tail[:, :, n1h:] - tail[:, :, :-n1h]) if tail.shape[-1] > n1h else tail[:, :, :0]
    pers = _masked_mean(step, xp) if step.shape[-1] else xp.full((k, T), xp.nan, xp.float32)
    both = ~xp.isnan(tw) & ~xp.isnan(prof_w)
    n = both.sum(axis=-1).astype(xp.float32)
    a = xp.where(both, tw, 0)
    b = xp.where(both, prof_w, 0)
    nn = xp.maximum(n, 1)
    ma, mb = a.sum(-1) / nn, b.sum(-1) / nn
    da, db = xp.where(both, tw - ma[..., None], 0), xp.where(both, prof_w - mb[..., None], 0)
    cov = (da * db).sum(-1)
    den = xp.sqrt((da * da).sum(-1) * (db * db).sum(-1))
    corr = xp.where((n >= 3) & (den > 0), cov / xp.where(den > 0, den, 1), xp.float32(xp.nan))
    return xp.stack([e1, e24, pers, corr, week_e24], axis=-1).astype(xp.float32)


def _horizon_features(tw: Any, last: Any, profile: Any, week: Any, last_slot: Any, h: Any, slot_s: int, xp: Any) -> Any:
    """Features of each (VM, target slot), (k, H, len(HORIZON_FEATURE_NAMES)); ``last (k, TG)``."""
    k, _, S = tw.shape
    day = DAY_S // slot_s
    n1h = _span_slots(HOUR_S, slot_s, S)
    yday = _lagged(tw, day, h, xp)
    yday_1h = _lagged_mean(tw, day, n1h, h, xp)
    target = last_slot[:, None] + h[None, :]  # (k, H) absolute target slots
    prof = xp.full_like(yday, xp.nan) if profile is None else _profile_view(profile, target, xp)  # (k, TG, H)
    wk = xp.full_like(yday, xp.nan) if week is None else _weekly_view(week, target, slot_s, xp)
    cols: list[Any] = []
    for t in range(len(TARGETS)):
        lt = last[:, t, None]
        cols += [yday[:, t], yday_1h[:, t], wk[:, t], prof[:, t], yday[:, t] - lt, prof[:, t] - lt]
    t_abs = target * slot_s  # (k, H) int64 epoch seconds of the target slot
    phase = (t_abs % DAY_S).astype(xp.float64) * (2 * np.pi / DAY_S)
    dow = ((t_abs // DAY_S) + _EPOCH_DOW) % 7
    horizon_h = xp.broadcast_to((h * slot_s / HOUR_S).astype(xp.float32)[None, :], (k, h.shape[0]))
    cols += [horizon_h, xp.sin(phase), xp.cos(phase), dow]
    return xp.stack([c.astype(xp.float32) for c in cols], axis=-1)


def build_features(
    win: Any,
    attrs: Mapping[str, Any],
    last_slot: Any,
    horizons: Any,
    slot_s: int,
    xp: Any = None,
    profile: Any = None,
    week: Any = None,
) -> Any:
    """Feature matrix ``(k * H, len(FEATURE_NAMES))`` float32, VM-major rows, on ``win``'s device.

    ``attrs`` holds ``mem_total_mb`` and ``vcpus`` (k,) (NaN allowed); ``last_slot`` (k,)
    int64 absolute slot of the newest window slot; ``horizons`` (H,) int slots ahead (>= 1);
    ``profile`` ``(k, slots_per_day, len(TARGETS))`` raw daily profile indexed by
    ``absolute slot % slots_per_day`` (the window store's, or ``profiles_at``; None: unknown);
    ``week`` ``(k, week_buckets, len(TARGETS))`` the raw weekly profile likewise (``weeklies_at``).
    """
    xp = array_module(win) if xp is None else xp
    win = xp.asarray(win)
    if win.ndim != 3 or win.shape[2] != len(WINDOW_CHANNELS):
        raise ValueError(f"win must be (k, S, {len(WINDOW_CHANNELS)}) {WINDOW_CHANNELS}, got shape {win.shape}")
    k, S, _ = win.shape
    h = xp.asarray(horizons, dtype=xp.int64).reshape(-1)
    if h.size == 0 or bool((h < 1).any()):
        raise ValueError("horizons must be a non-empty array of slot counts >= 1")
    last_slot = xp.asarray(last_slot, dtype=xp.int64).reshape(-1)
    if last_slot.shape[0] != k:
        raise ValueError(f"last_slot has {last_slot.shape[0]} entries for {k} VMs")
    H = int(h.shape[0])
    if profile is not None:
        profile = xp.asarray(profile, dtype=xp.float32)
        if profile.ndim != 3 or profile.shape[0] != k or profile.shape[2] != len(TARGETS):
            raise ValueError(f"profile must be (k={k}, slots per day, {len(TARGETS)}), got {profile.shape}")
    if week is not None:
        week = xp.asarray(week, dtype=xp.float32)
        if week.shape != (k, week_buckets(slot_s), len(TARGETS)):
            raise ValueError(f"week must be (k={k}, {week_buckets(slot_s)} buckets, {len(TARGETS)}), got {week.shape}")
    tw = _targets_view(win, xp)
    pf = _profile_features(tw, profile, week, last_slot, slot_s, xp)
    vm = _vm_features(win, tw, attrs, slot_s, xp, pf)
    last = vm[:, [VM_FEATURE_NAMES.index(f"{SHORT_NAMES[t]}_last") for t in TARGETS]]
    hz = _horizon_features(tw, last, profile, week, last_slot, h, slot_s, xp)
    X = xp.empty((k, H, len(FEATURE_NAMES)), dtype=xp.float32)
    X[:, :, : vm.shape[1]] = vm[:, None, :]
    X[:, :, vm.shape[1] :] = hz
    return X.reshape(k * H, len(FEATURE_NAMES))


def windows_at(series: Any, origins: Any, window_slots: int, xp: Any = None) -> Any:
    """Stack the windows ending at each origin: ``series (V, T, C)`` -> ``(V * n_o, S, C)``, VM-major.

    Slots before the series start are NaN (a young VM's partial window, as in serving).
    """
    xp = array_module(series) if xp is None else xp
    V, T, C = series.shape
    o = xp.asarray(origins, dtype=xp.int64).reshape(-1)
    if o.size and (int(o.min()) < 0 or int(o.max()) >= T):
        raise ValueError(f"origins must lie in [0, {T - 1}]")
    pad = xp.full((V, window_slots - 1, C), xp.nan, dtype=xp.float32)
    padded = xp.concatenate([pad, series.astype(xp.float32)], axis=1)
    idx = o[:, None] + xp.arange(window_slots)[None, :]  # padded index of window slot s at origin o
    return padded[:, idx, :].reshape(V * o.shape[0], window_slots, C)


def training_examples(
    series: Any,
    attrs: Mapping[str, Any],
    first_slot: int,
    origins: Any,
    horizons: Any,
    window_slots: int,
    slot_s: int,
    xp: Any = None,
    with_index: bool = False,
) -> tuple[Any, ...]:
    """(X, Y) for forecasting from many origins, through ``build_features`` (no drift from serving).

    ``series (V, T, C)`` per-slot means in ``WINDOW_CHANNELS`` order (or ``(T, C)`` for one VM),
    slot ``t`` being absolute slot ``first_slot + t``; ``attrs`` per VM ``(V,)``; ``origins``
    indexes into T (the newest slot of each window). ``Y (n, len(TARGETS))`` holds the raw
    target values at ``origin + h`` (NaN when unknown); rows with no known target are dropped.
    ``with_index`` adds each row's VM (index into V) and origin: ``(X, Y, vm, origin)``.
    """
    xp = array_module(series) if xp is None else xp
    series = xp.asarray(series, dtype=xp.float32)
    if series.ndim == 2:
        series = series[None]
    V, T, _ = series.shape
    o = xp.asarray(origins, dtype=xp.int64).reshape(-1)
    h = xp.asarray(horizons, dtype=xp.int64).reshape(-1)
    n_o, H = int(o.shape[0]), int(h.shape[0])
    win = windows_at(series, o, window_slots, xp)
    prof = profiles_at(series, first_slot, o, window_slots, slot_s, xp=xp)
    week = weeklies_at(series, first_slot, o, window_slots, slot_s, xp=xp)
    rep = {name: xp.repeat(xp.asarray(attrs[name], dtype=xp.float32).reshape(V), n_o) for name in ("vcpus", "mem_total_mb")}
    last_slot = xp.tile(o + first_slot, V)
    X = build_features(win, rep, last_slot, h, slot_s, xp, profile=prof, week=week)
    tgt = o[:, None] + h[None, :]  # (n_o, H) index into T
    inside = tgt < T
    cols = [WINDOW_CHANNELS.index(t) for t in TARGETS]
    Y = series[:, xp.clip(tgt, 0, T - 1), :][..., cols]  # (V, n_o, H, 3)
    Y = xp.where(inside[None, :, :, None], Y, xp.float32(xp.nan)).reshape(V * n_o * H, len(TARGETS))
    keep = ~xp.isnan(Y).all(axis=1)
    if not with_index:
        return X[keep], Y[keep]
    vm = xp.repeat(xp.arange(V, dtype=xp.int64), n_o * H)
    origin = xp.tile(xp.repeat(o, H), V)
    return X[keep], Y[keep], vm[keep], origin[keep]
