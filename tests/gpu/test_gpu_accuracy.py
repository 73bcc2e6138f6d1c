"""Live accuracy takes the forecaster's CuPy window and forecast as they are: the same pairs and
errors as from NumPy arrays (the tracker moves only the sampled VMs' rows to the host)."""

from __future__ import annotations

import numpy as np
import pytest

from gpu_kernels.xp import gpu_available
from streams.accuracy import LiveAccuracy

pytestmark = pytest.mark.gpu


@pytest.fixture(params=["numpy", "cupy"])
def xp(request):
    if request.param == "numpy":
        return np
    if not gpu_available():
        pytest.skip("CuPy with a CUDA device is not available")
    import cupy

    return cupy


def test_tracker_agrees_on_either_device(xp):
    rng = np.random.default_rng(4)
    horizons = np.array([1, 2, 3, 4, 6])
    vms = [f"vm-{i}" for i in range(64)]
    ref, got = LiveAccuracy(0.5, 100, 3600), LiveAccuracy(0.5, 100, 3600)
    for step in range(12):
        win = rng.uniform(0, 90, (64, 48, 4)).astype(np.float32)
        win[rng.random(win.shape) < 0.05] = np.nan
        pred = rng.uniform(0, 90, (64, horizons.size, 3, 2)).astype(np.float32)
        rows, last = np.arange(64), np.full(64, 500 + step)
        ref.observe(vms, rows, last, win, pred, horizons)
        got.observe(vms, rows, last, xp.asarray(win), xp.asarray(pred), horizons)
    assert ref.tally.counts.sum() > 0
    np.testing.assert_array_equal(got.tally.counts, ref.tally.counts)
    np.testing.assert_array_equal(got.tally.sums, ref.tally.sums)
