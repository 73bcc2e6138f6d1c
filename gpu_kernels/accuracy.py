"""Forecast accuracy per horizon bucket: the ONE measure of live accuracy and of the retrain gate.

Used by the worker (``streams.accuracy.LiveAccuracy``: the forecasts it served, against
the slot means that arrived later) and by ``zhuge retrain``'s gate
(``training.retrain.holdout_accuracy``: challenger, champion and the naive baselines on
the held-out day). Pure functions; imports only NumPy and the feature module, never
``streams`` or ``training``.

Definitions:

- **pair**: a forecast made at origin slot ``o`` (the VM's newest slot when the model ran)
  for the grid horizon ``h`` (slots) of the model, against the *realised* value, the mean
  of the samples of target slot ``o + h`` (what training labels are);
- **buckets** (``BUCKETS``, those of ``training.evaluate``): ``1h`` = horizons in (0, 1 h],
  ``6h`` = (1 h, 6 h], ``24h`` = (6 h, 24 h]; every grid point of the model inside a bucket
  counts, each pair weighs the same; grid points beyond 24 h are not measured;
- **methods** (``METHODS``): ``model`` = the median (q50) the model served (whatever
  ``ForecastModel.predict`` returns, blended or not); ``last`` = persistence, the newest
  observed value of the target in the window at forecast time; ``seasonal`` = the value
  at target slot minus one day (``season`` slots; the smallest whole number of days that
  reaches back into the window beyond 24 h) in the window at forecast time, falling back
  to ``last`` on a gap, as ``training.baselines.seasonal_naive``;
- a pair where the actual or *any* method is NaN is skipped for *all* methods, so every
  method of a (target, bucket) is measured on the same pairs and counts are equal;
- **MAE** of a (target, bucket, method) = sum of absolute errors / number of pairs;
  ratios of MAEs are therefore ratios of error sums (``ratio``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gpu_kernels.features import FEATURE_NAMES, LOG1P_TARGETS, SHORT_NAMES, TARGETS, array_module, newest_observed

#: Horizon buckets, seconds ``(lo, hi]``: the same as ``training.evaluate.BUCKETS``.
BUCKETS: dict[str, tuple[int, int]] = {"1h": (0, 3600), "6h": (3600, 6 * 3600), "24h": (6 * 3600, 24 * 3600)}
BUCKET_NAMES: tuple[str, ...] = tuple(BUCKETS)
METHODS: tuple[str, ...] = ("model", "last", "seasonal")


def bucket_index(horizon_s: Any) -> np.ndarray:
    """Index into ``BUCKET_NAMES`` of each horizon (seconds), -1 for horizons in no bucket."""
    h = np.asarray(horizon_s, dtype=np.float64)
    out = np.full(h.shape, -1, dtype=np.int64)
    for i, (lo, hi) in enumerate(BUCKETS.values()):
        out[(h > lo) & (h <= hi)] = i
    return out


def naive_forecasts(hist: Any, horizons: Any, season: int) -> tuple[Any, Any]:
    """``(last (n,), seasonal (n, H))`` from a history block ``hist (n, S)`` whose newest slot is the origin.

    ``horizons`` in slots (>= 1); ``season`` slots per day. Same values as
    ``training.baselines.last_value`` / ``seasonal_naive`` (float32 kept: no rounding).
    """
    xp = array_module(hist)
    h = np.asarray(horizons, dtype=np.int64).reshape(-1)
    if h.size == 0 or (h < 1).any() or season < 1:
        raise ValueError("horizons are slot counts >= 1 and season >= 1")
    S = hist.shape[-1]
    last = newest_observed(hist)
    lag = season * np.ceil(h / season).astype(np.int64)
    idx = S - 1 + h - lag
    ok = idx >= 0
    vals = hist[:, xp.asarray(np.clip(idx, 0, max(S - 1, 0)))] if S else xp.full((hist.shape[0], h.size), xp.nan, hist.dtype)
    vals = xp.where(xp.asarray(ok)[None, :], vals, hist.dtype.type(np.nan))
    seasonal = xp.where(xp.isnan(vals), last[:, None], vals)
    return last, seasonal


def naive_from_features(X: Any, season_s: int = 86400) -> dict[str, Any]:
    """``{"last", "seasonal"}``, each ``(n, len(TARGETS))`` raw scale, read from a feature matrix.

    ``last`` = ``<s>_last``, ``seasonal`` = ``<s>_yday`` (the target slot one day earlier,
    NaN -> last), inverse-transformed (``expm1`` for ``LOG1P_TARGETS``). The same values as
    :func:`naive_forecasts` on the window the features came from (up to the float32 round
    trip through log1p) for horizons up to one day (``season_s``); beyond, ``yday`` is not
    the seasonal lag, so those rows are NaN (skipped).
    """
    xp = array_module(X)
    horizon_h = X[:, FEATURE_NAMES.index("horizon_h")]
    beyond = horizon_h * 3600.0 > season_s + 1e-6
    last = xp.empty((X.shape[0], len(TARGETS)), dtype=xp.float32)
    seas = xp.empty_like(last)
    for j, t in enumerate(TARGETS):
        s = SHORT_NAMES[t]
        lv = X[:, FEATURE_NAMES.index(f"{s}_last")].astype(xp.float32)
        yv = X[:, FEATURE_NAMES.index(f"{s}_yday")].astype(xp.float32)
        yv = xp.where(xp.isnan(yv), lv, yv)
        if t in LOG1P_TARGETS:
            lv, yv = xp.expm1(lv), xp.expm1(yv)
        last[:, j] = lv
        seas[:, j] = xp.where(beyond, xp.float32(np.nan), yv)
    return {"last": last, "seasonal": seas}


def error_sums(actual: Any, forecasts: Sequence[Any], bucket: Any, n_buckets: int = len(BUCKETS)) -> tuple[np.ndarray, np.ndarray]:
    """Absolute-error sums ``(T, B, M)`` float64 and pair counts ``(T, B)`` int64 (host NumPy).

    ``actual (n, T)`` realised values, ``forecasts`` M arrays ``(n, T)`` (one per method, in
    order), ``bucket (n,)`` each row's bucket index (-1: not measured). Per target, a row
    counts only where the actual and every method are finite (the same rows for all methods).
    """
    y = np.asarray(actual, dtype=np.float64)
    if y.ndim == 1:
        y = y[:, None]
    f = np.stack([np.asarray(a, dtype=np.float64).reshape(y.shape) for a in forecasts])  # (M, n, T)
    b = np.asarray(bucket, dtype=np.int64).reshape(-1)
    M, (n, T) = f.shape[0], y.shape
    sums = np.zeros((T, n_buckets, M), dtype=np.float64)
    counts = np.zeros((T, n_buckets), dtype=np.int64)
    if n == 0:
        return sums, counts
    ok = np.isfinite(y) & np.isfinite(f).all(axis=0) & (b >= 0)[:, None] & (b < n_buckets)[:, None]  # (n, T)
    for t in range(T):
        rows = ok[:, t]
        if not rows.any():
            continue
        bt = b[rows]
        counts[t] = np.bincount(bt, minlength=n_buckets)
        for m in range(M):
            sums[t, :, m] = np.bincount(bt, weights=np.abs(f[m, rows, t] - y[rows, t]), minlength=n_buckets)
    return sums, counts


@dataclass
class ErrorTally:
    """Accumulated :func:`error_sums` for named methods; MAE tables and ratios from them."""

    methods: tuple[str, ...] = METHODS
    targets: tuple[str, ...] = TARGETS
    buckets: tuple[str, ...] = BUCKET_NAMES
    sums: np.ndarray = field(default=None)  # type: ignore[assignment]  # (T, B, M)
    counts: np.ndarray = field(default=None)  # type: ignore[assignment]  # (T, B)

    def __post_init__(self) -> None:
        T, B, M = len(self.targets), len(self.buckets), len(self.methods)
        if self.sums is None:
            self.sums = np.zeros((T, B, M), dtype=np.float64)
        if self.counts is None:
            self.counts = np.zeros((T, B), dtype=np.int64)

    def add(self, sums: np.ndarray, counts: np.ndarray) -> None:
        self.sums += sums
        self.counts += counts

    def add_pairs(self, actual: Any, forecasts: Mapping[str, Any], bucket: Any) -> None:
        """Add the pairs of :func:`error_sums` (``forecasts`` by method name, all of ``methods``)."""
        self.add(*error_sums(actual, [forecasts[m] for m in self.methods], bucket, len(self.buckets)))

    def mae(self) -> dict[str, dict[str, dict[str, float]]]:
        """``{target: {bucket: {method: MAE}}}``; NaN where a cell has no pair."""
        out: dict[str, dict[str, dict[str, float]]] = {}
        for i, t in enumerate(self.targets):
            out[t] = {}
            for j, b in enumerate(self.buckets):
                n = int(self.counts[i, j])
                out[t][b] = {m: (float(self.sums[i, j, k] / n) if n else float("nan")) for k, m in enumerate(self.methods)}
        return out

    def ratio(self, method: str, reference: str) -> np.ndarray:
        """MAE of ``method`` / MAE of ``reference`` per (target, bucket), NaN without pairs or a zero reference."""
        a = self.sums[:, :, self.methods.index(method)]
        r = self.sums[:, :, self.methods.index(reference)]
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where((self.counts > 0) & (r > 0), a / np.where(r > 0, r, 1.0), np.nan)

    def relative_mae(self, method: str, reference: str = "last") -> float:
        """Mean over the (target, bucket) cells that have pairs of MAE(method) / MAE(reference) (scale-free)."""
        r = self.ratio(method, reference)
        return float(np.mean(r[np.isfinite(r)])) if np.isfinite(r).any() else float("nan")

    def worse_than_naive(self, method: str, naive: Sequence[str] = ("last", "seasonal")) -> list[str]:
        """Cells where ``method``'s MAE exceeds the best naive method's, as readable strings."""
        out = []
        for i, t in enumerate(self.targets):
            for j, b in enumerate(self.buckets):
                n = int(self.counts[i, j])
                if not n:
                    continue
                mine = self.sums[i, j, self.methods.index(method)] / n
                best = min(naive, key=lambda m: self.sums[i, j, self.methods.index(m)])
                ref = self.sums[i, j, self.methods.index(best)] / n
                if mine > ref:
                    out.append(f"{t} {b}: {mine:.4g} > {best} {ref:.4g}")
        return out
