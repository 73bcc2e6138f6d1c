"""Fit a model whose every choice is made inside its own training period.

The training range ``[start, end)`` is cut in two: the boosters are first fitted on labels
before ``val_start``; forecasts from origins in ``[val_start, end)`` (labels still before
``end``) are the validation split, on which ``training.blend.fit_blend`` picks, per target and
horizon, the combination with the naive forecasts and the q90 spread. The boosters are then
refitted on the whole range (``refit``) and served with that blend. Nothing after ``end`` is
read, so a test period after ``end`` is touched only by the backtest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from gpu_kernels.features import TARGETS
from training.blend import NAIVE, fit_blend
from training.dataset import Panel, panel_examples, sample_origins
from training.evaluate import BUCKETS, BacktestConfig, Progress, _noop, fit_model
from training.fit import BAND_EDGES_H

#: Share of the training range held out for validation (at least two horizons' worth of slots).
VAL_FRAC = 0.2


@dataclass(frozen=True)
class ValidationRange:
    start: int  # first training slot index
    val_start: int  # validation origins from here; the inner boosters' labels stop here
    end: int  # labels before this index

    def as_dict(self, panel: Panel, slot_s: int) -> dict[str, Any]:
        iso = lambda i: iso_utc((panel.first_slot + i) * slot_s)  # noqa: E731
        return {"train": [iso(self.start), iso(self.val_start)], "validation": [iso(self.val_start), iso(self.end)],
                "refit": [iso(self.start), iso(self.end)]}  # fmt: skip


def iso_utc(ts: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(float(ts), dt.timezone.utc).strftime("%Y-%m-%d %H:%M")


def validation_range(start: int, end: int, horizon_slots: int, window_slots: int, val_frac: float = VAL_FRAC) -> ValidationRange:
    """Where validation starts in ``[start, end)``; ValueError when the range cannot hold both parts."""
    val = max(int(round((end - start) * val_frac)), 2 * horizon_slots)
    val_start = end - val
    if val_start - start <= window_slots:
        raise ValueError(
            f"the training range ({end - start} slots) cannot hold a training part longer than one window "
            f"({window_slots}) and a validation part of {val} slots: trace too short"
        )
    return ValidationRange(start, val_start, end)


def fit_validated(
    panel: Panel,
    end: int,
    settings: Any,
    cfg: BacktestConfig,
    *,
    start: int = 0,
    refit: bool = True,
    progress: Progress = _noop,
) -> tuple[Any, dict[str, Any]]:
    """``(model, validation)``: a ``ForecastModel`` with its blend, and the validation report
    (splits, MAE per bucket and target of the boosters, the naive forecasts and the served blend)."""
    S, Hs, slot_s = settings.window_slots, settings.horizon_slots, settings.slot_s
    ranges = validation_range(start, end, Hs, S)
    progress("fit", 0.0)
    inner = fit_model(panel, ranges.val_start, settings, cfg, start=start)
    progress("fit", 0.4 if refit else 0.9)
    horizons = np.asarray(inner.horizons)
    every = max(1, cfg.train_origin_every)
    origins = sample_origins(end, ranges.val_start - 1, end - 1, every, np.random.default_rng(cfg.seed + 1))
    Xv, Yv = panel_examples(panel, origins, horizons, S, slot_s, end=end)
    if Xv.shape[0] == 0:
        raise ValueError("no validation example: the training range is too short")
    qv = np.asarray(inner.predict_boosters(Xv), dtype=np.float32)
    blend, per_h = fit_blend(qv, Xv, Yv, horizons, slot_s, BAND_EDGES_H)
    model = fit_model(panel, end, settings, cfg, start=start) if refit else inner
    model.blend = blend
    model.metrics["validation_rows"] = float(Xv.shape[0])
    progress("fit", 1.0)
    report = {"ranges": ranges.as_dict(panel, slot_s), "refit": refit, "rows": int(Xv.shape[0]),
              "mae": _bucket_table(per_h, slot_s), "blend": blend.as_dict()}  # fmt: skip
    return model, report


def _bucket_table(per_h: dict[str, list[dict[str, Any]]], slot_s: int) -> dict[str, dict[str, dict[str, float]]]:
    """Per target and bucket: mean over the bucket's grid horizons of each method's validation MAE."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for t in TARGETS:
        out[t] = {}
        for b, (lo, hi) in BUCKETS.items():
            rows = [r for r in per_h[t] if lo < r["h"] * slot_s <= hi]
            if rows:
                out[t][b] = {m: float(np.mean([r[m] for r in rows])) for m in ("model", "served", *NAIVE)}
    return out
