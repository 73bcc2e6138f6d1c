"""Top-level test configuration: markers only (no fixtures with side effects here).

* tests under ``tests/integration`` get the ``integration`` marker automatically;
* ``gpu`` tests are skipped unless CuPy is importable and sees a CUDA device.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest

INTEGRATION_DIR = Path(__file__).resolve().parent / "integration"


@cache
def gpu_available() -> tuple[bool, str]:
    """(available, reason): checked locally so it works before ``gpu_kernels.xp`` exists."""
    try:
        import cupy
    except Exception as exc:  # noqa: BLE001 - ImportError or a broken CUDA install
        return False, f"CuPy not importable ({type(exc).__name__})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001 - no driver / no device
        return False, f"CuPy sees no CUDA device ({type(exc).__name__})"
    return (count > 0, f"CuPy sees {count} CUDA devices")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if INTEGRATION_DIR in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.integration)
        if item.get_closest_marker("gpu") is not None:
            ok, reason = gpu_available()
            if not ok:
                item.add_marker(pytest.mark.skip(reason=f"gpu test: {reason}"))
