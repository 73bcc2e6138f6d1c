"""The synthetic fleet: shapes, physical ranges, determinism, visible cycles, and the
downtime picture it gives the default qemu model (who can migrate at peak, at night, never)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import numpy as np
import pytest

from sim.fleet import DIRTY_MAX_MBPS, FIELDS, HEAVY_LOAD_EXPONENT, VM_TYPES, WSS_CALC_S, Fleet, series

START = 1_704_067_200.0  # a Monday 00:00 UTC
DATA = Path(os.environ.get("ZHUGE_DATA_DIR", Path(__file__).resolve().parents[2].parent / "shared" / "data"))


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
    assert (week["wss_mb"] <= week["mem_used_mb"]).all() and (week["wss_mb"] > 0).all()
    # distinct pages dirtied in a second fit the working set, and no guest writes faster than the cap
    assert (week["dirty_mbps"] <= week["wss_mb"] / WSS_CALC_S).all() and (week["dirty_mbps"] <= DIRTY_MAX_MBPS).all()
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
    # Within each population: at the same CPU the write-heavy minority dirties ~30x more per GiB
    # than the others, so one correlation over both would mostly measure who is write-heavy.
    heavy = Fleet(200, 10, seed=3).write_heavy
    for group in (~heavy, heavy):
        corr = np.corrcoef(cpu[:, group].ravel(), dirty[:, group].ravel() / mem[:, group].ravel())[0, 1]
        assert corr > 0.3
    per_vm = [np.corrcoef(cpu[:, i], dirty[:, i])[0, 1] for i in range(cpu.shape[1])]
    assert np.median(per_vm) > 0.8  # each VM's dirty rate follows its own load
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


# --- the working set, the write-heavy minority and what the default downtime model makes of them ----


def hourly(a: np.ndarray) -> np.ndarray:
    """``(288, V)`` five-minute samples of one day -> ``(24, V)`` hourly means."""
    return a.reshape(24, 12, -1).mean(axis=1)


@pytest.fixture(scope="module")
def day():
    """One weekday of a 1000-VM fleet, as ``zhuge demo``/``zhuge simulate`` produce it."""
    return series(1000, 50, START, 288, 300.0, seed=0)


def migration_picture(day) -> dict[str, np.ndarray]:
    """Per VM: converges all day / only away from its peak hour / never, with the DEFAULT settings.

    The default qemu model at each hour's mean memory used, dirty rate and working set,
    over the full link (``link_mbps``); a VM's peak and quiet hours are those of its CPU load.
    """
    from app.settings import Settings
    from gpu_kernels.downtime import PrecopyParams, precopy_with

    params = PrecopyParams.from_settings(Settings.from_env({}))
    assert params.model == "qemu" and params.link_mbps == 1250.0 and params.timeout_s == 300.0
    assert params.downtime_target_ms == 300.0 and params.on_timeout == "abort"
    mem, dirty, wss = (hourly(day[f]) for f in ("mem_used_mb", "dirty_mbps", "wss_mb"))
    conv = np.asarray(precopy_with(params, mem, dirty, params.link_mbps, np, wss).converged)  # (24, V)
    cpu = hourly(day["cpu_pct"])
    vms = np.arange(cpu.shape[1])
    at_peak, at_quiet = conv[cpu.argmax(axis=0), vms], conv[cpu.argmin(axis=0), vms]
    return {"all_day": conv.all(axis=0), "not_at_peak": ~at_peak & at_quiet, "never": ~conv.any(axis=0)}


def test_default_model_sees_peak_bound_write_heavy_vms(day):
    """The window search has something to decide: a share of the fleet must wait for its night."""
    shares = {k: float(v.mean()) for k, v in migration_picture(day).items()}
    # measured with seed 0: all day 0.837, not at peak but at the quiet hour 0.134, never 0.025
    assert 0.10 <= shares["not_at_peak"] <= 0.25, shares
    assert 0.70 <= shares["all_day"] <= 0.90, shares
    assert 0.005 <= shares["never"] <= 0.04, shares


def test_write_heavy_minority_is_more_likely_large():
    fleet = Fleet(4000, 100, seed=5)
    assert 0.10 <= fleet.write_heavy.mean() <= 0.25
    share = [fleet.write_heavy[fleet.vm_type == t].mean() for t in range(len(VM_TYPES))]
    assert share == sorted(share) and share[-1] > 3 * share[0]  # small ... xlarge


def test_working_set_is_small_for_most_and_large_for_write_heavy(day):
    heavy = Fleet(1000, 50, seed=0).write_heavy
    frac = day["wss_mb"] / day["mem_used_mb"]
    assert np.median(frac[:, ~heavy]) < 0.15 and np.percentile(frac[:, ~heavy], 5) >= 0.02
    assert np.median(frac[:, heavy]) > 0.5 and frac[:, heavy].max() <= 0.9 + 1e-12


def test_dirty_rate_spread_is_heavy_tailed(day):
    heavy = Fleet(1000, 50, seed=0).write_heavy
    peak = hourly(day["dirty_mbps"]).max(axis=0)  # each VM's busiest hour
    assert np.median(peak[~heavy]) < 30 and np.percentile(peak[~heavy], 99) < 500  # a few to tens of MB/s
    assert np.median(peak[heavy]) > 1000 and np.percentile(peak[heavy], 90) < 3500  # ~1-3 GB/s at peak


def test_write_heavy_dirty_rate_follows_their_load(day):
    """Peak/trough dirty-rate ratio ~ (peak/trough CPU ratio) ** HEAVY_LOAD_EXPONENT, VM by VM."""
    heavy = Fleet(1000, 50, seed=0).write_heavy
    cpu, dirty = hourly(day["cpu_pct"])[:, heavy], hourly(day["dirty_mbps"])[:, heavy]
    vms = np.arange(cpu.shape[1])
    peak, quiet = cpu.argmax(axis=0), cpu.argmin(axis=0)
    load_ratio = np.log(cpu[peak, vms] / cpu[quiet, vms])
    dirty_ratio = np.log(dirty[peak, vms] / dirty[quiet, vms])
    assert np.corrcoef(load_ratio, dirty_ratio)[0, 1] > 0.85
    slope = np.median(dirty_ratio / load_ratio)
    assert 0.8 * HEAVY_LOAD_EXPONENT <= slope <= 1.1 * HEAVY_LOAD_EXPONENT
    assert (dirty_ratio > 0).mean() > 0.95  # quieter at night, nearly always
    swings = load_ratio > np.log(3.0)  # a marked diurnal cycle: the night is far lower still
    assert np.median(dirty_ratio[swings] - load_ratio[swings]) > np.log(2.0)


async def test_simulate_sends_the_working_set(monkeypatch):
    """``zhuge simulate``'s path: every sample carries ``wss_mb``, and passes the contract."""
    import aiokafka

    import app.topics
    from app.settings import Settings
    from sim.produce import simulate
    from streams.schema import METRICS, decode_messages

    sent: list[bytes] = []

    class FakeProducer:
        def __init__(self, **kwargs):
            pass

        async def start(self):
            pass

        async def stop(self):
            pass

        async def send(self, topic, value, key=None):
            sent.append(value)
            done = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done

    async def no_topics(settings, topics):
        pass

    monkeypatch.setattr(aiokafka, "AIOKafkaProducer", FakeProducer)
    monkeypatch.setattr(app.topics, "ensure_topics", no_topics)
    prog = await simulate(Settings.from_env({}), n_vms=40, n_hosts=4, start_ts=START, n_steps=2, period_s=300.0,
                          realtime=False, batched=True, seed=3, topic="t")  # fmt: skip
    assert prog.samples == 80 and len(sent) == 8  # one array per host and period
    got = decode_messages(sent, now=START + 600)
    assert len(got) == 80 and not got.rejected
    wss = got.values[:, METRICS.index("wss_mb")]
    used = got.values[:, METRICS.index("mem_used_mb")]
    assert np.isfinite(wss).all() and (wss <= used + 1e-3).all()


def test_replayed_traces_have_no_working_set():
    """``zhuge replay``: the traces measure no working set, so ``wss_mb`` stays absent (W = M)."""
    bb = DATA / "bitbrains-rnd-2013-08"
    if not bb.exists():
        pytest.skip(f"{bb} absent")
    from sim.produce import encode_rows
    from sim.replay import ReplayStats, load_rows
    from streams.schema import METRICS

    rows = load_rows("bitbrains", bb, "1", 0.0, ReplayStats()).head(50)
    assert "wss_mb" not in rows
    cols = {m: rows[m].to_numpy(np.float64) for m in METRICS if m in rows}
    records = encode_rows(rows["vm"].astype(str).tolist(), rows["ts"].to_numpy(np.float64), cols)
    assert records and all(b"wss_mb" not in value for _, value in records)
