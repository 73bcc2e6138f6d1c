"""The array module: NumPy or CuPy behind one name, ``xp``.

Kernels take ``xp`` and use only the API both libraries share, so the CPU and
GPU paths are the same code. CuPy is imported lazily: this module (and every
kernel) imports with NumPy alone.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

DeviceName = Literal["cpu", "gpu"]


def gpu_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device. Never raises."""
    try:
        import cupy  # noqa: PLC0415

        return int(cupy.cuda.runtime.getDeviceCount()) > 0
    except Exception:  # ImportError, CUDA driver/runtime errors: all mean "no GPU"
        return False


def resolve_device(setting: str) -> DeviceName:
    """Map the ``device`` setting (auto|cpu|gpu) to the device actually used."""
    setting = (setting or "auto").lower()
    if setting == "cpu":
        return "cpu"
    if setting == "auto":
        return "gpu" if gpu_available() else "cpu"
    if setting == "gpu":
        if not gpu_available():
            raise RuntimeError(
                "device=gpu requested but no usable GPU: CuPy is not installed or sees no CUDA device "
                "(install the 'gpu' extra, check nvidia-smi, or use ZHUGE_DEVICE=auto|cpu)"
            )
        return "gpu"
    raise ValueError(f"device must be auto, cpu or gpu, not {setting!r}")


def get_xp(device: str) -> Any:
    """The array module for a resolved device (``"cpu"`` -> numpy, ``"gpu"`` -> cupy)."""
    if device == "cpu":
        return np
    if device == "gpu":
        import cupy  # noqa: PLC0415

        return cupy
    raise ValueError(f"get_xp takes a resolved device 'cpu' or 'gpu', not {device!r} (see resolve_device)")


def is_numpy(xp: Any) -> bool:
    return xp is np


def to_numpy(a: Any) -> Any:
    """A host (NumPy) copy of ``a``; NumPy arrays and scalars pass through unchanged."""
    if isinstance(a, np.ndarray) or np.isscalar(a):
        return a
    get = getattr(a, "get", None)
    if callable(get) and type(a).__module__.startswith("cupy"):
        return get()
    return np.asarray(a)


def asarray(a: Any, xp: Any, dtype: Any = None) -> Any:
    """``a`` as an array of module ``xp`` (copies host <-> device when needed)."""
    if xp is np:
        return np.asarray(to_numpy(a), dtype=dtype)
    return xp.asarray(a, dtype=dtype)


def module_of(a: Any) -> Any:
    """The array module that owns ``a`` (numpy for anything that is not a CuPy array)."""
    if type(a).__module__.startswith("cupy"):
        import cupy  # noqa: PLC0415

        return cupy
    return np
