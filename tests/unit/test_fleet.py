"""The synthetic fleet: shapes, physical ranges, determinism, visible cycles."""

from __future__ import annotations

import numpy as np
import pytest

from sim.fleet import FIELDS, Fleet, series

START = 1_704_067_200.0  # a Monday 00:00 UTC


@pytest.fixture(scope="module")
def week():
    return series(200, 10, START, 7 * 288, 300.0, seed=3)


def test_series_shapes_and_ids(week):
    for f in FIELDS:
        assert week[f].shape == (7 * 288, 200) and week[f].dtype == np.float64
    assert week["ts"].shape == (7 * 288,) and week["ts"][1] - week["ts"][0] == 300.0
    assert week["vm"][0] == "vm-000001" and week["vm"][-1] == "vm-000200"
    assert set(week["host"]) <= {f"host-{i:04d}" for i in range(1, 11)}
    assert len(set(week["host"])) == 10  # every host gets VMs


def test_ranges_are_physical(week):
    assert ((week["cpu_pct"] >= 0) & (week["cpu_pct"] <= 100)).all()
    assert (week["mem_used_mb"] <= week["mem_total_mb"]).all() and (week["mem_used_mb"] > 0).all()
    for f in FIELDS:
        assert np.isfinite(week[f]).all() and (week[f] >= 0).all(), f
    assert set(np.unique(week["vcpus"])) <= {2, 4, 8, 16}


def test_same_seed_same_series_other_seed_differs():
    a = series(50, 5, START, 20, 300.0, seed=7)
    b = series(50, 5, START, 20, 300.0, seed=7)
    c = series(50, 5, START, 20, 300.0, seed=8)
    assert all(np.array_equal(a[f], b[f]) for f in FIELDS)
    assert not np.array_equal(a["cpu_pct"], c["cpu_pct"])


def test_series_equals_successive_samples():
    s = series(30, 3, START, 5, 300.0, seed=1)
    fleet = Fleet(30, 3, seed=1)
    for i in range(5):
        got = fleet.sample(START + i * 300.0)
        assert np.array_equal(got.cpu_pct, s["cpu_pct"][i]) and np.array_equal(got.dirty_mbps, s["dirty_mbps"][i])


def test_diurnal_cycle_is_visible(week):
    hour = ((week["ts"] % 86400) // 3600).astype(int)
    hourly = np.array([week["cpu_pct"][hour == h].mean() for h in range(24)])
    assert hourly.max() > 1.3 * hourly.min()
    assert 10 <= int(hourly.argmax()) <= 18  # afternoon peak (UTC) on average


def test_dirty_rate_follows_load_and_size(week):
    cpu, dirty, mem = week["cpu_pct"], week["dirty_mbps"], week["mem_total_mb"]
    corr = np.corrcoef(cpu.ravel(), dirty.ravel() / mem.ravel())[0, 1]
    assert corr > 0.3
    big, small = mem[0] >= 32768, mem[0] <= 4096
    assert dirty[:, big].mean() > dirty[:, small].mean()


def test_host_traffic_is_sum_of_its_vms():
    fleet = Fleet(40, 4, seed=2)
    s = fleet.sample(START)
    rx, tx = s.host_net_kbps(fleet.host_index, 4)
    assert np.isclose(rx.sum(), s.net_rx_kbps.sum()) and np.isclose(rx[0], s.net_rx_kbps[fleet.host_index == 0].sum())
    assert tx.shape == (4,)


def test_bad_sizes_raise():
    with pytest.raises(ValueError):
        Fleet(0, 1)
