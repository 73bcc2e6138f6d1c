"""`zhuge bench snapshot`: the synthetic store looks like the worker's, and the bench checks its own restore."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from bench.snapshot import fill_store
from gpu_kernels.features import WINDOW_CHANNELS
from streams.window_store import SNAPSHOT_VERSION


def test_the_synthetic_store_has_full_windows_with_gaps_and_small_counts():
    store, pending = fill_store(500, n_slots=288, slot_s=300)
    rows = store.active_rows()
    assert len(store) == 500 and 0 < len(pending) < 500
    counts = store.counts[rows]
    assert counts.max() == 5 and 0.01 < (counts[:, :, 0] == 0).mean() < 0.1  # one sample a minute, ~2-5 % gaps
    assert (counts[:, :, WINDOW_CHANNELS.index("net_mbps")] == 0).all(axis=1).any()  # VMs without network figures
    sums = store.sums[rows]
    assert np.isfinite(sums).all() and (sums[counts == 0] == 0).all()
    win = store.window(rows)
    assert np.isnan(win).any() and np.nanmax(win[:, :, WINDOW_CHANNELS.index("cpu_pct")]) <= 100


def test_cli_runs_both_paths_and_the_restore_is_exact(tmp_path):
    from app.cli import cli

    out = CliRunner().invoke(cli, ["bench", "snapshot", "--vms", "1500", "--repeats", "1", "--workdir", str(tmp_path), "--json"])
    assert out.exit_code == 0, out.output
    r = json.loads(out.output)
    assert [run["path"] for run in r["runs"]] == ["periodic", "shutdown"]
    assert all(run["exact"] and run["bytes"] > 0 for run in r["runs"])
    assert all(0 < run["cpu_s"] for run in r["runs"])  # the process's CPU until the file is written
    periodic, shutdown = r["runs"]
    assert periodic["bytes"] < shutdown["bytes"]  # deflated where it pays vs stored for a deadline
    assert set(r["median"]) == {"periodic", "shutdown"} and r["snapshot_version"] == SNAPSHOT_VERSION
