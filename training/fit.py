"""Fit the quantile forecaster: one multi-quantile XGBoost booster per target and horizon band.

Shared by the bootstrap model, evaluation and retraining so every model is fitted
the same way. Each booster is global over VMs; rows are routed to a band by their
``horizon_h`` feature (``band_of``), so near, middle and far horizons get trees of
their own and a depth of their own (``BAND_DEPTHS``). Labels use the features' scale
(log1p for heavy-tailed rates, see ``gpu_kernels.features.LOG1P_TARGETS``);
``to_label`` / ``from_label`` are the one place that transform lives, and
``from_label`` also enforces q90 >= q50.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from gpu_kernels.features import (
    FEATURE_NAMES,
    LABEL_BASE,
    LABEL_SCALE,
    LABEL_SCALE_FLOOR,
    LOG1P_TARGETS,
    QUANTILES,
    SHORT_NAMES,
    TARGETS,
    array_module,
)


#: Upper edges (hours) of the horizon bands but the last: (0, 1 h], (1 h, 6 h], (6 h, ...).
BAND_EDGES_H: tuple[float, ...] = (1.0, 6.0)
#: Tree depth per band. Shallower beyond 1 h: on Bitbrains, depth-6 trees there learned how long
#: the training weeks' batch bursts lasted and lost to persistence when the bursts got longer
#: (1-6 h), or swung with the seed by 9 % (> 6 h); README "Horizon bands" has the runs.
BAND_DEPTHS: tuple[int, ...] = (6, 3, 4)


@dataclass(frozen=True)
class TrainingKnobs:
    """Booster size and data defaults shared by the backtest and the retrainer (one place to tune)."""

    n_estimators: int = 150
    max_depth: int | tuple[int, ...] = BAND_DEPTHS  # one depth, or one per horizon band
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
    col = X[:, FEATURE_NAMES.index(LABEL_BASE.format(s=SHORT_NAMES[target]))]
    xp = array_module(col)
    return xp.where(xp.isnan(col), 0, col)


def label_scale(X: Any, target: str) -> Any:
    """The per-VM divisor of the booster's label (``features.LABEL_SCALE``: the VM's 24 h spread on the
    label scale, floored; NaN -> the floor): one global model then sees every VM's changes alike,
    instead of the busiest VMs' dominating the loss."""
    xp = array_module(X)
    if LABEL_SCALE is None:
        return xp.ones(X.shape[0], dtype=xp.float32)
    short = SHORT_NAMES[target]
    col = X[:, FEATURE_NAMES.index(LABEL_SCALE.format(s=short))]
    floor = xp.float32(LABEL_SCALE_FLOOR[short])
    return xp.where(xp.isnan(col), floor, xp.maximum(col, floor))


def training_label(y: Any, X: Any, target: str) -> Any:
    """What the booster learns for raw targets ``y`` on rows ``X``: (transform(y) - offset) / scale."""
    change = to_label(y, target) - label_offset(X, target)
    return change if LABEL_SCALE is None else change / label_scale(X, target)


def from_label(q: Any, target: str, offset: Any = None, scale: Any = None) -> Any:
    """Booster output ``(n, len(QUANTILES))`` (x ``label_scale``, + ``label_offset``) -> raw scale, >= 0,
    quantiles non-decreasing."""
    xp = array_module(q)
    if scale is not None:
        q = q * scale[:, None]
    if offset is not None:
        q = q + offset[:, None]
    q = xp.expm1(q) if target in LOG1P_TARGETS else q
    q = xp.maximum(q, 0)
    # quantile crossing is possible between independently grown leaves: enforce the order
    out = q.copy()
    for j in range(1, q.shape[1]):  # loop over the quantiles, not over samples
        out[:, j] = xp.maximum(out[:, j - 1], out[:, j])
    return out


def band_of(X: Any, edges_h: tuple[float, ...] = BAND_EDGES_H) -> Any:
    """Band index of every row of ``X`` from its ``horizon_h`` feature (NumPy, CuPy or Dask);
    an edge belongs to the band below it, like the evaluation buckets (0, 1 h], (1 h, 6 h]."""
    h = X[:, FEATURE_NAMES.index("horizon_h")]
    band = (h > np.inf).astype("int8")  # zeros, on whatever backend h lives
    for edge in edges_h:
        band = band + (h > edge).astype("int8")
    return band


def _depths(max_depth: int | tuple[int, ...], n_bands: int) -> tuple[int, ...]:
    depths = (max_depth,) * n_bands if isinstance(max_depth, int) else tuple(max_depth)
    if len(depths) != n_bands:
        raise ValueError(f"max_depth gives {len(depths)} depths for {n_bands} horizon bands")
    return depths


def booster_params(
    max_depth: int, learning_rate: float, device: str, nthread: int | None = None, seed: int = 0
) -> dict[str, Any]:
    params: dict[str, Any] = {
        "seed": seed,
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
    max_depth: int | tuple[int, ...] = BAND_DEPTHS,
    learning_rate: float = 0.1,
    device: str = "cpu",
    dask_client: Any = None,
    nthread: int | None = None,
    band_edges_h: tuple[float, ...] = BAND_EDGES_H,
    seed: int = 0,
) -> dict[str, list[Any]]:
    """``X (n, F)`` features, ``Y (n, len(TARGETS))`` raw targets (NaN = unknown) ->
    ``{target: [Booster per horizon band]}``.

    ``max_depth`` is one depth or one per band. Rows with an unknown label are dropped per
    target. With ``dask_client``, ``X`` and ``Y`` may be Dask arrays (or NumPy/CuPy, then
    chunked) and training runs through ``xgboost.dask``.
    """
    import xgboost as xgb

    if X.shape[1] != len(FEATURE_NAMES):
        raise ValueError(f"X has {X.shape[1]} features, the feature spec has {len(FEATURE_NAMES)}")
    if Y.shape[1] != len(TARGETS) or Y.shape[0] != X.shape[0]:
        raise ValueError(f"Y must be (n={X.shape[0]}, {len(TARGETS)}) {TARGETS}, got {Y.shape}")
    depths = _depths(max_depth, len(band_edges_h) + 1)
    band = band_of(X, band_edges_h)
    boosters: dict[str, list[Any]] = {}
    for j, target in enumerate(TARGETS):
        boosters[target] = []
        for b, depth in enumerate(depths):
            params = booster_params(depth, learning_rate, device, nthread, seed)
            if dask_client is not None:
                booster = _fit_dask(xgb, dask_client, X, Y[:, j], band == b, target, params, n_estimators)
            else:
                booster = _fit_local(xgb, X, Y[:, j], band == b, target, params, n_estimators)
            boosters[target].append(booster)
    return boosters


#: Half-width of the label dither, in label units (log1p units for the rates).
#: Not on cpu_pct: the quantile loss's gradient is a sign, so any dither, however small,
#: turns every tied label into a random push. Bitbrains' idle VMs tie at a change of 0,
#: and those ties are what hold the median at persistence there: a 0.02 pp cpu dither
#: moved its 6 h / 24 h MAE from 4.147 / 8.507 to 4.405 / 9.253 (dirty and net stayed
#: within 1 %). The freeze the dither exists for was seen on the rates, which is what
#: the downtime model reads.
LABEL_DITHER = {"cpu_pct": 0.0}
LABEL_DITHER_DEFAULT = 0.002


def dithered(label: Any, target: str, seed: int) -> Any:
    """``label`` plus a tiny seeded uniform jitter, so no label ties exactly with the booster's start.

    Why: XGBoost's quantile objective starts each quantile at the label quantile
    (``base_score``); when many labels equal it exactly (plateaus: a VM idle at 0,
    saturated at 100 %, or a square load whose change from the last value is mostly 0
    or one step), that output's gradients never move it: seen in the lab, a q90 stuck
    at the largest step for every row while q50 learned the pattern. A jitter of a
    few thousandths of the label (0.2 % on a log scale) breaks the ties; see
    ``LABEL_DITHER`` for why cpu is left alone.
    """
    eps = LABEL_DITHER.get(target, LABEL_DITHER_DEFAULT)
    if eps == 0:
        return label
    try:
        import dask.array as da

        if isinstance(label, da.Array):
            noise = da.random.RandomState(seed).uniform(-eps, eps, size=label.shape, chunks=label.chunks)
            return label + noise.astype(label.dtype)
    except ImportError:  # pragma: no cover - dask is a dependency
        pass
    xp = array_module(label)
    noise = np.random.default_rng(seed).uniform(-eps, eps, label.shape).astype(np.float32)
    return label + xp.asarray(noise)


def _fit_local(xgb: Any, X: Any, y: Any, in_band: Any, target: str, params: dict[str, Any], rounds: int) -> Any:
    xp = array_module(y)
    keep = ~xp.isnan(y) & in_band
    if int(keep.sum()) == 0:
        raise ValueError(f"no known label for target {target!r} in one of the horizon bands")
    dtrain = xgb.QuantileDMatrix(
        X[keep],
        label=dithered(training_label(y[keep], X[keep], target), target, params["seed"]),
        feature_names=list(FEATURE_NAMES),
        max_bin=params["max_bin"],
    )
    return xgb.train(params, dtrain, num_boost_round=rounds)


def _fit_dask(
    xgb: Any, client: Any, X: Any, y: Any, in_band: Any, target: str, params: dict[str, Any], rounds: int
) -> Any:
    import dask.array as da
    import xgboost.dask as dxgb

    if not isinstance(X, da.Array):
        X = da.from_array(X, chunks=(max(1, X.shape[0] // max(1, len(client.nthreads()))), X.shape[1]))
    if not isinstance(y, da.Array):
        y = da.from_array(y, chunks=(X.chunks[0],))
    if not isinstance(in_band, da.Array):
        in_band = da.from_array(in_band, chunks=(X.chunks[0],))
    keep = ~da.isnan(y) & in_band
    Xk = X[keep]
    yk = training_label(y[keep], Xk, target)
    Xk.compute_chunk_sizes()
    yk.compute_chunk_sizes()
    yk = dithered(yk, target, params["seed"])
    dtrain = dxgb.DaskQuantileDMatrix(
        client, Xk, label=yk, feature_names=list(FEATURE_NAMES), max_bin=params["max_bin"]
    )
    out = dxgb.train(client, {k: v for k, v in params.items() if k != "nthread"}, dtrain, num_boost_round=rounds)
    return out["booster"]


def predict_boosters(
    boosters: dict[str, list[Any]], X: Any, device: str | None = None, band_edges_h: tuple[float, ...] = BAND_EDGES_H
) -> Any:
    """``{target: [Booster per band]}`` -> ``(n, len(TARGETS), len(QUANTILES))`` float32 raw-scale
    quantiles on X's device; each row goes to its horizon band's booster.

    ``device`` ('cpu' or 'gpu') defaults to where ``X`` lives.
    """
    xp = array_module(X)
    device = device or ("cpu" if xp is np else "gpu")
    n = X.shape[0]
    band = band_of(X, band_edges_h)
    n_bands = len(band_edges_h) + 1
    # gather each band's rows once, shared by the targets (no copy when one band holds them all)
    parts = []
    for b in range(n_bands):
        idx = xp.flatnonzero(band == b)
        if idx.size:
            parts.append((b, idx, X if idx.size == n else X[idx]))
    out = xp.empty((n, len(TARGETS), len(QUANTILES)), dtype=xp.float32)
    for j, target in enumerate(TARGETS):
        if len(boosters[target]) != n_bands:
            raise ValueError(f"{target}: {len(boosters[target])} boosters for {n_bands} horizon bands")
        raw = xp.empty((n, len(QUANTILES)), dtype=xp.float32)
        for b, idx, Xb in parts:
            raw[idx] = xp.asarray(_raw_predict(boosters[target][b], Xb, device), dtype=xp.float32).reshape(idx.size, -1)
        scale = None if LABEL_SCALE is None else label_scale(X, target)
        out[:, j, :] = from_label(raw, target, label_offset(X, target), scale)
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
