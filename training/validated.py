"""Fit a model whose every choice is made inside its own training period.

The last ``VAL_FRAC`` of the training range ``[start, end)`` is cut into up to ``VAL_FOLDS``
consecutive validation folds (forward chaining): for each fold, boosters fitted on labels before
the fold's start forecast from the fold's origins (labels still before ``end``). On all folds'
rows together ``training.blend.fit_blend`` picks, per target and horizon, the combination with
the naive forecasts and the q90 spread, with a standard error taken over VMs and over origin
days. The boosters are then refitted on the whole range (``refit``) and served with that blend.
Nothing after ``end`` is read, so a test period after ``end`` is touched only by the backtest.

Why several folds: with one three-day validation split the Bitbrains model kept weight at 24 h
that lost on the following days. Which forecast wins there changes from day to day, so the choice
needs many days, and a standard error that counts days, not rows.

``zhuge evaluate`` (``fit_validated``; ``validate`` for ``--validation-only``, which also scores
window regret on the folds) and ``zhuge retrain`` (through ``choose_blend`` with its Dask fit)
share this code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from gpu_kernels.accuracy import BUCKET_NAMES, bucket_index
from gpu_kernels.features import DAY_S, TARGETS
from training.blend import NAIVE, Blend, fit_blend
from training.dataset import Panel, panel_examples, sample_origins
from training.evaluate import BacktestConfig, Progress, _noop, fit_model
from training.fit import BAND_EDGES_H

#: Share of the training range the validation folds cover together (at least two horizons' worth).
VAL_FRAC = 0.4
#: Validation folds (fewer when the validation part is shorter than this many horizons).
VAL_FOLDS = 3
#: Slots between validation origins (1 h of 5-min slots): rows enough, memory bounded.
VAL_ORIGIN_EVERY = 12


@dataclass(frozen=True)
class ValidationPlan:
    """Slot indexes: training from ``start``; fold k's origins from ``folds[k]`` to the next fold's
    start (the last fold's to ``end``), forecast by boosters fitted on labels before ``folds[k]``;
    every label before ``end``."""

    start: int
    folds: tuple[int, ...]
    end: int

    @property
    def val_start(self) -> int:
        return self.folds[0]

    def fold_ranges(self) -> list[tuple[int, int]]:
        bounds = (*self.folds, self.end)
        return list(zip(bounds[:-1], bounds[1:]))

    def as_dict(self, panel: Panel, slot_s: int) -> dict[str, Any]:
        iso = lambda i: iso_utc((panel.first_slot + i) * slot_s)  # noqa: E731
        return {"train": [iso(self.start), iso(self.val_start)], "validation": [iso(self.val_start), iso(self.end)],
                "validation_folds": [[iso(a), iso(b)] for a, b in self.fold_ranges()],
                "refit": [iso(self.start), iso(self.end)]}  # fmt: skip


def iso_utc(ts: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(float(ts), dt.timezone.utc).strftime("%Y-%m-%d %H:%M")


def validation_plan(
    start: int, end: int, horizon_slots: int, window_slots: int, val_frac: float = VAL_FRAC, folds: int = VAL_FOLDS
) -> ValidationPlan:
    """The folds in ``[start, end)``; ValueError when the range cannot hold a training part
    longer than one window before them."""
    val = max(int(round((end - start) * val_frac)), 2 * horizon_slots)
    val_start = end - val
    if val_start - start <= window_slots:
        raise ValueError(
            f"the training range ({end - start} slots) cannot hold a training part longer than one window "
            f"({window_slots}) and a validation part of {val} slots: trace too short"
        )
    k = max(1, min(folds, val // max(horizon_slots, 1)))
    return ValidationPlan(start, tuple(int(val_start + i * val // k) for i in range(k)), end)


def choose_blend(
    panel: Panel,
    plan: ValidationPlan,
    settings: Any,
    fit_before: Callable[[int], Any],
    *,
    seed: int = 0,
    progress: Progress = _noop,
) -> tuple[Blend, dict[str, Any]]:
    """The blend chosen on the plan's folds, and its report. ``fit_before(slot)`` returns a
    ``ForecastModel`` whose boosters saw labels before ``slot`` only."""
    from training.model import default_horizons

    S, slot_s = settings.window_slots, settings.slot_s
    horizons = default_horizons(settings.horizon_slots)
    rng = np.random.default_rng(seed + 1)
    parts, folds = [], []
    for k, (a, b) in enumerate(plan.fold_ranges()):
        progress("validate", k / len(plan.folds))
        inner = fit_before(a)
        origins = sample_origins(plan.end, a - 1, b - 1, VAL_ORIGIN_EVERY, rng)
        X, Y, vm, origin = panel_examples(panel, origins, horizons, S, slot_s, end=plan.end, with_index=True)
        parts.append((X, Y, np.asarray(inner.predict_boosters(X), dtype=np.float32), vm, origin))
        folds.append(int(X.shape[0]))
    X, Y, q, vm, origin = (np.concatenate(a) for a in zip(*parts))
    if X.shape[0] == 0:
        raise ValueError("no validation example: the training range is too short")
    day = (panel.first_slot + origin) * slot_s // DAY_S
    blend, per_h = fit_blend(q, X, Y, horizons, slot_s, BAND_EDGES_H, groups={"vm": vm, "day": day})
    progress("validate", 1.0)
    report = {"ranges": plan.as_dict(panel, slot_s), "rows": int(X.shape[0]), "fold_rows": folds,
              "days": int(np.unique(day).size), "mae": _bucket_table(per_h, slot_s), "blend": blend.as_dict()}  # fmt: skip
    return blend, report


def fit_validated(
    panel: Panel,
    end: int,
    settings: Any,
    cfg: BacktestConfig,
    *,
    start: int = 0,
    progress: Progress = _noop,
) -> tuple[Any, dict[str, Any]]:
    """``(model, validation)``: a ``ForecastModel`` refitted on ``[start, end)`` with its blend, and
    the validation report (splits, MAE per bucket and target of the boosters, the naive forecasts
    and the served blend)."""
    plan = validation_plan(start, end, settings.horizon_slots, settings.window_slots)
    blend, report = choose_blend(panel, plan, settings, lambda slot: fit_model(panel, slot, settings, cfg, start=start),
                                 seed=cfg.seed, progress=progress)  # fmt: skip
    progress("fit", 0.0)
    model = fit_model(panel, end, settings, cfg, start=start)
    model.blend = blend
    model.metrics["validation_rows"] = float(report["rows"])
    progress("fit", 1.0)
    return model, report


#: What ``validate`` scores besides the served blend (name -> targets whose median is left to the boosters).
REGRET_VARIANTS: dict[str, tuple[str, ...]] = {
    "dirty rate from the boosters": ("dirty_mbps",),
    "boosters alone": TARGETS,
}


def validate(
    panel: Panel, end: int, settings: Any, cfg: BacktestConfig, *, start: int = 0, progress: Progress = _noop
) -> dict[str, Any]:
    """``zhuge evaluate --validation-only``: the validation report (no refit, nothing after ``end``
    read), plus ``regret_ms``: the window regret over the validation folds (origins from the first
    fold on, whole futures before ``end``) of the served blend and of ``REGRET_VARIANTS``, all with
    the boosters fitted before the first fold.

    Why: the blend is chosen on MAE, but migration windows are chosen on the shape of the forecast.
    On Bitbrains the blend left the dirty rate to persistence at every horizon, which carries no
    timing, and window regret grew on the test days. This shows that trade-off where choices may
    be made. The blend was chosen on these same rows, so its MAE here is in-sample, not its regret.
    """
    from training.evaluate import backtest

    plan = validation_plan(start, end, settings.horizon_slots, settings.window_slots)
    inner: list[Any] = []

    def fit_before(slot: int) -> Any:
        inner.append(fit_model(panel, slot, settings, cfg, start=start))
        return inner[-1]

    blend, report = choose_blend(panel, plan, settings, fit_before, seed=cfg.seed, progress=progress)
    first = inner[0]
    regret: dict[str, dict[str, float]] = {}
    for name, boosters_for in {"served": (), **REGRET_VARIANTS}.items():
        progress("validation regret", len(regret) / (len(REGRET_VARIANTS) + 1))
        first.blend = None if set(boosters_for) == set(TARGETS) else Blend(
            blend.horizons, {t: (1.0,) * len(blend.horizons) if t in boosters_for else w for t, w in blend.weight.items()},
            blend.naive, blend.spread,
        )  # fmt: skip
        res = backtest(panel, first, plan.val_start, settings, cfg, end=plan.end)
        regret[name] = {k: float(v) for k, v in res.summary["regret_ms"].items()}
        regret[name]["origins"] = float(res.summary["n_origins"])
    progress("validation regret", 1.0)
    report["regret_ms"] = regret
    return report


def _bucket_table(per_h: dict[str, list[dict[str, Any]]], slot_s: int) -> dict[str, dict[str, dict[str, float]]]:
    """Per target and bucket: mean over the bucket's grid horizons of each method's validation MAE."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for t in TARGETS:
        out[t] = {}
        bucket = bucket_index(np.asarray([r["h"] for r in per_h[t]], dtype=np.int64) * slot_s)
        for i, b in enumerate(BUCKET_NAMES):
            rows = [r for r, k in zip(per_h[t], bucket) if k == i]
            if rows:
                out[t][b] = {m: float(np.mean([r[m] for r in rows])) for m in ("model", "served", *NAIVE)}
    return out
