"""The array-module switch: NumPy always works, a GPU request without a GPU fails clearly."""

from __future__ import annotations

import importlib
import sys

import numpy as np
import pytest

from gpu_kernels import xp as xpmod


def test_cpu_resolves_to_numpy():
    assert xpmod.resolve_device("cpu") == "cpu"
    assert xpmod.get_xp("cpu") is np


def test_auto_follows_gpu_availability(monkeypatch):
    monkeypatch.setattr(xpmod, "gpu_available", lambda: False)
    assert xpmod.resolve_device("auto") == "cpu"
    monkeypatch.setattr(xpmod, "gpu_available", lambda: True)
    assert xpmod.resolve_device("auto") == "gpu"


def test_gpu_without_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(xpmod, "gpu_available", lambda: False)
    with pytest.raises(RuntimeError, match="no usable GPU"):
        xpmod.resolve_device("gpu")


def test_unknown_device_rejected():
    with pytest.raises(ValueError):
        xpmod.resolve_device("tpu")
    with pytest.raises(ValueError):
        xpmod.get_xp("auto")


def test_gpu_available_never_raises_without_cupy(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` fail
    assert xpmod.gpu_available() is False


def test_module_imports_without_cupy(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    importlib.reload(xpmod)
    assert xpmod.get_xp("cpu") is np


def test_to_numpy_and_asarray_round_trip():
    a = [1.5, 2.5]
    out = xpmod.asarray(a, np, dtype=np.float32)
    assert out.dtype == np.float32
    arr = np.arange(3)
    assert xpmod.to_numpy(arr) is arr
    assert xpmod.module_of(arr) is np
