"""Naive forecasts the model must beat: last value, seasonal naive, rolling mean.

Every baseline maps a history block ``hist`` ``(n, S)`` (n series or origins,
S slots oldest -> newest, NaN gaps) and ``horizons`` ``(H,)`` in slots
(1 = next slot) to forecasts ``(n, H)``. All are vectorised over rows; a row
with no usable history gives NaN. AutoETS (statsforecast) is offered only when
that package is installed; it is slow and not part of the default evaluation.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from gpu_kernels.features import newest_observed

SLOTS_PER_DAY = 288  # 5-minute slots

Baseline = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _as_2d(hist: np.ndarray) -> np.ndarray:
    hist = np.asarray(hist, dtype=np.float64)
    if hist.ndim != 2:
        raise ValueError(f"history must be (n, S), got shape {hist.shape}")
    return hist


def last_valid(hist: np.ndarray) -> np.ndarray:
    """The newest non-NaN value of each row ``(n,)`` (NaN when the row has none)."""
    return newest_observed(_as_2d(hist))


def last_value(hist: np.ndarray, horizons: np.ndarray) -> np.ndarray:
    """Persistence: the newest observed value, flat over every horizon."""
    horizons = np.asarray(horizons)
    return np.repeat(last_valid(hist)[:, None], horizons.size, axis=1)


def seasonal_naive(hist: np.ndarray, horizons: np.ndarray, season: int = SLOTS_PER_DAY) -> np.ndarray:
    """The value one season (24 h) before the target slot; falls back to the last value on a gap.

    For horizons beyond one season the lag is the smallest whole number of
    seasons that reaches back into the history.
    """
    hist = _as_2d(hist)
    horizons = np.asarray(horizons, dtype=np.int64)
    if np.any(horizons < 1):
        raise ValueError("horizons are counted in slots from 1")
    s = hist.shape[1]
    lag = season * np.ceil(horizons / season).astype(np.int64)
    idx = s - 1 + horizons - lag  # index into the history of the same time of day
    out = np.full((hist.shape[0], horizons.size), np.nan)
    ok = idx >= 0
    out[:, ok] = hist[:, idx[ok]]
    fallback = np.broadcast_to(last_valid(hist)[:, None], out.shape)
    return np.where(np.isnan(out), fallback, out)


def rolling_mean(hist: np.ndarray, horizons: np.ndarray, span: int = SLOTS_PER_DAY) -> np.ndarray:
    """The mean of the last ``span`` slots (one day), flat over every horizon."""
    hist = _as_2d(hist)
    tail = hist[:, -span:]
    count = (~np.isnan(tail)).sum(axis=1)
    total = np.nansum(tail, axis=1)
    mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return np.repeat(mean[:, None], np.asarray(horizons).size, axis=1)


def auto_ets(hist: np.ndarray, horizons: np.ndarray, season: int = SLOTS_PER_DAY) -> np.ndarray:
    """statsforecast AutoETS per row (slow; only when statsforecast is installed)."""
    try:
        from statsforecast.models import AutoETS
    except ImportError as exc:  # pragma: no cover - optional
        raise RuntimeError("auto_ets needs the optional package statsforecast") from exc
    hist = _as_2d(hist)
    horizons = np.asarray(horizons, dtype=np.int64)
    out = np.full((hist.shape[0], horizons.size), np.nan)
    for i, row in enumerate(hist):  # one fit per series: inherent to ETS
        y = row[~np.isnan(row)]
        if y.size < 2 * season:
            continue
        fc = AutoETS(season_length=season).forecast(y=y, h=int(horizons.max()))["mean"]
        out[i] = fc[horizons - 1]
    return out


BASELINES: dict[str, Baseline] = {
    "last": last_value,
    "seasonal": seasonal_naive,
    "mean": rolling_mean,
}


def available_baselines(include_ets: bool = False) -> dict[str, Baseline]:
    """The default baselines, plus AutoETS when asked for and installed."""
    out = dict(BASELINES)
    if include_ets:
        try:
            import statsforecast  # noqa: F401
        except ImportError:
            return out
        out["ets"] = auto_ets
    return out
