"""The window store's daily and weekly profiles: serving's state equals training's reconstruction
(``profiles_at``, ``weeklies_at``).

A multi-day series of a few VMs (random values, NaN channels, missing slots, a
silence longer than the window, different first and last slots) is streamed into
a ``WindowStore`` in time-ordered batches (shuffled within, some samples a batch
late); at the end the store's profiles must equal ``features.profiles_at`` and ``weeklies_at`` on the
slot means of the same samples, and ``build_features`` on the store's windows and
profiles must equal ``training_examples``' rows for the same origins.
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest

from gpu_kernels.features import (
    PROFILE_ALPHA,
    TARGETS,
    WINDOW_CHANNELS,
    build_features,
    profiles_at,
    slots_per_day,
    training_examples,
    week_buckets,
    weeklies_at,
    windows_at,
)
from streams.recovery import SnapshotStore
from streams.schema import METRICS
from streams.testing import store_differences
from streams.window_store import WindowStore, derive_channels

M = {n: i for i, n in enumerate(METRICS)}
HORIZONS = np.array([1, 2, 5, 12])


def stream(slot_s: int, S: int, days: float, seed: int = 0, batch_slots: int = 3):
    """Samples of 5 VMs over ``days``; returns what the store needs and what training needs."""
    rng = np.random.default_rng(seed)
    P = slots_per_day(slot_s)
    T = int(days * P)
    first = 1_700_000_000 // slot_s + 7  # not at midnight: time of day != series index % P
    V = 5
    origin = np.array([T - 20, T - 20, T - 20, T - 17, T - 31])  # each VM's newest delivered slot
    start = np.array([0, 5, T - 20 - S - P // 2, 0, 11])  # each VM's first possible sample; vm2: half a day has left
    vcpus = np.array([2, 4, 8, 1, 16], np.float32)
    rows = []
    for v in range(V):
        n_per = rng.choice([0, 1, 2, 3], size=T, p=[0.1, 0.3, 0.3, 0.3])  # 10 % of the slots missing
        n_per[: start[v]] = 0
        if v == 3:  # a silence longer than the window once the ring is full: a jump clears it all
            n_per[S + P // 2 : 2 * S + P // 2 + 5] = 0
        n_per[origin[v]] = max(1, n_per[origin[v]])  # the newest slot is observed (it is the window's end)
        for t in np.flatnonzero(n_per):
            for _ in range(n_per[t]):
                rows.append((v, t, (first + t + rng.uniform(0, 1)) * slot_s))
    vm_i = np.array([r[0] for r in rows])
    idx = np.array([r[1] for r in rows])
    ts = np.array([r[2] for r in rows])
    vals = rng.uniform(1, 100, (len(rows), len(METRICS))).astype(np.float32)
    vals[rng.random(vals.shape) < 0.15] = np.nan  # whole channels missing now and then
    vals[:, M["vcpus"]] = vcpus[vm_i]
    vals[:, M["mem_total_mb"]] = vcpus[vm_i] * 4096
    # the slot means of all samples (training's series), NaN where none
    ch = derive_channels(vals)
    df = pd.DataFrame(ch, columns=list(WINDOW_CHANNELS)).assign(v=vm_i, t=idx)
    means = df.groupby(["v", "t"]).mean()
    series = np.full((V, T, len(WINDOW_CHANNELS)), np.nan, np.float32)
    vv, tt = (means.index.get_level_values(i).to_numpy() for i in (0, 1))
    series[vv, tt] = means.to_numpy(np.float32)
    # the stream: only what each VM had up to its origin, in batches of a few slots
    live = idx <= origin[vm_i]
    batch = idx // batch_slots
    late = rng.random(len(rows)) < 0.05
    batch = np.where(late & live, batch + 1, batch)  # a few samples a batch late (still inside the window)
    store = WindowStore(S, slot_s, ttl_s=1e12, capacity=2)  # grows while streaming
    names = [f"vm{v}" for v in range(V)]
    for b in np.unique(batch[live]):
        pick = np.flatnonzero(live & (batch == b))
        pick = pick[rng.permutation(len(pick))]
        store.update([names[v] for v in vm_i[pick]], [f"h{vm_i[i] % 2}" for i in pick], ts[pick], vals[pick], seen=0.0)
    assert store.dropped_old == 0
    return store, names, series, first, origin, vcpus


CASES = [
    (3600, 24),  # a one-day window
    (3600, 48),  # two days: one clearing holds the same time of day twice (S > P)
    (3600, 60),  # 2.5 days: and three rounds when the silence ends
    (3600, 10),  # shorter than a day
    (300, 288),  # the defaults: 24 h of 5-min slots
]


@pytest.mark.parametrize("slot_s, S", CASES)
def test_store_profiles_equal_the_training_reconstruction(slot_s, S):
    store, names, series, first, origin, _ = stream(slot_s, S, days=8 if slot_s == 3600 else 3)
    rows = store.rows_of(names)
    P = slots_per_day(slot_s)
    got = store.profiles(rows)
    assert got.shape == (len(names), P, len(TARGETS)) and got.dtype == np.float32
    for v in range(len(names)):
        assert store.last_slot[rows[v]] == first + origin[v]
        want = profiles_at(series[v : v + 1], first, [origin[v]], S, slot_s)[0]
        np.testing.assert_array_equal(np.isnan(got[v]), np.isnan(want), err_msg=f"NaN positions of vm{v}")
        np.testing.assert_allclose(got[v], want, rtol=1e-5, equal_nan=True, err_msg=f"profile of vm{v}")
        np.testing.assert_allclose(store.window(rows[v : v + 1])[0], windows_at(series[v : v + 1], [origin[v]], S)[0],
                                   rtol=1e-5, equal_nan=True)  # fmt: skip
    assert np.isfinite(got).any()  # something was folded, and something is still unknown for the young VM
    assert np.isnan(got[2]).any()


@pytest.mark.parametrize("slot_s, S, days", [*((s, n, 8) for s, n in CASES), (300, 288, 8.5)])
def test_store_weekly_profiles_equal_the_training_reconstruction(slot_s, S, days):
    """Over a week: each hour of the week is folded a second time (slots of an hour, or an hour each)."""
    store, names, series, first, origin, _ = stream(slot_s, S, days=days, seed=7)
    rows = store.rows_of(names)
    got = store.weeklies(rows)
    assert got.shape == (len(names), week_buckets(slot_s), len(TARGETS)) and got.dtype == np.float32
    for v in range(len(names)):
        want = weeklies_at(series[v : v + 1], first, [origin[v]], S, slot_s)[0]
        np.testing.assert_array_equal(np.isnan(got[v]), np.isnan(want), err_msg=f"NaN positions of vm{v}")
        np.testing.assert_allclose(got[v], want, rtol=1e-5, equal_nan=True, err_msg=f"weekly profile of vm{v}")
    assert np.isfinite(got).any() and np.isnan(got[2]).any()


@pytest.mark.parametrize("slot_s, S", [(3600, 24), (3600, 48), (300, 288)])
def test_serving_features_equal_training_features(slot_s, S):
    store, names, series, first, origin, vcpus = stream(slot_s, S, days=8 if slot_s == 3600 else 3, seed=1)
    rows = store.rows_of(names)
    win, attrs = store.windows(rows)
    X_serve = build_features(win, attrs, attrs["last_slot"], HORIZONS, slot_s, profile=attrs["profile"], week=attrs["week"])
    X_serve = X_serve.reshape(len(names), len(HORIZONS), -1)
    T = series.shape[1]
    cols = [WINDOW_CHANNELS.index(t) for t in TARGETS]
    for v in range(len(names)):
        a = {"vcpus": vcpus[v : v + 1], "mem_total_mb": vcpus[v : v + 1] * 4096}
        X_train, _ = training_examples(series[v], a, first, [origin[v]], HORIZONS, S, slot_s)
        keep = ~np.isnan(series[v, np.minimum(origin[v] + HORIZONS, T - 1)][:, cols]).all(axis=1)
        assert X_train.shape[0] == keep.sum() > 0
        np.testing.assert_allclose(X_serve[v][keep], X_train, rtol=2e-4, atol=2e-4, equal_nan=True, err_msg=f"vm{v}")
    assert np.isfinite(X_serve).any()


def test_scorer_forecasts_with_the_store_profile(monkeypatch):
    """The worker's forecast path hands the store's profiles to the feature code."""
    import streams.scorer as scorer_mod

    store, names, *_ = stream(3600, 24, days=3, seed=2)
    rows = store.rows_of(names)
    seen = {}

    def spy(win, attrs, last_slot, horizons, slot_s, xp=None, profile=None, week=None):
        seen["profile"], seen["week"] = profile, week
        return np.zeros((win.shape[0] * len(horizons), 1), np.float32)

    class Model:
        version, horizons = "m", np.array([1, 2])

        def predict(self, X, device="cpu"):
            return np.zeros((X.shape[0], len(TARGETS) * 2), np.float32)

    monkeypatch.setattr(scorer_mod, "build_features", spy)
    from app.settings import Settings

    sc = scorer_mod.Scorer(Settings().replace(slot_s=3600, window_span_s=24 * 3600), Model)
    sc._forecast(store, rows, store.attrs(rows), Model())
    np.testing.assert_array_equal(seen["profile"], store.profiles(rows))
    np.testing.assert_array_equal(seen["week"], store.weeklies(rows))


def test_one_clearing_longer_than_a_day_folds_each_time_of_day_in_slot_order():
    """A jump over a 2-day window: the older day of each time of day first, then the newer one."""
    slot_s, S = 3600, 48
    store = WindowStore(S, slot_s, 1e12)
    first = 1000 * 24 + 5
    t = np.arange(S)
    vals = np.full((S, len(METRICS)), np.nan, np.float32)
    vals[:, M["cpu_pct"]] = t  # slot i holds cpu i
    store.update(["a"] * S, ["h"] * S, (first + t + 0.5) * slot_s, vals)
    store.update(["a"], ["h"], np.array([(first + 10 * S + 0.5) * slot_s]), vals[:1])  # everything leaves
    prof = store.profiles(store.rows_of(["a"]))[0, :, TARGETS.index("cpu_pct")]
    j = (first + t) % 24
    older, newer = t[t < 24], t[t >= 24]
    want = np.empty(24, np.float32)
    want[j[older]] = older
    want[j[newer]] = want[j[newer]] + np.float32(PROFILE_ALPHA) * (newer - want[j[newer]])
    np.testing.assert_allclose(prof, want, rtol=1e-6)


def test_released_and_new_rows_start_with_an_empty_profile():
    store, names, *_ = stream(3600, 24, days=3, seed=3)
    r = store.rows_of(["vm0"])
    assert np.isfinite(store.profiles(r)).any()
    store.release(r)
    assert np.isnan(store.profile[r]).all()
    store.update(["fresh"], ["h"], np.array([store.last_slot.max() * 3600.0]), np.ones((1, len(METRICS)), np.float32))
    assert store.rows_of(["fresh"]).tolist() == r.tolist() and np.isnan(store.profiles(r)).all()


def test_snapshot_round_trips_the_profiles(tmp_path):
    store, names, *_ = stream(300, 288, days=3, seed=4)
    arrays = store.snapshot()
    assert arrays["profile"].shape == (len(names), 288, len(TARGETS)) and arrays["profile"].dtype == np.float32
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # plain npz, no pickle
    buf.seek(0)
    with np.load(buf, allow_pickle=False) as z:
        back = WindowStore.restore({k: z[k] for k in z.files})
    assert store_differences(store, back) == []
    snaps = SnapshotStore(str(tmp_path), "g", "t")  # the worker's file format (byte planes when large)
    snaps.save(0, arrays, 5)
    back = WindowStore.restore(snaps.load(0).arrays)
    assert store_differences(store, back) == []
    np.testing.assert_array_equal(back.profiles(back.rows_of(names)), store.profiles(store.rows_of(names)))
    back.profile[back.rows_of(["vm1"])[0], 3, 0] += 1
    assert store_differences(store, back) == ["profile"]


def test_a_snapshot_with_a_misshapen_profile_is_refused():
    store, *_ = stream(3600, 24, days=2, seed=5)
    arrays = store.snapshot()
    arrays["profile"] = arrays["profile"][:, :12]
    with pytest.raises(ValueError, match="profile"):
        WindowStore.restore(arrays)


def test_bytes_per_vm_include_the_profile():
    store = WindowStore(288, 300, 3600)
    assert store.nbytes_per_vm >= 288 * len(WINDOW_CHANNELS) * 8 + 288 * len(TARGETS) * 4
    assert store.profile.shape == (store.capacity, 288, len(TARGETS)) and np.isnan(store.profile).all()
