"""Window store: slot means, gaps, drops, growth, eviction, host traffic, snapshots."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gpu_kernels.downtime import dirty_rate_proxy
from gpu_kernels.features import WINDOW_CHANNELS
from streams.recovery import SnapshotStore
from streams.schema import METRICS
from streams.testing import store_differences
from streams.window_store import SNAPSHOT_VERSION, WindowStore, derive_channels

DATA = Path(__file__).resolve().parent / "data"

SLOT = 300
M = {n: i for i, n in enumerate(METRICS)}
CPU, DIRTY, NET, MEM = (WINDOW_CHANNELS.index(c) for c in ("cpu_pct", "dirty_mbps", "net_mbps", "mem_used_mb"))


def samples(n, rng, nan_frac=0.0):
    v = rng.uniform(1, 100, (n, len(METRICS))).astype(np.float32)
    v[rng.random(v.shape) < nan_frac] = np.nan
    return v


def test_slot_means_match_a_groupby_reference():
    rng = np.random.default_rng(1)
    n, S = 3000, 16
    vm = [f"vm{i}" for i in rng.integers(0, 40, n)]
    t0 = 1_700_000_000 - 1_700_000_000 % SLOT
    ts = t0 + rng.uniform(0, S * SLOT, n)
    vals = samples(n, rng, nan_frac=0.1)
    store = WindowStore(S, SLOT, 3600, capacity=4)
    for part in np.array_split(np.arange(n), 5):  # several batches, arbitrary order
        store.update([vm[i] for i in part], ["h"] * len(part), ts[part], vals[part])
    ch = derive_channels(vals)
    df = pd.DataFrame(ch, columns=list(WINDOW_CHANNELS)).assign(vm=vm, slot=(ts // SLOT).astype(np.int64))
    ref = df.groupby(["vm", "slot"]).mean()  # pandas skips NaN like the store
    rows = store.rows_of(sorted(set(vm)))
    win, attrs = store.windows(rows)
    assert win.shape == (len(rows), S, len(WINDOW_CHANNELS)) and win.dtype == np.float32
    for i, name in enumerate(attrs["vm"]):
        last = attrs["last_slot"][i]
        assert last == df.loc[df.vm == name, "slot"].max()
        expect = ref.loc[name].reindex(np.arange(last - S + 1, last + 1)).to_numpy(np.float32)
        np.testing.assert_allclose(win[i], expect, rtol=1e-5, equal_nan=True)


def test_gap_slots_are_nan_and_wraparound_clears_old_data():
    rng = np.random.default_rng(2)
    store = WindowStore(8, SLOT, 1e9)
    t0 = 1000 * SLOT
    store.update(["a"] * 3, ["h"] * 3, np.array([t0, t0 + SLOT, t0 + 2 * SLOT], float), samples(3, rng))
    store.update(["a"], ["h"], np.array([t0 + 5 * SLOT + 1.0]), samples(1, rng))
    win, _ = store.windows(store.rows_of(["a"]))
    observed = ~np.isnan(win[0, :, CPU])
    # window covers slots t0-2 .. t0+5: observed at t0, t0+1, t0+2, t0+5
    np.testing.assert_array_equal(observed, [0, 0, 1, 1, 1, 0, 0, 1])
    # jump a whole window ahead: only the new sample remains
    store.update(["a"], ["h"], np.array([t0 + 20 * SLOT]), samples(1, rng))
    win, _ = store.windows(store.rows_of(["a"]))
    assert (~np.isnan(win[0, :, CPU])).sum() == 1 and not np.isnan(win[0, -1, CPU])


def test_samples_older_than_the_window_are_dropped_and_counted():
    rng = np.random.default_rng(3)
    store = WindowStore(4, SLOT, 1e9)
    t0 = 1000 * SLOT
    store.update(["a"], ["h"], np.array([t0 + 10 * SLOT]), samples(1, rng))
    late = np.array([t0 + 9 * SLOT, t0 + 2 * SLOT])  # one inside, one far too old
    store.update(["a", "a"], ["h", "h"], late, samples(2, rng))
    assert store.dropped_old == 1
    win, _ = store.windows(store.rows_of(["a"]))
    assert (~np.isnan(win[0, :, CPU])).sum() == 2


def test_channels_use_measured_dirty_else_proxy_and_net_in_mbps():
    v = np.full((2, len(METRICS)), np.nan, np.float32)
    v[:, M["cpu_pct"]] = 40
    v[:, M["vcpus"]] = 2
    v[:, M["mem_used_mb"]] = 4096
    v[:, M["disk_write_kbps"]] = 512
    v[0, M["dirty_mbps"]] = 77
    v[:, M["net_rx_kbps"]] = [1024, np.nan]
    v[:, M["net_tx_kbps"]] = [2048, np.nan]
    ch = derive_channels(v)
    assert ch[0, DIRTY] == 77
    assert ch[1, DIRTY] == pytest.approx(float(dirty_rate_proxy(40.0, 2.0, 4096.0, 512.0)))
    assert ch[0, NET] == pytest.approx(3.0) and np.isnan(ch[1, NET])


def test_grows_by_doubling_and_evicts_idle_rows_cleanly():
    rng = np.random.default_rng(4)
    store = WindowStore(4, SLOT, ttl_s=600, capacity=2)
    t0 = 1000 * SLOT
    store.update([f"v{i}" for i in range(5)], ["h"] * 5, np.full(5, t0), samples(5, rng), seen=t0)
    assert store.capacity == 8 and len(store) == 5
    store.update(["v0"], ["h"], np.array([t0 + 1200.0]), samples(1, rng), seen=t0 + 1200.0)
    gone = store.evict_idle(now=t0 + 1200.0)
    assert sorted(gone) == ["v1", "v2", "v3", "v4"] and len(store) == 1
    # a reused row starts empty
    store.update(["new"], ["h"], np.array([t0 + 1200.0]), samples(1, rng))
    win, _ = store.windows(store.rows_of(["new"]))
    assert (~np.isnan(win[0, :, CPU])).sum() == 1


def test_eviction_follows_arrival_time_not_sample_time():
    """A sample stamped a day ahead makes no other VM look idle; an old trace replayed now stays alive."""
    rng = np.random.default_rng(5)
    store = WindowStore(288, SLOT, ttl_s=600)
    now = 1_700_000_000.0
    store.update(["old-trace"], ["h"], np.array([now - 365 * 86400.0]), samples(1, rng), seen=now)
    store.update(["a", "b"], ["h", "h"], np.array([now, now]), samples(2, rng), seen=now)
    store.update(["future"], ["h"], np.array([now + 86000.0]), samples(1, rng), seen=now + 60)
    assert store.evict_idle(now=now + 120) == []
    assert sorted(store.evict_idle(now=now + 650)) == ["a", "b", "old-trace"]
    assert store.evict_idle(now=now + 700) == ["future"]


def test_long_and_similar_ids_stay_distinct_vms():
    rng = np.random.default_rng(6)
    store = WindowStore(8, SLOT, ttl_s=1e9)
    ids = ["x" * 256, "x" * 255, "vm-1", "vm-1 ", "VM-1"]
    store.update(ids, ["h"] * 5, np.full(5, 1000.0 * SLOT), samples(5, rng))
    assert sorted(store.row_of) == sorted(ids)


def test_host_traffic_sums_latest_net_of_the_host():
    store = WindowStore(4, SLOT, 1e9)
    v = np.full((4, len(METRICS)), np.nan, np.float32)
    v[:, M["net_rx_kbps"]] = [1024, 2048, 4096, 9999]
    v[:, M["net_tx_kbps"]] = 0
    ts = np.array([0.0, 0.0, 0.0, -10.0]) + 1000 * SLOT
    store.update(["a", "b", "c", "a"], ["h1", "h1", "h2", "h1"], ts, v)  # a's older sample is not "latest"
    rows = store.rows_of(["a", "b", "c"])
    np.testing.assert_allclose(store.host_traffic_mbps(rows), [3.0, 3.0, 4.0])
    np.testing.assert_allclose(store.host_traffic_mbps(rows, exclude_self=True), [2.0, 1.0, 0.0])


def test_attributes_come_from_the_newest_sample():
    store = WindowStore(4, SLOT, 1e9)
    v = np.full((2, len(METRICS)), np.nan, np.float32)
    v[:, M["mem_total_mb"]] = [8192, 4096]
    v[:, M["vcpus"]] = [8, 4]
    store.update(["a", "a"], ["h-new", "h-old"], np.array([2000.0, 1000.0]) + 1000 * SLOT, v)
    _, attrs = store.windows(store.rows_of(["a"]))
    assert attrs["mem_total_mb"][0] == 8192 and attrs["vcpus"][0] == 8 and attrs["host"] == ["h-new"]


def test_snapshot_round_trips_through_npz_without_pickle():
    rng = np.random.default_rng(5)
    store = WindowStore(12, SLOT, 3600)
    n = 500
    vm = [f"vm{i}" for i in rng.integers(0, 30, n)]
    host = [f"h{int(x[2:]) % 4}" for x in vm]
    store.update(vm, host, 1000 * SLOT + rng.uniform(0, 12 * SLOT, n), samples(n, rng, 0.1))
    store.release(store.rows_of(["vm3"]))
    buf = io.BytesIO()
    np.savez(buf, **store.snapshot())
    buf.seek(0)
    with np.load(buf, allow_pickle=False) as z:
        back = WindowStore.restore({k: z[k] for k in z.files})
    names = sorted(store.row_of)
    assert sorted(back.row_of) == names and "vm3" not in names
    w1, a1 = store.windows(store.rows_of(names))
    w2, a2 = back.windows(back.rows_of(names))
    np.testing.assert_array_equal(w1, w2)
    assert a1["host"] == a2["host"]
    np.testing.assert_array_equal(a1["last_ts"], a2["last_ts"])
    np.testing.assert_allclose(store.host_traffic_mbps(store.rows_of(names)), back.host_traffic_mbps(back.rows_of(names)))


def _fixture_store(seed: int, released: str) -> WindowStore:
    """400 samples of 12 VMs over 14 slots of a 12-slot window, one batch, then ``released`` let go."""
    rng = np.random.default_rng(seed)
    store = WindowStore(12, SLOT, 3600, capacity=4)
    n = 400
    vm = [f"vm{i}" for i in rng.integers(0, 12, n)]
    host = [f"h{int(x[2:]) % 3}" for x in vm]
    store.update(vm, host, 1000 * SLOT + rng.uniform(0, 14 * SLOT, n), samples(n, rng, 0.2), seen=1_700_000_000.0)
    store.release(store.rows_of([released]))
    return store


def _load_fixture_snapshot(tmp_path, name: str):  # noqa: ANN001, ANN202
    """Partition 0's snapshot of group ``g``, topic ``t``, as the committed file ``data/<name>``."""
    target = tmp_path / "g" / "t" / "p0000.npz"
    target.parent.mkdir(parents=True)
    shutil.copy(DATA / name, target)
    return SnapshotStore(str(tmp_path), "g", "t").load(0)


def v1_fixture_store() -> tuple[WindowStore, list[str]]:
    """The store in ``data/window_snapshot_v1.npz``, and the pending VMs saved with it.

    That file was written by the code of commit a1fe9ef (snapshot version 1, file
    format 1: a plain ``np.savez``, counts int32): ``WindowStore.snapshot()`` of this
    store plus ``pending_vm``, through ``SnapshotStore.save(0, arrays, 42, 1234)``.
    Row 4's VM was released, so the active rows have a hole.
    """
    return _fixture_store(7, "vm4"), ["vm1", "vm7"]


def test_a_version_1_snapshot_of_the_previous_release_still_restores_exactly(tmp_path):
    """A worker upgraded in place resumes from the snapshot its previous version wrote."""
    snap = _load_fixture_snapshot(tmp_path, "window_snapshot_v1.npz")
    assert snap is not None and snap.next_offset == 42 and snap.last_record_crc == 1234
    assert int(snap.arrays["config"][0]) == 1 and snap.arrays["counts"].dtype == np.int32  # really the old format
    back = WindowStore.restore(snap.arrays)
    store, pending = v1_fixture_store()
    assert np.isnan(back.profile).all()  # a version 1 snapshot holds no daily profile
    assert store_differences(store, back) == []
    assert snap.arrays["pending_vm"].tolist() == pending
    rows = store.rows_of(sorted(store.row_of))
    np.testing.assert_array_equal(store.window(rows), back.window(back.rows_of(sorted(store.row_of))))


def v2_fixture_store() -> tuple[WindowStore, list[str]]:
    """The store in ``data/window_snapshot_v2.npz``, and the pending VMs saved with it.

    Written by the code of commit 00fc426 (snapshot version 2, counts uint8; file format 2)
    through ``SnapshotStore.save(0, arrays, 43, 4321)``; row 5's VM was released. Its
    samples span 14 slots of a 12-slot window, all in one batch: nothing was folded into
    the daily profile, so the store rebuilt by today's code has an empty one too.
    """
    return _fixture_store(8, "vm5"), ["vm2", "vm9"]


def test_a_version_2_snapshot_restores_exactly_with_an_empty_profile(tmp_path):
    snap = _load_fixture_snapshot(tmp_path, "window_snapshot_v2.npz")
    assert snap is not None and snap.next_offset == 43 and snap.last_record_crc == 4321
    assert int(snap.arrays["config"][0]) == 2 and "profile" not in snap.arrays and snap.arrays["counts"].dtype == np.uint8
    back = WindowStore.restore(snap.arrays)
    store, pending = v2_fixture_store()
    assert np.isnan(store.profile).all() and np.isnan(back.profile).all()
    assert store_differences(store, back) == []
    assert snap.arrays["pending_vm"].tolist() == pending
    # the restored store folds from then on like any other
    r = back.rows_of(["vm1"])
    back.update(["vm1"], ["h1"], np.array([(back.last_slot[r[0]] + 3) * SLOT + 1.0]), samples(1, np.random.default_rng(0)))
    assert np.isfinite(back.profiles(r)).any()


def v3_fixture_store() -> tuple[WindowStore, list[str]]:
    """The store in ``data/window_snapshot_v3.npz``, and the pending VMs saved with it.

    Written by the code of commit 2f3d0a4 (snapshot version 3: with the daily profile, before
    the weekly one) through ``SnapshotStore.save(0, arrays, 44, 5678)``: 4 batches of 300
    samples of 12 VMs, 10 slots each, through a 12-slot window, so some slots were folded;
    then row 6's VM was released.
    """
    rng = np.random.default_rng(9)
    store = WindowStore(12, SLOT, 3600, capacity=4)
    for b in range(4):
        vm = [f"vm{i}" for i in rng.integers(0, 12, 300)]
        host = [f"h{int(x[2:]) % 3}" for x in vm]
        store.update(vm, host, (1200 + 10 * b) * SLOT + rng.uniform(0, 10 * SLOT, 300), samples(300, rng, 0.2), seen=1_700_000_000.0)
    store.release(store.rows_of(["vm6"]))
    return store, ["vm3", "vm8"]


def test_a_version_3_snapshot_restores_exactly_with_an_empty_weekly_profile(tmp_path):
    snap = _load_fixture_snapshot(tmp_path, "window_snapshot_v3.npz")
    assert snap is not None and snap.next_offset == 44 and snap.last_record_crc == 5678
    assert int(snap.arrays["config"][0]) == 3 and "week" not in snap.arrays
    back = WindowStore.restore(snap.arrays)
    store, pending = v3_fixture_store()
    assert np.isfinite(store.profile).any() and np.isfinite(store.week).any()  # today's code folds both
    assert np.isnan(back.week).all()  # the old file had no weekly profile: it starts empty
    assert store_differences(store, back) == ["week"]  # and everything else is restored bit for bit
    assert snap.arrays["pending_vm"].tolist() == pending
    r = back.rows_of(["vm1"])  # it refills as hours leave the window
    back.update(["vm1"], ["h1"], np.array([(back.last_slot[r[0]] + 13) * SLOT + 1.0]), samples(1, np.random.default_rng(0)))
    assert np.isfinite(back.weeklies(r)).any()


@pytest.mark.parametrize("top, dtype", [(5, np.uint8), (255, np.uint8), (256, np.uint16), (70_000, np.uint32)])
def test_snapshot_counts_take_the_smallest_unsigned_dtype_and_round_trip_exactly(tmp_path, top, dtype):
    rng = np.random.default_rng(11)
    store = WindowStore(288, SLOT, 3600)
    n = 3000  # sums of 3000 x 288 x 4 float32 > 1 MiB: written as byte planes
    vm = [f"vm{i}" for i in range(n)]
    store.update(vm, [f"h{i % 7}" for i in range(n)], 1000 * SLOT + rng.uniform(0, 288 * SLOT, n), samples(n, rng, 0.1))
    store.counts[store.rows_of(["vm3"])[0], 5, 0] = top  # one busy cell decides the dtype
    old = store.rows_of([f"vm{i}" for i in range(0, n, 3)])  # a third of the VMs have a daily profile
    store.profile[old] = rng.uniform(0, 100, (len(old), 288, 3)).astype(np.float32)
    store.profile[old[:, None], rng.integers(0, 288, (len(old), 20))] = np.nan  # with holes
    store.week[old] = rng.uniform(0, 100, (len(old), 168, 3)).astype(np.float32)  # and a weekly profile
    store.release(store.rows_of(["vm10", "vm11"]))
    arrays = store.snapshot()
    assert int(arrays["config"][0]) == SNAPSHOT_VERSION == 4
    assert arrays["counts"].dtype == dtype and arrays["sums"].dtype == np.float32 and arrays["profile"].dtype == np.float32
    snaps = SnapshotStore(str(tmp_path), "g", "t")
    snaps.save(3, arrays, 77, 99)
    with np.load(tmp_path / "g" / "t" / "p0003.npz", allow_pickle=False) as z:  # a plain npz, no pickle
        assert int(z["__format__"]) == 2 and "sums@0.3" in z.files and "sums" not in z.files
        assert "profile@2.3" in z.files and "profile" not in z.files
    snap = snaps.load(3)
    assert snap is not None and snap.next_offset == 77 and snap.last_record_crc == 99
    assert snap.arrays["sums"].tobytes() == arrays["sums"].tobytes()
    assert snap.arrays["profile"].tobytes() == arrays["profile"].tobytes()
    assert snap.arrays["week"].tobytes() == arrays["week"].tobytes()
    assert snap.arrays["counts"].dtype == dtype and np.array_equal(snap.arrays["counts"], arrays["counts"])
    back = WindowStore.restore(snap.arrays)
    assert store_differences(store, back) == []
    assert back.counts.dtype == np.int32 and int(back.counts.max()) == top


def test_a_snapshot_of_an_unknown_version_is_refused():
    store = WindowStore(4, SLOT, 3600)
    store.update(["a"], ["h"], np.array([1000.0 * SLOT]), samples(1, np.random.default_rng(0)))
    arrays = store.snapshot()
    arrays["config"][0] = SNAPSHOT_VERSION + 1
    with pytest.raises(ValueError, match="version"):
        WindowStore.restore(arrays)


def test_an_empty_store_round_trips(tmp_path):
    store = WindowStore(288, SLOT, 3600)
    snaps = SnapshotStore(str(tmp_path), "g", "t")
    snaps.save(0, store.snapshot(), 0)
    back = WindowStore.restore(snaps.load(0).arrays)
    assert len(back) == 0 and store_differences(store, back) == []


def test_bytes_per_vm_is_reported():
    store = WindowStore(288, SLOT, 3600)
    assert store.nbytes_per_vm >= 288 * len(WINDOW_CHANNELS) * 8
    assert store.nbytes >= store.capacity * 288 * len(WINDOW_CHANNELS) * 8


def test_rejects_misshapen_values():
    store = WindowStore(4, SLOT, 1e9)
    with pytest.raises(ValueError, match="METRICS"):
        store.update(["a"], ["h"], np.array([0.0]), np.zeros((1, 3)))
