"""`zhuge bench score`: the timed step runs end to end and says when it extrapolates."""

from __future__ import annotations

import numpy as np
from typer.testing import CliRunner

from app.settings import Settings
from bench.score import format_bench, run_bench, synthetic_windows
from gpu_kernels.features import TARGETS, WINDOW_CHANNELS


class FlatModel:
    version = "flat-test"
    horizons = np.array([1, 6, 24])

    def predict(self, X, device="cpu"):
        out = np.ones((X.shape[0], len(TARGETS), 2), np.float32)
        out[:, :, 1] = 2
        return out


def test_synthetic_windows_follow_the_window_contract():
    win, attrs = synthetic_windows(7, 12, 300, np)
    assert win.shape == (7, 12, len(WINDOW_CHANNELS)) and win.dtype == np.float32
    assert attrs["last_slot"].dtype == np.int64 and attrs["mem_total_mb"].shape == (7,)


def test_cpu_sample_is_extrapolated_and_labelled():
    s = Settings.from_env({}, horizon_s=24 * 300)
    r = run_bench(s, vms=400, slots=24, device="cpu", cpu_sample=100, model=FlatModel())
    (t,) = r.runs
    assert t.extrapolated_from == 100 and t.vms == 400
    assert t.slot_predictions_per_s == t.vms_per_s * 24
    assert "EXTRAPOLATED" in format_bench(r)


def test_cli_registers_bench_score():
    from app.cli import cli

    out = CliRunner().invoke(cli, ["bench", "score", "--help"])
    assert out.exit_code == 0 and "--compare-cpu" in out.output
