"""Fit the quantile forecaster: one multi-quantile XGBoost booster per target.

Shared by the bootstrap model, evaluation and retraining so every model is fitted
the same way. Labels use the features' scale (log1p for heavy-tailed rates, see
``gpu_kernels.features.LOG1P_TARGETS``); ``to_label`` / ``from_label`` are the one
place that transform lives, and ``from_label`` also enforces q90 >= q50.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from gpu_kernels.features import FEATURE_NAMES, LABEL_BASE, LOG1P_TARGETS, QUANTILES, TARGETS, array_module

_SHORT = {"cpu_pct": "cpu", "dirty_mbps": "dirty", "net_mbps": "net"}



@dataclass(frozen=True)
class TrainingKnobs:
    """Booster size and data defaults shared by the backtest and the retrainer (one place to tune)."""

    n_estimators: int = 150
    max_depth: int = 6
    learning_rate: float = 0.1
    default_mem_mb: float = 4096.0  # memory size assumed where a trace has none (CPU-only traces)
    seed: int = 0


def to_label(y: Any, target: str) -> Any:
    """Raw target values -> the scale the booster learns (log1p for rates, clipped at 0)."""
    xp = array_module(y)
    return xp.log1p(xp.maximum(y, 0)) if target in LOG1P_TARGETS else y


def label_offset(X: Any, target: str) -> Any:
    """The booster learns ``to_label(y) - offset``: the target's newest observed value (feature
    ``LABEL_BASE``, ``<target>_last``, already on the label scale; NaN -> 0). Trees approximate an
    identity poorly, so learning the change from persistence, not the level, is what lets the model
    compete with the last-value baseline at short horizons (see README "Evaluation and retraining")."""
    col = X[:, FEATURE_NAMES.index(LABEL_BASE.format(s=_SHORT[target]))]
    xp = array_module(col)
    return xp.where(xp.isnan(col), 0, col)


def from_label(q: Any, target: str, offset: Any = None) -> Any:
    """Booster output ``(n, len(QUANTILES))`` (+ ``label_offset``) -> raw scale, >= 0, quantiles non-decreasing."""
    xp = array_module(q)
    if offset is not None:
        q = q + offset[:, None]
    q = xp.expm1(q) if target in LOG1P_TARGETS else q
    q = xp.maximum(q, 0)
    # quantile crossing is possible between independently grown leaves: enforce the order
    out = q.copy()
    for j in range(1, q.shape[1]):  # loop over the quantiles, not over samples
        out[:, j] = xp.maximum(out[:, j - 1], out[:, j])
    return out


def booster_params(max_depth: int, learning_rate: float, device: str, nthread: int | None = None) -> dict[str, Any]:
    params: dict[str, Any] = {
        "objective": "reg:quantileerror",
        "quantile_alpha": np.asarray(QUANTILES),
        "tree_method": "hist",
        "max_depth": max_depth,
        "learning_rate": learning_rate,
        "device": "cuda" if device in ("gpu", "cuda") else "cpu",
        "max_bin": 128,
        "min_child_weight": 5.0,
        "subsample": 0.8,
    }
    if nthread:
        params["nthread"] = nthread
    return params


def fit_forecaster(
    X: Any,
    Y: Any,
    *,
    n_estimators: int = 200,
    max_depth: int = 6,
    learning_rate: float = 0.1,
    device: str = "cpu",
    dask_client: Any = None,
    nthread: int | None = None,
) -> dict[str, Any]:
    """``X (n, F)`` features, ``Y (n, len(TARGETS))`` raw targets (NaN = unknown) -> ``{target: Booster}``.

    Rows with an unknown label are dropped per target. With ``dask_client``, ``X`` and ``Y``
    may be Dask arrays (or NumPy/CuPy, then chunked) and training runs through ``xgboost.dask``.
    """
    import xgboost as xgb

    if X.shape[1] != len(FEATURE_NAMES):
        raise ValueError(f"X has {X.shape[1]} features, the feature spec has {len(FEATURE_NAMES)}")
    if Y.shape[1] != len(TARGETS) or Y.shape[0] != X.shape[0]:
        raise ValueError(f"Y must be (n={X.shape[0]}, {len(TARGETS)}) {TARGETS}, got {Y.shape}")
    params = booster_params(max_depth, learning_rate, device, nthread)
    boosters: dict[str, Any] = {}
    for j, target in enumerate(TARGETS):
        if dask_client is not None:
            boosters[target] = _fit_dask(xgb, dask_client, X, Y[:, j], target, params, n_estimators)
            continue
        y = Y[:, j]
        xp = array_module(y)
        keep = ~xp.isnan(y)
        if int(keep.sum()) == 0:
            raise ValueError(f"no known label for target {target!r}")
        dtrain = xgb.QuantileDMatrix(
            X[keep],
            label=to_label(y[keep], target) - label_offset(X[keep], target),
            feature_names=list(FEATURE_NAMES),
            max_bin=params["max_bin"],
        )
        boosters[target] = xgb.train(params, dtrain, num_boost_round=n_estimators)
    return boosters


def _fit_dask(xgb: Any, client: Any, X: Any, y: Any, target: str, params: dict[str, Any], rounds: int) -> Any:
    import dask.array as da
    import xgboost.dask as dxgb

    if not isinstance(X, da.Array):
        X = da.from_array(X, chunks=(max(1, X.shape[0] // max(1, len(client.nthreads()))), X.shape[1]))
    if not isinstance(y, da.Array):
        y = da.from_array(y, chunks=(X.chunks[0],))
    keep = ~da.isnan(y)
    Xk = X[keep]
    yk = to_label(y[keep], target) - label_offset(Xk, target)
    Xk.compute_chunk_sizes()
    yk.compute_chunk_sizes()
    dtrain = dxgb.DaskQuantileDMatrix(
        client, Xk, label=yk, feature_names=list(FEATURE_NAMES), max_bin=params["max_bin"]
    )
    out = dxgb.train(client, {k: v for k, v in params.items() if k != "nthread"}, dtrain, num_boost_round=rounds)
    return out["booster"]


def predict_boosters(boosters: dict[str, Any], X: Any, device: str | None = None) -> Any:
    """``{target: Booster}`` -> ``(n, len(TARGETS), len(QUANTILES))`` float32 raw-scale quantiles on X's device.

    ``device`` ('cpu' or 'gpu') defaults to where ``X`` lives.
    """
    xp = array_module(X)
    device = device or ("cpu" if xp is np else "gpu")
    out = xp.empty((X.shape[0], len(TARGETS), len(QUANTILES)), dtype=xp.float32)
    for j, target in enumerate(TARGETS):
        raw = _raw_predict(boosters[target], X, device)
        raw = xp.asarray(raw, dtype=xp.float32).reshape(X.shape[0], len(QUANTILES))
        out[:, j, :] = from_label(raw, target, label_offset(X, target))
    return out


def _raw_predict(booster: Any, X: Any, device: str) -> Any:
    try:
        from gpu_kernels import inference  # written by the inference engineer; optional
    except ImportError:
        inference = None
    if inference is not None and hasattr(inference, "predict"):
        return inference.predict(booster, X, device)
    booster.set_param({"device": "cuda" if device == "gpu" else "cpu"})
    return booster.inplace_predict(X)
