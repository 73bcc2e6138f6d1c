"""The per-VM curve the worker stores beside its score: downtime per future slot and the forecast behind it.

``zhuge api`` shows it (a VM's downtime over the next 24 h, the quantiles that
drive it) and the drain planner re-runs the downtime model from it at the link
share a plan gives each VM. One binary Redis string per VM,
``<prefix>curve:<vm>``, written in the same atomic step as the score hash (so a
curve never belongs to another sample than its score) with the same TTL.

Layout, version 1, little-endian (``_header`` then ``_body``)::

    magic "ZC1\\0" | t0 f8 (epoch s, start of slot 0) | slot_s u4 | T u2 | H u2
    | mem_mb f4 | wss_mb f4 (NaN: unknown) | factor f4 (learned downtime correction)
    | horizons u2[H] (model grid, slots after t0 - slot_s)
    | downtime_ms f2[T] (a migration started in slot t: the worst pause over the slots it covers,
      corrected; inf = does not converge)
    | forecast f2[H, 3 targets (cpu_pct, dirty_mbps, net_mbps), 2 quantiles (q50, q90)]

float16 keeps 3 significant digits (0.25 ms at 300 ms), enough for a chart and a
plan. At the defaults (T = 288 five-minute slots, H = 17) that is 32 + 34 + 576 +
204 = 846 bytes per VM: about 0.85 GB of values for a million VMs (plus Redis'
own ~70 bytes per key).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from gpu_kernels.features import QUANTILES, TARGETS

MAGIC = b"ZC1\x00"
_HEADER = np.dtype([("magic", "S4"), ("t0", "<f8"), ("slot_s", "<u4"), ("T", "<u2"), ("H", "<u2"),
                    ("mem_mb", "<f4"), ("wss_mb", "<f4"), ("factor", "<f4")])  # fmt: skip
_N_TARGETS, _N_QUANTILES = len(TARGETS), len(QUANTILES)


def _layout(n_slots: int, n_horizons: int) -> np.dtype:
    return np.dtype([
        ("header", _HEADER),
        ("horizons", "<u2", (n_horizons,)),
        ("downtime_ms", "<f2", (n_slots,)),
        ("forecast", "<f2", (n_horizons, _N_TARGETS, _N_QUANTILES)),
    ])  # fmt: skip


def encode_curves(
    t0: np.ndarray,
    slot_s: int,
    downtime_ms: np.ndarray,
    horizons: np.ndarray,
    forecast: np.ndarray,
    mem_mb: np.ndarray,
    wss_mb: np.ndarray | None = None,
    factor: np.ndarray | None = None,
) -> list[bytes]:
    """One blob per VM, built as one structured array (no per-VM Python beyond slicing the bytes).

    ``t0`` (k,) epoch s of slot 0; ``downtime_ms`` (k, T); ``horizons`` (H,) slots;
    ``forecast`` (k, H, 3, 2) as ``streams.scorer.forecast_grid`` gives it.
    """
    downtime_ms = np.asarray(downtime_ms)
    forecast = np.asarray(forecast)
    k, n_slots = downtime_ms.shape
    n_horizons = len(horizons)
    if forecast.shape != (k, n_horizons, _N_TARGETS, _N_QUANTILES):
        raise ValueError(f"forecast must be {(k, n_horizons, _N_TARGETS, _N_QUANTILES)}, got {forecast.shape}")
    rows = np.zeros(k, _layout(n_slots, n_horizons))
    head = rows["header"]
    head["magic"] = MAGIC
    head["t0"] = t0
    head["slot_s"] = slot_s
    head["T"], head["H"] = n_slots, n_horizons
    head["mem_mb"] = mem_mb
    head["wss_mb"] = np.nan if wss_mb is None else wss_mb
    head["factor"] = 1.0 if factor is None else factor
    rows["horizons"] = np.asarray(horizons, dtype=np.uint16)
    with np.errstate(over="ignore"):  # beyond float16's 65504 ms is inf: "does not converge" for a chart
        rows["downtime_ms"] = downtime_ms
        rows["forecast"] = forecast
    raw, size = rows.tobytes(), rows.dtype.itemsize
    return [raw[i * size : (i + 1) * size] for i in range(k)]


@dataclass(frozen=True)
class Curve:
    """A decoded curve; arrays are float32/float64 NumPy."""

    t0: float
    slot_s: int
    mem_mb: float
    wss_mb: float
    factor: float
    horizons: np.ndarray  # (H,) slots
    downtime_ms: np.ndarray  # (T,)
    forecast: np.ndarray  # (H, 3, 2)

    @property
    def slot_starts(self) -> np.ndarray:
        """Epoch s at which each downtime slot starts."""
        return self.t0 + self.slot_s * np.arange(len(self.downtime_ms), dtype=np.float64)

    @property
    def forecast_ts(self) -> np.ndarray:
        """Epoch s each forecast point stands for (horizon h = the slot ``h - 1`` after ``t0``)."""
        return self.t0 + self.slot_s * (self.horizons.astype(np.float64) - 1)

    def per_slot(self, target: str, quantile: float) -> np.ndarray:
        """One target's forecast quantile at every slot, as the scorer read it (``per_slot_quantiles``)."""
        from streams.scorer import interp_weights, per_slot_quantiles

        lo, hi, w = interp_weights(self.horizons, len(self.downtime_ms))
        q = per_slot_quantiles(self.forecast[None, :, TARGETS.index(target), :], lo, hi, w, np)[0]
        return q[:, QUANTILES.index(quantile)]

    def to_json(self) -> dict[str, Any]:
        """The API's ``curve`` object: lists of plain floats, non-finite values as null."""
        forecast = {
            target: {f"q{round(q * 100)}": _finite(self.forecast[:, t, j]) for j, q in enumerate(QUANTILES)}
            for t, target in enumerate(TARGETS)
        }
        return {
            "t0": self.t0,
            "slot_s": self.slot_s,
            "ts": self.slot_starts.tolist(),
            "downtime_ms": _finite(self.downtime_ms),
            "mem_mb": _finite(np.asarray([self.mem_mb]))[0],
            "wss_mb": _finite(np.asarray([self.wss_mb]))[0],
            "factor": self.factor,
            "forecast": {"ts": self.forecast_ts.tolist(), **forecast},
        }


def decode_curve(blob: bytes) -> Curve:
    """A curve from its bytes; ``ValueError`` for anything that is not a version-1 curve."""
    if len(blob) < _HEADER.itemsize or blob[:4] != MAGIC:
        raise ValueError("not a zhuge curve (version 1)")
    head = np.frombuffer(blob, _HEADER, count=1)[0]
    layout = _layout(int(head["T"]), int(head["H"]))
    if len(blob) != layout.itemsize:
        raise ValueError(f"curve is {len(blob)} bytes, its header says {layout.itemsize}")
    row = np.frombuffer(blob, layout, count=1)[0]
    return Curve(
        t0=float(head["t0"]),
        slot_s=int(head["slot_s"]),
        mem_mb=float(head["mem_mb"]),
        wss_mb=float(head["wss_mb"]),
        factor=float(head["factor"]),
        horizons=row["horizons"].astype(np.int64),
        downtime_ms=row["downtime_ms"].astype(np.float32),
        forecast=row["forecast"].astype(np.float32),
    )


def _finite(a: np.ndarray) -> list[float | None]:
    """Rounded floats for JSON, non-finite as None (vectorised: the API encodes ~400 values per request)."""
    values = np.round(np.asarray(a, dtype=np.float64), 3)
    out: list[float | None] = values.tolist()
    for i in np.flatnonzero(~np.isfinite(values)).tolist():
        out[i] = None
    return out
