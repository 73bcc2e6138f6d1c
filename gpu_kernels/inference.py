"""Device-aware tree inference: nvforest on GPU when installed, else XGBoost.

``ForecastModel.predict`` calls this so the engine choice lives in one place:
- GPU + nvforest: RAPIDS' forest inference (FIL) loads the XGBoost UBJ bytes
  directly (no pickle) and is the fastest GPU path;
- GPU without nvforest: XGBoost ``inplace_predict`` on CuPy input (the data
  stays on the device);
- CPU: XGBoost ``inplace_predict`` on NumPy input.
Output stays on the input's device. nvforest and CuPy are imported lazily.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from typing import Any

from gpu_kernels.xp import asarray, get_xp


def _booster(obj: Any) -> Any:
    """The ``xgboost.Booster`` of a Booster, an sklearn wrapper or an object with ``.booster``."""
    if hasattr(obj, "inplace_predict"):
        return obj
    if hasattr(obj, "get_booster"):
        return obj.get_booster()
    inner = getattr(obj, "booster", None)
    if inner is not None and hasattr(inner, "inplace_predict"):
        return inner
    raise TypeError(f"expected an xgboost Booster (or a model holding one), got {type(obj).__name__}")


def nvforest_installed() -> bool:
    return importlib.util.find_spec("nvforest") is not None


def engine_name(device: str, prefer_nvforest: bool = True) -> str:
    """Which engine :class:`TreePredictor` uses on ``device``: nvforest, xgboost-gpu or xgboost-cpu."""
    if device == "gpu":
        return "nvforest" if prefer_nvforest and nvforest_installed() else "xgboost-gpu"
    if device == "cpu":
        return "xgboost-cpu"
    raise ValueError(f"device must be 'cpu' or 'gpu' (resolve it first), not {device!r}")


class TreePredictor:
    """One booster bound to one device and engine; reuse it (nvforest loads once)."""

    def __init__(self, booster_or_model: Any, device: str, prefer_nvforest: bool = True) -> None:
        self.booster = _booster(booster_or_model)
        self.device = device
        self.engine_name = engine_name(device, prefer_nvforest)
        self.xp = get_xp(device)
        self._forest: Any = None
        if self.engine_name == "nvforest":
            self._forest = self._load_nvforest()
        elif self.engine_name == "xgboost-gpu":
            self.booster.set_param({"device": "cuda"})
        else:
            self.booster.set_param({"device": "cpu"})

    def _load_nvforest(self) -> Any:
        import nvforest  # noqa: PLC0415

        raw = bytes(self.booster.save_raw(raw_format="ubj"))
        fd, path = tempfile.mkstemp(suffix=".ubj")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(raw)
            return nvforest.load_model(path, device="gpu", model_type="xgboost_ubj", precision="single")
        finally:
            os.unlink(path)

    def predict(self, X: Any) -> Any:
        """Raw predictions for ``X`` (rows x features, float32), on this predictor's device."""
        X = asarray(X, self.xp, dtype=self.xp.float32)
        if self._forest is not None:
            out = self.xp.asarray(self._forest.predict(X))
            # nvforest returns (n, 1) for a single output; match XGBoost's (n,)
            return out.reshape(out.shape[0], -1)[:, 0] if out.ndim == 2 and out.shape[1] == 1 else out
        return self.booster.inplace_predict(X)


_CACHE_ATTR = "_zhuge_predictors"


def predictor_for(booster_or_model: Any, device: str) -> TreePredictor:
    """The :class:`TreePredictor` of a booster on ``device``, kept on the booster itself.

    Caching on the booster (not in a module-level table) ties the loaded nvforest
    forest's lifetime to the model's: a hot-swapped model drops its forest with it.
    """
    booster = _booster(booster_or_model)
    cache = getattr(booster, _CACHE_ATTR, None)
    if cache is None:
        cache = {}
        setattr(booster, _CACHE_ATTR, cache)
    if device not in cache:
        cache[device] = TreePredictor(booster, device)
    return cache[device]


def predict(booster_or_model: Any, X: Any, device: str) -> Any:
    """Predict on ``device`` ('cpu' or 'gpu') with the engine :func:`engine_name` names."""
    return predictor_for(booster_or_model, device).predict(X)

