"""Backtest pieces: regret on toy cases with a known answer, and a small real-trace run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from app.settings import Settings
from training.evaluate import downtime_curve, quality_ok, regret_of, window_costs

DATA = Path(os.environ.get("ZHUGE_DATA_DIR") or Path(__file__).resolve().parents[2].parent / "shared" / "data")


def test_regret_is_incurred_minus_best_cost():
    costs = np.array([[30.0, 25.0, 10.0, 40.0], [5.0, 5.0, 9.0, 7.0]])
    np.testing.assert_allclose(regret_of(costs, np.array([0, 0])), [20.0, 0.0])
    np.testing.assert_allclose(regret_of(costs, np.array([2, 3])), [0.0, 2.0])


def test_a_long_migration_pays_the_worst_slot_it_covers():
    downtime = np.array([[10.0, 50.0, 10.0, 10.0]])
    costs = window_costs(downtime, np.full((1, 4), 2))
    # a start at 0 covers slots 0-1 (50), at 2 covers 2-3 (10); the last start is clipped at the horizon
    np.testing.assert_allclose(costs[0], [50.0, 50.0, 10.0, 10.0])
    assert regret_of(costs, np.array([0]))[0] == pytest.approx(40.0)


def test_a_quiet_slot_gives_the_lowest_actual_downtime():
    s = Settings.from_env({})
    dirty = np.full((1, 6), 900.0, dtype=np.float32)
    dirty[0, 4] = 10.0  # the guest is nearly idle in slot 4
    net = np.zeros_like(dirty)
    dt, dur = downtime_curve(dirty, net, np.array([8192.0], dtype=np.float32), s)
    assert int(np.argmin(dt[0])) == 4
    costs = window_costs(dt, np.ones_like(dur))
    assert regret_of(costs, np.array([0]))[0] > 0
    assert regret_of(costs, np.array([4]))[0] == 0


def test_quality_bar_reads_the_summary():
    summary = {
        "mae": {"1h": {"model": 1.0, "last": 2.0, "seasonal": 3.0, "mean": 4.0}},
        "coverage_q90": 0.99,
        "regret_ms": {"model": 1.0, "now": 2.0, "seasonal": 3.0},
    }
    assert quality_ok(summary) == {"mae_1h": True, "coverage": False, "regret": True}


@pytest.mark.skipif(not (DATA / "bitbrains-rnd-2013-08").is_dir(), reason="shared Bitbrains trace absent")
def test_evaluate_on_five_bitbrains_vms_prints_one_json_object(tmp_path: Path):
    from typer.testing import CliRunner

    from app.cli import cli

    res = CliRunner().invoke(
        cli,
        ["evaluate", str(DATA / "bitbrains-rnd-2013-08"), "--format", "bitbrains", "--vms", "1-5", "--json",
         "--trees", "15", "--max-train-rows", "20000", "--out", str(tmp_path)],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["n_vms"] == 5 and out["n_origins"] > 0
    for bucket in ("1h", "6h", "24h"):
        row = out["mae"][bucket]
        assert set(row) >= {"model", "last", "seasonal", "mean"}
        assert all(np.isfinite(v) and v >= 0 for v in row.values())
    assert 0.0 <= out["coverage_q90"] <= 1.0
    assert set(out["regret_ms"]) == {"model", "now", "seasonal", "served", "seasonal served"}
    assert all(v >= 0 for v in out["regret_ms"].values())
    assert len(out["mae_by_horizon"]) == 17 and {"5min", "45min", "1.5h", "24h"} <= set(out["mae_by_horizon"])
    assert all(q["p50"] <= q["p90"] <= q["p99"] for q in out["regret_ms_quantiles"].values())
    report = (tmp_path / "report.md").read_text()
    assert "| 24h | " in report and "| window regret (ms) | p50 | p90 | p99 |" in report


@pytest.mark.parametrize("depths", ["6,x", "6,0,6"])
def test_evaluate_refuses_bad_depths_before_reading_the_trace(depths: str, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from app.cli import cli

    res = CliRunner().invoke(cli, ["evaluate", str(tmp_path), "--format", "bitbrains", "--depths", depths])
    assert res.exit_code == 2 and "depths must be" in res.output
