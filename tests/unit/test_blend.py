"""The served blend: chosen on validation rows, never worse there than a naive forecast, stored safely."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from gpu_kernels.features import FEATURE_NAMES, TARGETS
from training.blend import NAIVE, Blend, apply_blend, fit_blend, naive_forecasts
from training.fit import BAND_EDGES_H, fit_forecaster
from training.model import ForecastModel, ModelRejected, default_horizons

SLOT = 300
HORIZONS = default_horizons(288)
col = FEATURE_NAMES.index


def rows(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows on the horizon grid whose cpu/dirty/net equal yesterday's value at the slot plus noise."""
    rng = np.random.default_rng(seed)
    X = np.full((n, len(FEATURE_NAMES)), np.nan, np.float32)
    X[:, col("horizon_h")] = rng.choice(HORIZONS, n) * SLOT / 3600
    Y = np.empty((n, len(TARGETS)), np.float32)
    for j, s in enumerate(("cpu", "dirty", "net")):
        last, yday = rng.uniform(0, 50, n), rng.uniform(0, 50, n)
        y = yday + rng.normal(0, 1, n)
        scale = np.log1p if s != "cpu" else (lambda v: v)
        X[:, col(f"{s}_last")], X[:, col(f"{s}_yday")] = scale(last), scale(yday)
        Y[:, j] = np.maximum(y, 0)
    return X, Y


def test_naive_forecasts_read_the_features_on_the_raw_scale() -> None:
    X, _ = rows(50, 0)
    nv = naive_forecasts(X)
    np.testing.assert_allclose(nv[:, 0, NAIVE.index("yday")], X[:, col("cpu_yday")], rtol=1e-6)
    np.testing.assert_allclose(nv[:, 1, NAIVE.index("last")], np.expm1(X[:, col("dirty_last")]), rtol=1e-5)
    # no profile yet: the profile forecast falls back to the last value, and so does the day's mean
    np.testing.assert_allclose(nv[:, 2, NAIVE.index("prof")], nv[:, 2, NAIVE.index("last")])
    np.testing.assert_allclose(nv[:, 0, NAIVE.index("mean")], nv[:, 0, NAIVE.index("last")])
    X[:, col("net_mean_24h")] = np.log1p(7.0)
    np.testing.assert_allclose(naive_forecasts(X)[:, 2, NAIVE.index("mean")], 7.0, rtol=1e-5)


def test_where_the_days_mean_beats_every_other_naive_forecast_the_blend_serves_it() -> None:
    """Noisy VMs around a steady level: the newest value is one noisy draw, the day's mean the level."""
    X, Y = rows(20_000, 5)
    rng = np.random.default_rng(6)
    level = rng.uniform(5, 45, X.shape[0])
    Y[:, 0] = level + rng.normal(0, 1, level.size)
    X[:, col("cpu_last")], X[:, col("cpu_yday")] = level + rng.normal(0, 8, (2, level.size))
    X[:, col("cpu_mean_24h")] = level + rng.normal(0, 0.5, level.size)
    q = np.full((X.shape[0], len(TARGETS), 2), 25.0, np.float32)
    blend, report = fit_blend(q, X, Y, HORIZONS, SLOT, BAND_EDGES_H)
    assert set(blend.naive["cpu_pct"]) == {"mean"} and max(blend.weight["cpu_pct"]) <= 0.1
    assert all(r["served"] <= r["last"] / 3 for r in report["cpu_pct"])


def test_a_useless_model_is_replaced_by_the_naive_forecast_that_wins_on_validation() -> None:
    X, Y = rows(20_000, 1)
    q = np.full((X.shape[0], len(TARGETS), 2), 25.0, np.float32)  # a flat, uninformed "model"
    q[:, :, 1] = 40.0
    blend, report = fit_blend(q, X, Y, HORIZONS, SLOT, BAND_EDGES_H)
    for t in TARGETS:
        assert set(blend.naive[t]) == {"yday"} and max(blend.weight[t]) <= 0.1, (blend.naive[t], blend.weight[t])
        for r in report[t]:
            assert r["served"] <= min(r[n] for n in NAIVE) + 1e-9  # never worse than a naive forecast there
    served = apply_blend(q, X, blend, SLOT, BAND_EDGES_H)
    assert np.abs(served[:, 0, 0] - Y[:, 0]).mean() < 0.3 * np.abs(q[:, 0, 0] - Y[:, 0]).mean()
    assert (served[:, :, 1] >= served[:, :, 0]).all()


def test_a_good_model_is_kept_and_its_q90_spread_is_calibrated_to_ninety_percent() -> None:
    X, Y = rows(20_000, 2)
    rng = np.random.default_rng(3)
    q = np.empty((X.shape[0], len(TARGETS), 2), np.float32)
    q[:, :, 0] = Y + rng.normal(0, 0.3, Y.shape)  # better than yesterday's value
    q[:, :, 1] = q[:, :, 0] + 0.15  # far too narrow a q90
    blend, _ = fit_blend(q, X, Y, HORIZONS, SLOT, BAND_EDGES_H)
    assert all(min(blend.weight[t]) >= 0.8 for t in TARGETS)
    served = apply_blend(q, X, blend, SLOT, BAND_EDGES_H)
    cover = (Y[:, 0] <= served[:, 0, 1]).mean()
    assert cover > (Y[:, 0] <= q[:, 0, 1]).mean() and 0.8 <= cover <= 0.95


def test_the_blend_travels_in_the_manifest_and_a_bad_one_is_refused(tmp_path: Path) -> None:
    X, Y = rows(3000, 4)
    boosters = fit_forecaster(X, Y, n_estimators=3, max_depth=2, nthread=1)
    q = np.zeros((X.shape[0], len(TARGETS), 2), np.float32)
    blend, _ = fit_blend(q, X, Y, HORIZONS, SLOT, BAND_EDGES_H)
    model = ForecastModel("b-1", boosters, HORIZONS, SLOT, blend=blend)
    model.save(str(tmp_path / "m"))
    loaded = ForecastModel.load(str(tmp_path / "m"))
    assert loaded.blend == blend
    np.testing.assert_array_equal(loaded.predict(X), model.predict(X))
    man_path = tmp_path / "m" / "manifest.json"
    man = json.loads(man_path.read_text())
    man["blend"]["weight"]["cpu_pct"][0] = 7.0
    man_path.write_text(json.dumps(man))
    with pytest.raises(ModelRejected, match="blend"):
        ForecastModel.load(str(tmp_path / "m"))


def test_the_window_quantile_travels_with_the_blend_and_older_manifests_read_q90(tmp_path: Path) -> None:
    X, Y = rows(3000, 4)
    boosters = fit_forecaster(X, Y, n_estimators=3, max_depth=2, nthread=1)
    blend, _ = fit_blend(np.zeros((X.shape[0], len(TARGETS), 2), np.float32), X, Y, HORIZONS, SLOT, BAND_EDGES_H)
    ForecastModel("b-1", boosters, HORIZONS, SLOT, blend=replace(blend, window_quantile=0.5)).save(str(tmp_path / "m"))
    assert ForecastModel.load(str(tmp_path / "m")).window_quantile == 0.5
    man_path = tmp_path / "m" / "manifest.json"
    man = json.loads(man_path.read_text())
    del man["blend"]["window_quantile"]  # as written before the window search had a choice
    man_path.write_text(json.dumps(man))
    assert ForecastModel.load(str(tmp_path / "m")).window_quantile == 0.9
    man["blend"]["window_quantile"] = 0.7
    man_path.write_text(json.dumps(man))
    with pytest.raises(ModelRejected, match="window_quantile"):
        ForecastModel.load(str(tmp_path / "m"))
    assert ForecastModel("b-2", boosters, HORIZONS, SLOT).window_quantile == 0.9  # boosters alone


def test_blend_from_dict_rejects_unknown_naive_methods() -> None:
    d = {"horizons": [1], "weight": {t: [0.5] for t in TARGETS}, "naive": {t: ["oracle"] for t in TARGETS},
         "spread": {t: [1.0, 1.0, 1.0] for t in TARGETS}}  # fmt: skip
    with pytest.raises(ValueError, match="naive"):
        Blend.from_dict(d)


def test_a_gain_within_noise_goes_to_the_naive_forecast_and_a_clear_one_to_the_model() -> None:
    from training.blend import one_se_choice

    rng = np.random.default_rng(6)
    m = 20_000
    naive = np.abs(rng.normal(0, 1, m))
    noisy = naive + rng.normal(-0.002, 0.3, m)  # 0.2 % better on average, row noise 0.3
    clear = naive * 0.8  # 20 % better on every row
    for model, expect_w in ((noisy, 0), (clear, 1)):
        rows_err = np.stack([naive, model])  # W = 2: the naive forecast alone, the model alone
        assert one_se_choice(rows_err) == expect_w


def test_a_gain_that_holds_on_some_days_only_goes_to_the_naive_forecast() -> None:
    """Many VMs make a row-level standard error tiny; the day clusters keep it honest."""
    from training.blend import one_se_choice

    rng = np.random.default_rng(7)
    days, vms, per = 6, 200, 20
    day = np.repeat(np.arange(days), vms * per)
    vm = np.tile(np.repeat(np.arange(vms), per), days)
    naive = np.abs(rng.normal(0, 1, day.size))
    swing = np.array([-0.3, -0.25, 0.2, -0.3, 0.3, -0.1])[day]  # the model wins on 4 days of 6, and loses on 2
    model = naive + swing + rng.normal(0, 0.05, day.size)
    rows_err = np.stack([naive, model])
    assert model.mean() < naive.mean()
    assert one_se_choice(rows_err, [vm]) == 1  # across VMs alone the gain looks clear
    assert one_se_choice(rows_err, [vm, day]) == 0  # across days it does not hold
    steady = naive - 0.1 + rng.normal(0, 0.05, day.size)
    assert one_se_choice(np.stack([naive, steady]), [vm, day]) == 1


def test_lean_model_takes_the_largest_weight_mae_admits_and_the_default_the_smallest() -> None:
    """A model a little better than yesterday's value: many weights are within noise of the best on
    MAE, so which end is served is a choice MAE cannot make (``training.validated`` makes it on
    window regret). Neither end is worse than the naive forecast alone."""
    X, Y = rows(20_000, 8)
    rng = np.random.default_rng(9)
    yday = naive_forecasts(X)[:, :, NAIVE.index("yday")]
    q = np.empty((X.shape[0], len(TARGETS), 2), np.float32)
    q[:, :, 0] = yday + 0.05 * (Y - yday) + rng.normal(0, 0.2, Y.shape)
    q[:, :, 1] = q[:, :, 0] + 1.0
    near, r_near = fit_blend(q, X, Y, HORIZONS, SLOT, BAND_EDGES_H)
    lean, r_lean = fit_blend(q, X, Y, HORIZONS, SLOT, BAND_EDGES_H, lean_model=("dirty_mbps",))
    assert near.weight["cpu_pct"] == lean.weight["cpu_pct"] and near.naive == lean.naive
    w_near, w_lean = np.asarray(near.weight["dirty_mbps"]), np.asarray(lean.weight["dirty_mbps"])
    assert (w_lean >= w_near).all() and (w_lean > w_near).sum() >= 4, (w_near, w_lean)
    for a, b in zip(r_near["dirty_mbps"], r_lean["dirty_mbps"]):
        assert abs(a["served"] - b["served"]) < 0.02 * a["served"] and b["served"] <= b["yday"]


def test_lean_model_never_takes_a_weight_worse_than_the_naive_forecast_alone() -> None:
    """Yesterday's value plus noise: however wide the standard error, the naive forecast is served."""
    X, Y = rows(20_000, 10)
    rng = np.random.default_rng(11)
    q = np.empty((X.shape[0], len(TARGETS), 2), np.float32)
    q[:, :, 0] = naive_forecasts(X)[:, :, NAIVE.index("yday")] + rng.normal(0, 0.1, Y.shape)
    q[:, :, 1] = q[:, :, 0] + 1.0
    lean, report = fit_blend(q, X, Y, HORIZONS, SLOT, BAND_EDGES_H, lean_model=TARGETS)
    for t in TARGETS:  # without the cap, weights up to 1 are within one standard error here
        assert all(r["served"] <= min(r[n] for n in NAIVE) + 1e-9 for r in report[t]), lean.weight[t]
