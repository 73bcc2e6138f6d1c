"""The bootstrap model: fast enough for a worker's start-up, and a usable forecaster."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest

from app.settings import Settings
from gpu_kernels.features import FEATURE_SPEC_HASH, build_features
from training.bootstrap import bootstrap_model, fleet_channels


def test_bootstrap_trains_quickly_and_forecasts(caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings.from_env({})
    caplog.set_level(logging.WARNING)
    tic = time.perf_counter()
    model = bootstrap_model(settings)
    elapsed = time.perf_counter() - tic
    assert elapsed < 20, f"bootstrap took {elapsed:.1f} s (target < 10 s on 2 cores)"
    assert model.version == f"bootstrap-{FEATURE_SPEC_HASH[:8]}"
    assert "BOOTSTRAP" in caplog.text
    assert model.horizons[-1] == settings.horizon_slots and model.slot_s == settings.slot_s

    # a flat busy VM is forecast busier than a flat idle one
    S = settings.window_slots
    win = np.zeros((2, S, 4), np.float32)
    win[0, :, :] = [80.0, 200.0, 50.0, 6000.0]
    win[1, :, :] = [2.0, 1.0, 0.1, 1000.0]
    attrs = {"vcpus": np.array([8, 8], np.float32), "mem_total_mb": np.array([8192, 8192], np.float32)}
    X = build_features(win, attrs, np.array([5_000_000, 5_000_000]), model.horizons, settings.slot_s)
    P = model.predict(X).reshape(2, len(model.horizons), 3, 2)
    assert (P[0, :, 0, 0] > P[1, :, 0, 0]).all()


def test_fleet_channels_derive_network_and_proxy_missing_dirty_rate() -> None:
    T, V = 3, 2
    fields = {
        "cpu_pct": np.full((T, V), 50.0), "dirty_mbps": np.array([[1.0, np.nan]] * T),
        "net_rx_kbps": np.full((T, V), 1024.0), "net_tx_kbps": np.full((T, V), 2048.0),
        "mem_used_mb": np.full((T, V), 1000.0), "mem_total_mb": np.full((T, V), 4096.0),
        "vcpus": np.full((T, V), 2.0), "disk_write_kbps": np.zeros((T, V)),
    }
    series, attrs = fleet_channels(fields)
    assert series.shape == (V, T, 4)
    assert (series[:, :, 2] == 3.0).all() and (series[0, :, 1] == 1.0).all()
    assert np.isfinite(series[1, :, 1]).all() and (series[1, :, 1] > 0).all()
    assert list(attrs["mem_total_mb"]) == [4096.0, 4096.0]
