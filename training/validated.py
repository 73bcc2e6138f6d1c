"""Fit a model whose every choice is made inside its own training period.

The last ``VAL_FRAC`` of the training range ``[start, end)`` is cut into up to ``VAL_FOLDS``
consecutive validation folds (forward chaining): for each fold, boosters fitted on labels before
the fold's start forecast from the fold's origins (labels still before ``end``). On all folds'
rows together ``training.blend.fit_blend`` picks, per target and horizon, the combination with
the naive forecasts and the q90 spread, with a standard error taken over VMs and over origin
days, and a multiplier of that standard error per target and horizon bucket checked forward
across the folds (``forward_se_scales``). Two blends are admissible on MAE (nearest the naive
forecasts, or with the most model weight within one standard error for what the window search
reads), and which dirty-rate quantile the window search reads (q90 or the median); the pair
served is chosen on the window regret of the folds' forecasts. The boosters are
then refitted on the whole range (``refit``) and served with that blend. Nothing after ``end``
is read, so a test period after ``end`` is touched only by the backtest.

Why several folds: with one three-day validation split the Bitbrains model kept weight at 24 h
that lost on the following days. Which forecast wins there changes from day to day, so the choice
needs many days, and a standard error that counts days, not rows. Why regret as well: with the
blend chosen on MAE alone, the Bitbrains dirty rate was persistence at every horizon, which
carries no timing, and window regret grew on the test days.

``zhuge evaluate`` (``fit_validated``; ``validate`` for ``--validation-only``, which also scores
the boosters alone) and ``zhuge retrain`` (through ``choose_blend`` with its Dask fit)
share this code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from gpu_kernels.accuracy import BUCKET_NAMES, bucket_index
from gpu_kernels.features import DAY_S, FEATURE_NAMES, TARGETS
from training.blend import NAIVE, WINDOW_QUANTILES, Blend, apply_blend, fit_blend, one_se_choice
from training.dataset import Panel, panel_examples, sample_origins
from training.evaluate import BacktestConfig, Progress, _noop, backtest, fit_model
from training.fit import BAND_EDGES_H

#: Share of the training range the validation folds cover together (at least two horizons' worth).
VAL_FRAC = 0.4
#: Validation folds (fewer when the validation part is shorter than this many horizons).
VAL_FOLDS = 3
#: Slots between validation origins (1 h of 5-min slots): rows enough, memory bounded.
VAL_ORIGIN_EVERY = 12
#: Slots between the origins window regret is scored from on the folds (a backtest of 500 VMs
#: over a week at this spacing takes seconds).
REGRET_ORIGIN_EVERY = 12
#: What the window search reads (``streams.scorer.score_windows``: the dirty rate's median and
#: q90, the network's q90).
WINDOW_TARGETS: tuple[str, ...] = ("dirty_mbps", "net_mbps")
#: The blends admissible on MAE, in order of preference (name -> targets given the most model
#: weight within one standard error, ``training.blend.fit_blend``'s ``lean_model``).
CANDIDATES: dict[str, tuple[str, ...]] = {"nearest naive": (), "model shape for windows": WINDOW_TARGETS}
#: Multipliers of the blend rule's standard error, most cautious first (``forward_se_scales``):
#: 1 is the one-standard-error rule, 0 takes the lowest validation MAE.
SE_SCALES: tuple[float, ...] = (1.0, 0.0)


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
    references: Mapping[str, Blend | None] | None = None,
) -> tuple[Blend, dict[str, Any]]:
    """The blend chosen on the plan's folds, and its report. ``fit_before(slot)`` returns a
    ``ForecastModel`` whose boosters saw labels before ``slot`` only.

    Two blends are admissible on MAE (``fit_blend``): nearest the naive forecasts, and with the
    most model weight within one standard error for ``WINDOW_TARGETS``. Each fold's boosters then
    choose migration windows from the fold's origins with each blend, its window search reading
    each of ``WINDOW_QUANTILES`` of the dirty rate; by the one-standard-error rule on window regret
    (by VM and by day), the first of (nearest naive, q90), (model shape, q90), (nearest naive, q50),
    (model shape, q50) within one standard error of the best is served. ``references`` (name ->
    blend, None: the boosters alone) are scored beside them and never chosen (``validate``).

    Why the median as a candidate: the q90 of a bursty VM's dirty rate is high at every future
    slot, so the downtime it gives is flat and the search starts at once; on the Bitbrains
    validation folds the best pair on the median had a quarter less regret than the best on q90.
    """
    from training.model import default_horizons

    S, slot_s = settings.window_slots, settings.slot_s
    horizons = default_horizons(settings.horizon_slots)
    rng = np.random.default_rng(seed + 1)
    parts, folds, models = [], [], []
    for k, (a, b) in enumerate(plan.fold_ranges()):
        progress("validate", k / len(plan.folds))
        models.append(fit_before(a))
        origins = sample_origins(plan.end, a - 1, b - 1, VAL_ORIGIN_EVERY, rng)
        X, Y, vm, origin = panel_examples(panel, origins, horizons, S, slot_s, end=plan.end, with_index=True)
        parts.append((X, Y, np.asarray(models[-1].predict_boosters(X), dtype=np.float32), vm, origin))
        folds.append(int(X.shape[0]))
    X, Y, q, vm, origin = (np.concatenate(a) for a in zip(*parts))
    if X.shape[0] == 0:
        raise ValueError("no validation example: the training range is too short")
    day = _day_of(panel, origin, slot_s)
    fold = np.repeat(np.arange(len(folds)), folds)
    groups = {"vm": vm, "day": day}
    scales, rule = forward_se_scales(q, X, Y, fold, groups, horizons, slot_s)
    fits = {name: fit_blend(q, X, Y, horizons, slot_s, BAND_EDGES_H, groups=groups, lean_model=lean, se_scale=scales)
            for name, lean in CANDIDATES.items()}  # fmt: skip
    progress("validate", 1.0)
    windows = {window_label(name, wq): (name, replace(blend, window_quantile=wq))
               for wq in WINDOW_QUANTILES for name, (blend, _) in fits.items()}  # in order of preference
    scored = {label: blend for label, (_, blend) in windows.items()} | dict(references or {})
    regret = fold_regret(panel, plan, models, scored, settings, progress)
    rows = np.stack([regret.rows[label] for label in windows])
    paired = np.isfinite(rows).all(axis=0)
    at = regret.at[paired]
    pick = one_se_choice(rows[:, paired], [at[:, 0], _day_of(panel, at[:, 1], slot_s)]) if paired.any() else 0
    choice = list(windows)[pick]
    name, blend = windows[choice]
    report = {"ranges": plan.as_dict(panel, slot_s), "rows": int(X.shape[0]), "fold_rows": folds,
              "days": int(np.unique(day).size), "mae": _bucket_table(fits[name][1], slot_s), "blend": blend.as_dict(),
              "regret_ms": regret.summary, "window_choice": choice, "window_quantile": blend.window_quantile,
              "se_rule": rule}  # fmt: skip
    return blend, report


def window_label(blend_name: str, window_quantile: float) -> str:
    """A window candidate's name in reports: the blend and the dirty-rate quantile its window search reads."""
    return f"{blend_name}, q{round(window_quantile * 100)}"


def forward_se_scales(
    q: np.ndarray, X: np.ndarray, Y: np.ndarray, fold: np.ndarray, groups: Mapping[str, np.ndarray],
    horizons: tuple[int, ...], slot_s: int,
) -> tuple[dict[str, list[float]], dict[str, Any]]:  # fmt: skip
    """Per target and grid horizon, the multiplier of ``SE_SCALES`` the blend rule uses, and a report.

    Why: the one-standard-error rule is cautious by design, and on Bitbrains it gave the model
    no weight beyond 1.5 h where the boosters were 5 % ahead of persistence on the validation
    folds. Whether that caution pays is checked inside the training range, forward: for each
    fold k >= 1, blends fitted with each multiplier on the folds before k serve fold k (forecast
    by the boosters fitted before it). Per target and horizon bucket the multiplier with the
    lowest MAE summed over those folds is taken, the most cautious one on a tie, and the most
    cautious everywhere with a single fold or no row in a bucket. ``fold (n,)``: each row's fold.
    """
    B = len(BUCKET_NAMES)
    row_bucket = bucket_index(X[:, FEATURE_NAMES.index("horizon_h")].astype(np.float64) * 3600.0)
    sums = np.zeros((len(TARGETS), B, len(SE_SCALES)))
    counts = np.zeros((len(TARGETS), B))
    for k in range(1, int(fold.max(initial=0)) + 1):
        before, at = fold < k, fold == k
        sub = {name: labels[before] for name, labels in groups.items()}
        for i, scale in enumerate(SE_SCALES):
            per_h = {t: [scale] * len(horizons) for t in TARGETS}
            blend, _ = fit_blend(q[before], X[before], Y[before], horizons, slot_s, BAND_EDGES_H, groups=sub, se_scale=per_h)
            err = np.abs(apply_blend(q[at], X[at], blend, slot_s, BAND_EDGES_H)[:, :, 0] - Y[at])
            for j in range(len(TARGETS)):
                ok = np.isfinite(err[:, j]) & (row_bucket[at] >= 0)
                sums[j, :, i] += np.bincount(row_bucket[at][ok], err[ok, j], minlength=B)
                if i == 0:
                    counts[j] += np.bincount(row_bucket[at][ok], minlength=B)
    mae = sums / np.maximum(counts, 1)[:, :, None]
    near_best = mae <= mae.min(axis=2, keepdims=True) * (1 + 1e-6)  # a tie up to float rounding
    pick = np.where(counts > 0, np.argmax(near_best, axis=2), 0)  # the first (most cautious) of the best
    grid_bucket = bucket_index(np.asarray(horizons, dtype=np.float64) * slot_s)
    scales = {t: [SE_SCALES[pick[j, b]] if b >= 0 else SE_SCALES[0] for b in grid_bucket] for j, t in enumerate(TARGETS)}
    report = {"scales": list(SE_SCALES), "forward_rows": {t: {b: int(counts[j, i]) for i, b in enumerate(BUCKET_NAMES)} for j, t in enumerate(TARGETS)},
              "forward_mae": {t: {b: [float(v) for v in mae[j, i]] for i, b in enumerate(BUCKET_NAMES)} for j, t in enumerate(TARGETS)},
              "chosen": {t: {b: SE_SCALES[pick[j, i]] for i, b in enumerate(BUCKET_NAMES)} for j, t in enumerate(TARGETS)}}  # fmt: skip
    return scales, report


def _day_of(panel: Panel, slots: np.ndarray, slot_s: int) -> np.ndarray:
    """The UTC day of each slot index: the clusters of the one-standard-error rule."""
    return (panel.first_slot + slots) * slot_s // DAY_S


@dataclass(frozen=True)
class FoldRegret:
    """Window regret on the validation folds: ``rows[name]`` (n,) ms per origin with a best window
    (inf: the chosen window's cost is unknown), the same origins for every name; ``at`` (n, 2) their
    VM index and origin slot; ``summary[name]``: mean regret of that forecast, of "now", of the
    seasonal choice, and the origins scored."""

    rows: dict[str, np.ndarray]
    at: np.ndarray
    summary: dict[str, dict[str, float]]


def fold_regret(
    panel: Panel, plan: ValidationPlan, models: Sequence[Any], blends: Mapping[str, Blend | None], settings: Any,
    progress: Progress = _noop,
) -> FoldRegret:  # fmt: skip
    """Each fold's boosters (``models[k]``, fitted before fold k) with each blend choose windows from
    the fold's origins (every ``REGRET_ORIGIN_EVERY`` slots, whole futures before ``plan.end``)."""
    cfg = BacktestConfig(test_origin_every=REGRET_ORIGIN_EVERY)
    rows: dict[str, list[np.ndarray]] = {name: [] for name in blends}
    base: dict[str, list[np.ndarray]] = {"now": [], "seasonal": [], "seasonal served": []}
    served: dict[str, list[np.ndarray]] = {name: [] for name in blends}
    at: list[np.ndarray] = []
    for i, (name, blend) in enumerate(blends.items()):
        progress("validation regret", i / len(blends))
        twin = next((n for n in list(blends)[:i] if blends[n] == blend), None)
        if twin is not None:  # the same blend (both ends of the admissible weights agree): the same windows
            rows[name] = rows[twin]
            served[name] = served[twin]
            continue
        for (a, b), model in zip(plan.fold_ranges(), models):
            end = min(b + settings.horizon_slots, plan.end)  # origins before b, futures before plan.end
            res = backtest(panel, replace(model, blend=blend), a, settings, cfg, end=end)
            rows[name].append(res.regret_rows["model"])
            served[name].append(res.regret_rows["served"])
            if i == 0:
                at.append(res.regret_at)
                for k in base:
                    base[k].append(res.regret_rows[k])
    progress("validation regret", 1.0)
    out = {k: np.concatenate(v) for k, v in (rows | base).items()}
    out_served = {k: np.concatenate(v) for k, v in served.items()}
    mean = lambda v: float(np.mean(v[np.isfinite(v)])) if np.isfinite(v).any() else float("nan")  # noqa: E731
    summary = {name: {"model": mean(out[name]), "now": mean(out["now"]), "seasonal": mean(out["seasonal"]),
                      "served": mean(out_served[name]), "seasonal served": mean(out["seasonal served"]),
                      "origins": float(np.isfinite(out[name]).sum())} for name in blends}  # fmt: skip
    return FoldRegret({name: out[name] for name in blends}, np.concatenate(at), summary)


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
    blend, report = choose_blend(panel, plan, settings, _fitter(panel, settings, cfg, start), seed=cfg.seed, progress=progress)
    progress("fit", 0.0)
    model = fit_model(panel, end, settings, cfg, start=start)
    model.blend = blend
    model.metrics["validation_rows"] = float(report["rows"])
    progress("fit", 1.0)
    return model, report


def validate(
    panel: Panel, end: int, settings: Any, cfg: BacktestConfig, *, start: int = 0, progress: Progress = _noop
) -> dict[str, Any]:
    """``zhuge evaluate --validation-only``: the validation report (no refit, nothing after ``end``
    read): the splits, MAE per bucket, and ``regret_ms``, the window regret on the folds of each
    candidate blend (``window_choice`` says which is served) and of the boosters alone. The
    blends were chosen on these same rows, so their figures here are in-sample."""
    plan = validation_plan(start, end, settings.horizon_slots, settings.window_slots)
    _, report = choose_blend(panel, plan, settings, _fitter(panel, settings, cfg, start), seed=cfg.seed, progress=progress,
                             references={"boosters alone": None})  # fmt: skip
    return report


def _fitter(panel: Panel, settings: Any, cfg: BacktestConfig, start: int) -> Callable[[int], Any]:
    """``fit_before`` for ``choose_blend``: boosters fitted on ``panel`` from ``start`` to a slot."""
    return lambda slot: fit_model(panel, slot, settings, cfg, start=start)


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
