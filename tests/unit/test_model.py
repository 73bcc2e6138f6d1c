"""Fitting, predicting, saving and refusing forecast models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gpu_kernels.features import FEATURE_NAMES, FEATURE_SPEC_HASH, TARGETS
from tests.model_support import on_horizon_grid
from training.fit import fit_forecaster, from_label
from training.model import ForecastModel, ModelRejected, default_horizons

F = len(FEATURE_NAMES)


def synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Targets driven by two features with noise whose spread also depends on a feature."""
    rng = np.random.default_rng(seed)
    X = on_horizon_grid(rng.random((n, F), dtype=np.float32), rng)
    X[rng.random((n, F)) < 0.05] = np.nan  # gaps, as real windows have
    base = np.nan_to_num(X[:, 0]) * 50 + np.nan_to_num(X[:, 1]) * 20
    noise = rng.normal(0, 1, (n, 3)) * (2 + 8 * np.nan_to_num(X[:, [2]]))
    Y = np.stack([base, base * 0.5, base * 0.2], axis=1) + np.abs(noise)
    Y[rng.random(n) < 0.02, 1] = np.nan  # unknown labels are dropped per target
    return X, Y.astype(np.float32)


@pytest.fixture(scope="module")
def model() -> ForecastModel:
    X, Y = synthetic(8000, seed=0)  # 91 features, most of them noise here: enough rows to learn the spread
    boosters = fit_forecaster(X, Y, n_estimators=30, max_depth=4, learning_rate=0.25, nthread=1)
    return ForecastModel("test-1", boosters, default_horizons(288), 300, training_range=(0, 86400), metrics={"mae": 1.5})


def test_predict_shape_dtype_and_ordered_nonnegative_quantiles(model: ForecastModel) -> None:
    X, _ = synthetic(2000, seed=1)
    P = model.predict(X)
    assert P.shape == (2000, len(TARGETS), 2) and P.dtype == np.float32
    assert (P[:, :, 1] >= P[:, :, 0]).all() and (P >= 0).all()


def test_upper_quantile_covers_about_ninety_percent(model: ForecastModel) -> None:
    X, Y = synthetic(4000, seed=2)
    P = model.predict(X)
    known = ~np.isnan(Y)
    cover90 = [(Y[known[:, j], j] <= P[known[:, j], j, 1]).mean() for j in range(3)]
    cover50 = [(Y[known[:, j], j] <= P[known[:, j], j, 0]).mean() for j in range(3)]
    assert all(0.84 <= c <= 0.96 for c in cover90), cover90
    assert all(0.40 <= c <= 0.60 for c in cover50), cover50


def test_from_label_inverts_log_and_uncrosses_quantiles() -> None:
    crossed = np.array([[np.log1p(5.0), np.log1p(3.0)]], np.float32)
    out = from_label(crossed, "dirty_mbps")
    assert out[0, 0] == pytest.approx(5.0) and out[0, 1] == pytest.approx(5.0)


def test_fit_rejects_wrong_feature_count() -> None:
    with pytest.raises(ValueError, match="features"):
        fit_forecaster(np.zeros((10, 3), np.float32), np.zeros((10, 3), np.float32), n_estimators=1)


def test_save_load_roundtrip_predicts_identically(model: ForecastModel, tmp_path: Path) -> None:
    model.save(str(tmp_path / "m"))
    loaded = ForecastModel.load(str(tmp_path / "m"))
    X, _ = synthetic(500, seed=3)
    np.testing.assert_array_equal(loaded.predict(X), model.predict(X))
    assert loaded.version == "test-1" and loaded.feature_hash == FEATURE_SPEC_HASH
    np.testing.assert_array_equal(loaded.horizons, model.horizons)
    assert loaded.slot_s == 300 and loaded.training_range == (0, 86400) and loaded.metrics == {"mae": 1.5}
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert set(manifest["files"]) == {f"{t}.band{b}.ubj" for t in TARGETS for b in range(3)}
    assert manifest["band_edges_h"] == [1.0, 6.0] and manifest["format"] == 3
    assert not list((tmp_path / "m").glob("*.pkl"))


def test_tampered_booster_is_rejected(model: ForecastModel, tmp_path: Path) -> None:
    model.save(str(tmp_path))
    f = tmp_path / "net_mbps.band1.ubj"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ModelRejected, match="checksum mismatch for net_mbps.band1.ubj"):
        ForecastModel.load(str(tmp_path))


def _edit_manifest(path: Path, **changes: object) -> None:
    m = json.loads((path / "manifest.json").read_text())
    m.update(changes)
    (path / "manifest.json").write_text(json.dumps(m))


def test_unknown_feature_hash_is_rejected(model: ForecastModel, tmp_path: Path) -> None:
    model.save(str(tmp_path))
    _edit_manifest(tmp_path, feature_hash="0" * 64)
    with pytest.raises(ModelRejected, match="feature spec 000000000000 is unknown"):
        ForecastModel.load(str(tmp_path))


def test_corrupt_or_missing_manifest_is_rejected(model: ForecastModel, tmp_path: Path) -> None:
    with pytest.raises(ModelRejected, match="no manifest.json"):
        ForecastModel.load(str(tmp_path))
    model.save(str(tmp_path))
    (tmp_path / "manifest.json").write_text('{"format": 1, "version": ')
    with pytest.raises(ModelRejected, match="not valid JSON"):
        ForecastModel.load(str(tmp_path))


def test_incompatible_slot_or_horizons_are_rejected(model: ForecastModel, tmp_path: Path) -> None:
    model.save(str(tmp_path))
    with pytest.raises(ModelRejected, match="slot is 300 s, this worker uses 60 s"):
        ForecastModel.load(str(tmp_path), slot_s=60)
    _edit_manifest(tmp_path, horizons=[3, 1])
    with pytest.raises(ModelRejected, match="horizons"):
        ForecastModel.load(str(tmp_path))


@pytest.mark.parametrize("edges", [[6.0, 1.0], ["1h"], 1.0])
def test_bad_band_edges_are_rejected(model: ForecastModel, tmp_path: Path, edges: object) -> None:
    model.save(str(tmp_path))
    _edit_manifest(tmp_path, band_edges_h=edges)
    with pytest.raises(ModelRejected, match="band_edges_h"):
        ForecastModel.load(str(tmp_path))


def test_a_valid_checksum_over_a_non_model_file_is_still_rejected(model: ForecastModel, tmp_path: Path) -> None:
    """An attacker (or a bug) rewriting both the file and its checksum must not crash the worker."""
    import hashlib

    model.save(str(tmp_path))
    junk = b"not a model"
    (tmp_path / "cpu_pct.band2.ubj").write_bytes(junk)
    m = json.loads((tmp_path / "manifest.json").read_text())
    m["files"]["cpu_pct.band2.ubj"] = hashlib.sha256(junk).hexdigest()
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ModelRejected, match="cpu_pct.band2.ubj"):
        ForecastModel.load(str(tmp_path))


def test_each_row_is_predicted_by_its_horizon_bands_booster(model: ForecastModel) -> None:
    """Rows at 30 min, 3 h and 12 h ahead go to the near, middle and far boosters."""
    from training.fit import band_of, label_offset

    X, _ = synthetic(300, seed=5)
    hcol = FEATURE_NAMES.index("horizon_h")
    X[:100, hcol], X[100:200, hcol], X[200:, hcol] = 0.5, 3.0, 12.0
    np.testing.assert_array_equal(band_of(X), np.repeat([0, 1, 2], 100))
    P = model.predict(X)
    for band, rows in enumerate((slice(0, 100), slice(100, 200), slice(200, 300))):
        raw = model.boosters["cpu_pct"][band].inplace_predict(X[rows]).reshape(-1, 2)
        np.testing.assert_allclose(P[rows, 0, 0], np.maximum(raw[:, 0] + label_offset(X[rows], "cpu_pct"), 0), rtol=1e-6)


def test_band_edges_are_hour_boundaries_inclusive_above() -> None:
    from training.fit import band_of

    X = np.zeros((5, F), np.float32)
    X[:, FEATURE_NAMES.index("horizon_h")] = [1 / 12, 1.0, 1.5, 6.0, 24.0]
    assert band_of(X).tolist() == [0, 0, 1, 1, 2]


def test_a_format_one_model_loads_as_a_single_band(tmp_path: Path) -> None:
    """Stores written before horizon bands keep serving after an upgrade."""
    X, Y = synthetic(1000, seed=6)
    one = ForecastModel("old", fit_forecaster(X, Y, n_estimators=5, max_depth=3, nthread=1, band_edges_h=()), default_horizons(288), 300, band_edges_h=())
    one.save(str(tmp_path))
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert set(m["files"]) == {f"{t}.ubj" for t in TARGETS}
    del m["band_edges_h"]
    m["format"] = 1
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    loaded = ForecastModel.load(str(tmp_path))
    assert loaded.n_bands == 1
    np.testing.assert_array_equal(loaded.predict(X), one.predict(X))


def test_band_count_must_match_the_boosters() -> None:
    X, Y = synthetic(1000, seed=7)
    boosters = fit_forecaster(X, Y, n_estimators=2, max_depth=2, nthread=1)
    with pytest.raises(ValueError, match="3 boosters for 1 horizon bands"):
        ForecastModel("bad", boosters, default_horizons(288), 300, band_edges_h=())
    with pytest.raises(ValueError, match="3 depths for 2 horizon bands"):
        fit_forecaster(X, Y, n_estimators=2, max_depth=(6, 3, 6), band_edges_h=(1.0,))


def test_default_horizons_end_at_the_horizon() -> None:
    assert list(default_horizons(288))[-3:] == [192, 240, 288]
    assert list(default_horizons(10)) == [1, 2, 3, 4, 6, 9, 10]


def test_dask_path_trains_usable_quantile_boosters() -> None:
    """The retrainer's path: xgboost.dask on a (here in-process) Dask cluster, NaN labels dropped."""
    from distributed import Client, LocalCluster

    from training.fit import predict_boosters

    X, Y = synthetic(2000, seed=4)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        with Client(cluster) as client:
            boosters = fit_forecaster(X, Y, n_estimators=10, max_depth=3, dask_client=client)
    P = predict_boosters(boosters, X)
    assert set(boosters) == set(TARGETS) and P.shape == (2000, 3, 2)
    assert (P[:, :, 1] >= P[:, :, 0]).all()
    assert np.corrcoef(P[:, 0, 0], Y[:, 0])[0, 1] > 0.5  # it learned the signal, not a constant


def test_a_plateau_series_still_gets_a_conditional_upper_quantile():
    """A square load: the change from the last value is 0 or one step. Without the label dither
    XGBoost's q90 stays at its start (the largest step) for every row; with it, q90 follows the pattern."""
    from gpu_kernels.features import FEATURE_NAMES, TARGETS
    from training.fit import fit_forecaster, predict_boosters

    rng = np.random.default_rng(0)
    n = 4000
    X = np.full((n, len(FEATURE_NAMES)), np.nan, np.float32)
    last = rng.choice([np.log1p(1.0), np.log1p(40.0)], n).astype(np.float32)
    yday = rng.choice([np.log1p(1.0), np.log1p(40.0)], n).astype(np.float32)
    X[:, FEATURE_NAMES.index("dirty_last")] = last
    X[:, FEATURE_NAMES.index("dirty_yday")] = yday
    X[:, FEATURE_NAMES.index("cpu_last")] = 10.0
    X[:, FEATURE_NAMES.index("net_last")] = 0.0
    X[:, FEATURE_NAMES.index("horizon_h")] = rng.choice([0.5, 3.0, 12.0], n)
    Y = np.zeros((n, len(TARGETS)), np.float32)
    Y[:, TARGETS.index("dirty_mbps")] = np.expm1(yday)  # tomorrow repeats today
    Y[:, TARGETS.index("cpu_pct")] = 10.0
    boosters = fit_forecaster(X, Y, n_estimators=150, nthread=1)
    q = predict_boosters(boosters, X)[:, TARGETS.index("dirty_mbps"), 1]
    quiet_next = (last > 2) & (yday < 1)  # busy now, quiet at the target: q90 must say quiet
    assert np.median(q[quiet_next]) < 3.0, np.median(q[quiet_next])
