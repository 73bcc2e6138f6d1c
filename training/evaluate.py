"""Rolling-origin backtest of the forecaster against naive baselines, plus window regret.

Protocol (README "Evaluation and retraining"):
- split the trace's common time axis at ``train_frac`` (default 65 %): the model
  is fitted only on labels before the split (origins every ``train_origin_every``
  slots with a random phase, rows subsampled to ``max_train_rows``);
- test origins every ``test_origin_every`` slots (6 h) after the split, per VM,
  each with the full 24 h future inside the trace;
- forecasts are made on the model's horizon grid (``training.model.default_horizons``);
  horizon buckets are the grid points inside (0, 1 h], (1 h, 6 h] and (6 h, 24 h],
  each grid point weighted equally. MAE is on ``cpu_pct`` (every trace has it; the
  other targets are reported under ``mae_by_target``), on (origin, horizon) pairs where
  the actual, the model and every baseline are all defined;
- MASE divides each error by the VM's in-sample (training part) seasonal-naive MAE;
- ``coverage_q90``: share of actual ``cpu_pct`` values at or below the model's q90;
- window regret per origin: the downtime actually incurred (pre-copy model on the
  actual future dirty rate and network, the scorer's bandwidth rule) at the window each
  method chose, minus the best possible window. The model chooses through the serving
  code (``streams.scorer.score_windows``); "now" starts at the first slot; "seasonal"
  runs the same window search on seasonal-naive dirty/net forecasts.
CPU-only traces (Azure, PlanetLab) have no memory size: ``default_mem_mb`` stands in,
and the dirty rate is the documented proxy of the CPU (``dirty_rate_proxy``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from gpu_kernels.accuracy import BUCKETS  # one definition: the worker's live accuracy uses the same buckets
from training.baselines import BASELINES, last_valid, rolling_mean, seasonal_naive
from training.dataset import CHANNELS, Panel, panel_examples, sample_origins
from training.fit import TrainingKnobs

METHODS = ("model", *BASELINES)
Progress = Callable[[str, float], None]  # (phase, fraction done)


@dataclass(frozen=True)
class BacktestConfig(TrainingKnobs):
    """The knobs of one backtest (defaults keep a full Bitbrains run within minutes on 2 cores)."""

    train_frac: float = 0.65
    test_origin_every: int = 72  # 6 h of 5-min slots
    train_origin_every: int = 6  # 30 min
    max_train_rows: int = 200_000
    nthread: int | None = None


@dataclass
class BacktestResult:
    summary: dict[str, Any]
    # paired per origin with a best window (inf: the chosen window's cost is unknown): method -> (n,) ms,
    # and each row's VM index and origin slot, (n, 2); what ``training.validated`` compares blends on
    regret_rows: dict[str, np.ndarray] = field(default_factory=dict)
    regret_at: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))
    abs_err_by_h: dict[str, np.ndarray] = field(default_factory=dict)  # method -> (H,) cpu MAE
    horizons_h: np.ndarray = field(default_factory=lambda: np.zeros(0))
    examples: list[dict[str, Any]] = field(default_factory=list)  # a few forecasts for plots

    @property
    def regret(self) -> dict[str, np.ndarray]:
        """Method -> (n_origins,) ms: the origins whose chosen window has a known cost."""
        return known_regret(self.regret_rows)


def known_regret(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per method, the regrets whose chosen window has a known cost (finite)."""
    return {k: v[np.isfinite(v)] for k, v in rows.items()}


def _noop(phase: str, frac: float) -> None:
    return None


def split_index(panel: Panel, train_frac: float) -> int:
    if not 0.1 <= train_frac <= 0.95:
        raise ValueError("train_frac must lie in [0.1, 0.95]")
    return int(round(panel.n_slots * train_frac))


def fit_model(
    panel: Panel, end: int, settings: Any, cfg: BacktestConfig, *, start: int = 0, dask_client: Any = None
) -> Any:
    """Fit a ``ForecastModel`` on labels in slot indexes ``[start, end)`` (in-process, or on Dask)."""
    from training.fit import fit_forecaster
    from training.model import ForecastModel, default_horizons

    tic = time.perf_counter()
    S, slot_s = settings.window_slots, settings.slot_s
    horizons = default_horizons(settings.horizon_slots)
    rng = np.random.default_rng(cfg.seed)
    origins = sample_origins(end, max(S // 2, start), end - 1, cfg.train_origin_every, rng)
    X, Y = panel_examples(panel, origins, horizons, S, slot_s, end=end)
    if X.shape[0] == 0:
        raise ValueError("no training example before the split: the trace is too short")
    if X.shape[0] > cfg.max_train_rows:
        keep = np.sort(rng.choice(X.shape[0], cfg.max_train_rows, replace=False))
        X, Y = X[keep], Y[keep]
    boosters = fit_forecaster(
        X, Y, n_estimators=cfg.n_estimators, max_depth=cfg.max_depth, learning_rate=cfg.learning_rate,
        device="cpu", dask_client=dask_client, nthread=cfg.nthread, seed=cfg.seed,
    )  # fmt: skip
    first = panel.first_slot * slot_s
    return ForecastModel(
        version="backtest",
        boosters=boosters,
        horizons=horizons,
        slot_s=slot_s,
        training_range=(int(first + start * slot_s), int(first + (end - 1) * slot_s)),
        metrics={"rows": float(X.shape[0]), "fit_s": round(time.perf_counter() - tic, 3)},
    )


# --- downtime of a known future ------------------------------------------------------


def _fill_time(x: np.ndarray) -> np.ndarray:
    """Forward- then backward-fill NaN along the last axis (gaps in the actual future)."""
    import pandas as pd

    df = pd.DataFrame(x.T)
    return df.ffill().bfill().to_numpy(dtype=np.float32).T


def downtime_curve(
    dirty: np.ndarray, net: np.ndarray, mem: np.ndarray, settings: Any
) -> tuple[np.ndarray, np.ndarray]:
    """Per-slot downtime (ms) and migration length (slots) with the scorer's bandwidth rule."""
    from gpu_kernels.downtime import PrecopyParams, precopy_with
    from streams.scorer import BW_FLOOR_FRACTION

    params = PrecopyParams.from_settings(settings)
    link = np.float32(params.link_mbps)
    bw = np.maximum(link - np.nan_to_num(net, nan=0.0), BW_FLOOR_FRACTION * link)
    pc = precopy_with(params, mem[:, None].astype(np.float32), np.maximum(dirty, 0).astype(np.float32), bw, np)
    dur = np.clip(np.ceil(np.nan_to_num(pc.duration_s, nan=settings.slot_s) / settings.slot_s), 1, dirty.shape[1])
    return pc.downtime_ms, dur.astype(np.int64)


def window_costs(downtime: np.ndarray, dur_slots: np.ndarray) -> np.ndarray:
    """Cost of starting at each slot: the worst downtime over the slots the migration covers."""
    from gpu_kernels.window import window_max

    return window_max(np.where(np.isnan(downtime), np.inf, downtime), dur_slots, np)


def regret_of(costs: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Incurred minus best cost per row, ``costs (n, T)`` actual window costs, ``starts (n,)``;
    NaN where no window has a finite cost."""
    best = costs.min(axis=1)
    chosen = np.take_along_axis(costs, np.asarray(starts, dtype=np.int64)[:, None], axis=1)[:, 0]
    with np.errstate(invalid="ignore"):  # inf - inf
        return chosen - best


# --- the backtest ---------------------------------------------------------------------


def backtest(
    panel: Panel,
    model: Any,
    split: int,
    settings: Any,
    cfg: BacktestConfig,
    progress: Progress = _noop,
    end: int | None = None,
) -> BacktestResult:
    """Score ``model`` and the baselines from origins after ``split`` whose full horizon ends
    before ``end`` (default: the end of the trace; see module doc)."""
    from gpu_kernels.downtime import PrecopyParams
    from gpu_kernels.features import TARGETS, build_features, profiles_at, weeklies_at, windows_at
    from gpu_kernels.window import WindowPolicy, best_window, recommended_window
    from streams.scorer import score_windows

    S, Hs, slot_s = settings.window_slots, settings.horizon_slots, settings.slot_s
    horizons = np.asarray(model.horizons, dtype=np.int64)
    H = horizons.size
    hours = horizons * slot_s
    T = panel.n_slots if end is None else min(end, panel.n_slots)
    origins = np.arange(split - 1, T - Hs, cfg.test_origin_every, dtype=np.int64)
    if origins.size == 0:
        raise ValueError("no test origin with a full horizon after the split: the trace is too short")
    params = PrecopyParams.from_settings(settings)
    c_cpu, c_dirty, c_net, c_mem = (CHANNELS.index(c) for c in ("cpu_pct", "dirty_mbps", "net_mbps", "mem_used_mb"))
    t_cpu = TARGETS.index("cpu_pct")

    # in-sample seasonal-naive MAE of cpu per VM (the MASE scale)
    day = 86400 // slot_s
    baselines = {"last": BASELINES["last"], "seasonal": partial(seasonal_naive, season=day), "mean": partial(rolling_mean, span=day)}
    tr = panel.series[:, : split if split > 2 * day else T, c_cpu]  # too short a past (another trace): the test part
    diff = np.abs(tr[:, day:] - tr[:, :-day]) if tr.shape[1] > day else np.full((len(panel.vms), 0), np.nan)
    n_ok = np.isfinite(diff).sum(axis=1)
    scale = np.where(n_ok > 0, np.nansum(diff, axis=1) / np.maximum(n_ok, 1), np.nan)

    methods = METHODS
    err_sum = {m: np.zeros((len(TARGETS), H)) for m in methods}
    err_n = np.zeros((len(TARGETS), H))
    sc_sum = {m: np.zeros(H) for m in methods}
    sc_n = np.zeros(H)
    cov_hit = np.zeros((len(TARGETS), H))
    cov_n = np.zeros((len(TARGETS), H))
    regrets: dict[str, list[np.ndarray]] = {"model": [], "now": [], "seasonal": [], "served": [], "seasonal served": []}
    policy = WindowPolicy.from_settings(settings)
    regret_at: list[np.ndarray] = []
    examples: list[dict[str, Any]] = []
    n_rows = 0
    chunk = max(1, 4096 // max(1, origins.size))
    for lo in range(0, len(panel.vms), chunk):
        idx = np.arange(lo, min(lo + chunk, len(panel.vms)))
        v = idx.size
        win = windows_at(panel.series[idx], origins, S)  # (v * n_o, S, C), VM-major
        prof = profiles_at(panel.series[idx], panel.first_slot, origins, S, slot_s)
        week = weeklies_at(panel.series[idx], panel.first_slot, origins, S, slot_s)
        vm_of = np.repeat(idx, origins.size)
        org = np.tile(origins, v)
        alive = ~np.isnan(win[:, -12:, c_cpu]).all(axis=1)  # an observation in the last hour
        win, prof, week, vm_of, org = win[alive], prof[alive], week[alive], vm_of[alive], org[alive]
        n = win.shape[0]
        if n == 0:
            progress("backtest", idx[-1] / len(panel.vms))
            continue
        n_rows += n
        attrs = {"mem_total_mb": panel.mem_total_mb[vm_of], "vcpus": panel.vcpus[vm_of], "last_slot": org + panel.first_slot,
                 "profile": prof, "week": week}  # fmt: skip
        X = build_features(win, attrs, attrs["last_slot"], horizons, slot_s, np, profile=prof, week=week)
        pred = np.asarray(model.predict(X), dtype=np.float32).reshape(n, H, len(TARGETS), 2)
        actual = panel.series[vm_of[:, None], org[:, None] + horizons[None, :]]  # (n, H, C)
        for j, target in enumerate(TARGETS):
            c = CHANNELS.index(target)
            hist = win[:, :, c]
            fc = {"model": pred[:, :, j, 0]} | {m: f(hist, horizons) for m, f in baselines.items()}
            y = actual[:, :, c]
            ok = np.isfinite(y)
            for f in fc.values():
                ok &= np.isfinite(f)
            err_n[j] += ok.sum(axis=0)
            for m, f in fc.items():
                err_sum[m][j] += np.where(ok, np.abs(f - y), 0).sum(axis=0)
            okq = np.isfinite(y) & np.isfinite(pred[:, :, j, 1])
            cov_hit[j] += (okq & (y <= pred[:, :, j, 1])).sum(axis=0)
            cov_n[j] += okq.sum(axis=0)
            if j == t_cpu:
                s = scale[vm_of][:, None]
                oks = ok & np.isfinite(s) & (s > 0)
                sc_n += oks.sum(axis=0)
                for m, f in fc.items():
                    sc_sum[m] += np.where(oks, np.abs(f - y) / np.where(oks, s, 1), 0).sum(axis=0)
                if len(examples) < 4:
                    pick = int(np.argmax(np.nanstd(hist, axis=1)))
                    fut = panel.series[vm_of[pick], org[pick] + 1 : org[pick] + 1 + Hs, c]
                    examples.append({
                        "vm": panel.vms[vm_of[pick]], "history": hist[pick], "future": fut, "horizons": horizons,
                        "q50": pred[pick, :, j, 0], "q90": pred[pick, :, j, 1],
                        "seasonal": fc["seasonal"][pick],
                    })  # fmt: skip

        # --- window regret -----------------------------------------------------------
        fut = panel.series[vm_of[:, None], org[:, None] + np.arange(1, Hs + 1)[None, :]]  # (n, Hs, C)
        dirty_a = _fill_time(fut[:, :, c_dirty])
        net_a = np.nan_to_num(_fill_time(fut[:, :, c_net]), nan=0.0)
        mem = last_valid(win[:, :, c_mem])
        mem = np.where(np.isfinite(mem), mem, attrs["mem_total_mb"]).astype(np.float32)
        dt_a, dur_a = downtime_curve(dirty_a, net_a, mem, settings)
        costs = window_costs(dt_a, dur_a)
        good = np.isfinite(costs).any(axis=1)
        out = score_windows(win, attrs, np.zeros(n, np.float32), model, params, Hs, slot_s, np, "cpu", pred=pred,
                            policy=policy)  # fmt: skip
        def start_slot(epoch_s: np.ndarray) -> np.ndarray:
            """A window start (epoch s) as the index of its slot in the future (0 = the slot after the origin)."""
            return np.clip(np.round(epoch_s / slot_s).astype(np.int64) - attrs["last_slot"] - 1, 0, Hs - 1)

        # the strict minimum, like the seasonal choice below: forecast quality, not the scheduler tolerance
        start_model = start_slot(out["min_start"])
        # what a scheduler reading best_* gets: the earliest start within the settings' tolerance that fits
        # (window_tolerance_ms / _rel, window_min_p_ok); the seasonal choice is also scored under that rule
        start_served = start_slot(out["best_start"])
        hz = np.arange(1, Hs + 1)
        dirty_s = np.nan_to_num(seasonal_naive(win[:, :, c_dirty], hz, day), nan=0.0)
        net_s = np.nan_to_num(seasonal_naive(win[:, :, c_net], hz, day), nan=0.0)
        dt_s, dur_s = downtime_curve(dirty_s, net_s, mem, settings)
        start_seasonal, _ = best_window(dt_s, dur_s, 1.0, np)
        seasonal_served, _, _ = recommended_window(dt_s, dur_s, np.ones_like(dt_s), params.pause_bound_ms, policy.tol_ms,
                                                   policy.tol_rel, policy.min_p_ok, np)  # fmt: skip
        costs = np.where(np.isfinite(costs), costs, np.nan)
        for name, st in (("model", start_model), ("now", np.zeros(n, np.int64)), ("seasonal", start_seasonal),
                         ("served", start_served), ("seasonal served", seasonal_served)):  # fmt: skip
            regrets[name].append(regret_of(np.nan_to_num(costs[good], nan=np.inf), st[good]))
        regret_at.append(np.stack([vm_of[good], org[good]], axis=1))
        progress("backtest", (idx[-1] + 1) / len(panel.vms))

    def bucket_mean(sums: np.ndarray, counts: np.ndarray) -> dict[str, float]:
        out = {}
        for name, (a, b) in BUCKETS.items():
            sel = (hours > a) & (hours <= b)
            out[name] = float(np.sum(sums[sel]) / max(1.0, float(np.sum(counts[sel]))))
        return out

    mae: dict[str, dict[str, float]] = {b: {} for b in BUCKETS}
    mase: dict[str, dict[str, float]] = {b: {} for b in BUCKETS}
    by_target: dict[str, dict[str, dict[str, float]]] = {}
    for m in methods:
        for b, val in bucket_mean(err_sum[m][t_cpu], err_n[t_cpu]).items():
            mae[b][m] = val
        for b, val in bucket_mean(sc_sum[m], sc_n).items():
            mase[b][m] = val
    for j, target in enumerate(TARGETS):
        by_target[target] = {b: {} for b in BUCKETS}
        for m in methods:
            for b, val in bucket_mean(err_sum[m][j], err_n[j]).items():
                by_target[target][b][m] = val
    paired = {k: np.concatenate(v) if v else np.zeros(0) for k, v in regrets.items()}
    reg = known_regret(paired)
    cov = float(cov_hit[t_cpu].sum() / max(1.0, cov_n[t_cpu].sum()))
    summary = {
        "target": "cpu_pct",
        "mae": mae,
        "mase": mase,
        "coverage_q90": cov,
        "coverage_q90_by_target": {t: float(cov_hit[j].sum() / max(1.0, cov_n[j].sum())) for j, t in enumerate(TARGETS)},
        "mae_by_target": by_target,
        "regret_ms": {k: float(np.mean(v)) if v.size else float("nan") for k, v in reg.items()},
        "regret_ms_p95": {k: float(np.quantile(v, 0.95)) if v.size else float("nan") for k, v in reg.items()},
        "n_vms": int(len(panel.vms)),
        "n_origins": int(n_rows),
        "horizon_buckets": {b: [int(a), int(c)] for b, (a, c) in BUCKETS.items()},
    }
    mae_h = {m: err_sum[m][t_cpu] / np.maximum(err_n[t_cpu], 1) for m in methods}
    summary["mae_by_horizon"] = {_horizon_label(h): {m: float(mae_h[m][i]) for m in methods} for i, h in enumerate(hours)}
    summary["regret_ms_quantiles"] = {
        k: {f"p{q}": float(np.quantile(v, q / 100)) if v.size else float("nan") for q in (50, 90, 99)}
        for k, v in reg.items()
    }
    at = np.concatenate(regret_at) if regret_at else np.zeros((0, 2), np.int64)
    return BacktestResult(summary, paired, at, mae_h, hours / 3600.0, examples)


def _horizon_label(seconds: float) -> str:
    """``300`` -> ``"5min"``, ``5400`` -> ``"1.5h"``: readable keys for per-horizon tables."""
    return f"{seconds / 60:g}min" if seconds < 3600 else f"{seconds / 3600:g}h"


def evaluate_panel(
    panel: Panel, settings: Any, cfg: BacktestConfig = BacktestConfig(), progress: Progress = _noop
) -> BacktestResult:
    """The holdout protocol: fit (with validation) on the first ``train_frac``, backtest on the rest."""
    from training.protocol import Protocol, run_protocol

    return run_protocol(panel, settings, cfg, Protocol("holdout"), progress=progress)


def quality_ok(summary: dict[str, Any]) -> dict[str, bool]:
    """The quality bar: model MAE below the best baseline per bucket, coverage in [0.8, 0.97], regret below now."""
    out = {}
    for b, row in summary["mae"].items():
        out[f"mae_{b}"] = row["model"] < min(v for k, v in row.items() if k != "model")
    out["coverage"] = 0.8 <= summary["coverage_q90"] <= 0.97
    out["regret"] = summary["regret_ms"]["model"] < summary["regret_ms"]["now"]
    return out
