"""Slot-grid construction: averaging, gaps, duplicates, channel derivation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from training.dataset import CHANNELS, future_at, slot_grid, window_at


def _frame(ts, cpu, **extra):
    n = len(ts)
    base = {
        "ts": ts,
        "cpu_pct": cpu,
        "dirty_mbps": extra.pop("dirty", np.full(n, 5.0)),
        "net_rx_kbps": np.full(n, 1024.0),
        "net_tx_kbps": np.full(n, 2048.0),
        "mem_used_mb": np.full(n, 500.0),
        "mem_total_mb": np.full(n, 1000.0),
        "vcpus": np.full(n, 2.0),
    }
    base.update(extra)
    return pd.DataFrame(base)


def test_samples_are_averaged_per_slot_and_gaps_are_nan():
    # slot 10 gets two samples, slot 11 none, slot 12 one
    df = _frame([3000.0, 3100.0, 3650.0], [10.0, 30.0, 50.0])
    g = slot_grid("a", df, slot_s=300)
    assert g.first_slot == 10 and g.n_slots == 3 and g.last_slot == 12
    cpu = g.values[:, CHANNELS.index("cpu_pct")]
    assert cpu[0] == pytest.approx(20.0)
    assert np.isnan(cpu[1])
    assert cpu[2] == pytest.approx(50.0)
    # net = (rx + tx) / 1024 MB/s
    assert g.values[0, CHANNELS.index("net_mbps")] == pytest.approx(3.0)
    assert g.mem_total_mb == 1000.0 and g.vcpus == 2.0


def test_duplicated_timestamps_keep_the_last_sample_once():
    df = _frame([0.0, 0.0, 10.0], [90.0, 10.0, 40.0])
    g = slot_grid("dup", df, slot_s=300)
    # duplicates at ts=0 collapse to the later one (10), then mean with 40
    assert g.values[0, 0] == pytest.approx(25.0)


def test_unsorted_input_is_sorted_and_missing_net_is_nan():
    df = _frame([900.0, 0.0], [2.0, 1.0])
    df["net_rx_kbps"] = np.nan
    df["net_tx_kbps"] = np.nan
    g = slot_grid("u", df, slot_s=300)
    np.testing.assert_array_equal(g.values[[0, 3], 0], [1.0, 2.0])
    assert np.isnan(g.values[:, CHANNELS.index("net_mbps")]).all()


def test_missing_dirty_rate_uses_the_serving_proxy():
    from gpu_kernels.downtime import dirty_rate_proxy  # noqa: F401  (skip cleanly if absent)

    df = _frame([0.0, 300.0], [50.0, 50.0], dirty=np.array([np.nan, 7.0]))
    g = slot_grid("p", df, slot_s=300)
    d = g.values[:, CHANNELS.index("dirty_mbps")]
    assert np.isfinite(d[0]) and d[0] >= 0
    assert d[1] == pytest.approx(7.0)


def test_windows_and_futures_pad_with_nan_outside_the_grid():
    df = _frame(np.arange(5) * 300.0, np.arange(5, dtype=float))
    g = slot_grid("w", df, slot_s=300)
    win = window_at(g, np.array([1, 4]), span=3)
    assert win.shape == (2, 3, len(CHANNELS))
    assert np.isnan(win[0, 0, 0]) and win[0, 2, 0] == 1.0
    np.testing.assert_array_equal(win[1, :, 0], [2.0, 3.0, 4.0])
    fut = future_at(g, np.array([3]), np.array([1, 2]))
    assert fut[0, 0, 0] == 4.0 and np.isnan(fut[0, 1, 0])


def test_no_timestamp_column_is_a_clear_error():
    with pytest.raises(ValueError, match="ts"):
        slot_grid("x", pd.DataFrame({"cpu_pct": [1.0]}))


def test_cpu_only_panel_gets_default_memory_and_zero_network():
    from training.dataset import panel_from_grids

    df = pd.DataFrame({"ts": [0.0, 600.0], "cpu_pct": [10.0, 20.0], "dirty_mbps": [1.0, 2.0]})
    g1 = slot_grid("a", df)
    g2 = slot_grid("b", df.assign(ts=df["ts"] + 300.0))
    p = panel_from_grids([g1, g2], default_mem_mb=4096.0, zero_unmeasured_net=True)
    assert p.series.shape == (2, 4, len(CHANNELS)) and p.first_slot == 0
    np.testing.assert_array_equal(p.mem_total_mb, [4096.0, 4096.0])
    net = p.series[:, :, CHANNELS.index("net_mbps")]
    np.testing.assert_array_equal(net[0], [0.0, np.nan, 0.0, np.nan])  # 0 only where the VM reported
    assert np.isnan(p.series[1, 0, 0]) and p.series[1, 1, 0] == 10.0
