"""Small real forecast models for tests that need one to save, publish, load or swap."""

from __future__ import annotations

import numpy as np

from gpu_kernels.features import FEATURE_NAMES
from training.fit import fit_forecaster
from training.model import ForecastModel, default_horizons

HORIZON_COL = FEATURE_NAMES.index("horizon_h")


def on_horizon_grid(X: np.ndarray, rng: np.random.Generator, slot_s: int = 300) -> np.ndarray:
    """Give random feature rows real horizons (hours of the default grid), so every horizon band has rows."""
    X[:, HORIZON_COL] = rng.choice(default_horizons(288), X.shape[0]) * slot_s / 3600
    return X


def tiny_model(seed: int, rows: int = 300) -> ForecastModel:
    """A few-tree model on random rows: cheap, loadable and distinct per seed."""
    rng = np.random.default_rng(seed)
    X = on_horizon_grid(rng.random((rows, len(FEATURE_NAMES)), dtype=np.float32), rng)
    Y = (rng.random((rows, 3)) * 10).astype(np.float32)
    return ForecastModel("draft", fit_forecaster(X, Y, n_estimators=3, max_depth=2, nthread=1), default_horizons(288), 300)
