"""Top-level test configuration: markers only (no fixtures with side effects here).

* tests under ``tests/integration`` get the ``integration`` marker automatically;
* every test is in one of two ``xdist_group``s, the fault suite (``tests/faults``) or the rest,
  so ``make test`` (``-n 2 --dist loadgroup``) runs the fault suite beside the rest: its
  outages are mostly waiting (the broker stopped 60 s), on a Kafka and Redis of its own;
* ``gpu`` tests are skipped unless CuPy is importable and sees a CUDA device.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest

INTEGRATION_DIR = Path(__file__).resolve().parent / "integration"
FAULTS_DIR = Path(__file__).resolve().parent / "faults"


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
    grouped = config.pluginmanager.hasplugin("xdist")  # its marker is unknown without it (-p no:xdist)
    for item in items:
        parents = Path(str(item.path)).resolve().parents
        if INTEGRATION_DIR in parents:
            item.add_marker(pytest.mark.integration)
        if grouped:
            item.add_marker(pytest.mark.xdist_group("faults" if FAULTS_DIR in parents else "rest"))
        if item.get_closest_marker("gpu") is not None:
            ok, reason = gpu_available()
            if not ok:
                item.add_marker(pytest.mark.skip(reason=f"gpu test: {reason}"))
