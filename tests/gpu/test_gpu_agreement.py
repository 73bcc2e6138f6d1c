"""The NumPy and CuPy twins of every kernel and of the window store give the same results.

Parametrised over the array module: the numpy case runs everywhere (it checks the
test itself), the cupy case needs CuPy and a CUDA device and skips cleanly otherwise.
Tolerances: the kernels run in float32 on both devices; CuPy's transcendental
functions and reduction order differ from NumPy's in the last bits, hence rtol 1e-5.
"""

from __future__ import annotations

import numpy as np
import pytest

from gpu_kernels.downtime import dirty_rate_proxy, p_ok, precopy
from gpu_kernels.window import best_window, recommended_window, window_min
from gpu_kernels.xp import gpu_available, to_numpy

pytestmark = pytest.mark.gpu


def _module(name):
    if name == "numpy":
        return np
    if not gpu_available():
        pytest.skip("CuPy with a CUDA device is not available")
    import cupy

    return cupy


@pytest.fixture(params=["numpy", "cupy"])
def xp(request):
    return _module(request.param)


def _rand(seed=0, k=500, t=96):
    rng = np.random.default_rng(seed)
    mem = rng.uniform(512, 65536, (k, 1)).astype(np.float32)
    bw = rng.uniform(125, 1250, (k, t)).astype(np.float32)
    dirty = (rng.uniform(0, 1.2, (k, t)) * bw).astype(np.float32)
    return mem, dirty, bw


def test_precopy_agrees(xp):
    mem, dirty, bw = _rand()
    ref = precopy(mem, dirty, bw, 300, 30, 20)
    got = precopy(xp.asarray(mem), xp.asarray(dirty), xp.asarray(bw), 300, 30, 20)
    np.testing.assert_allclose(to_numpy(got.downtime_ms), ref.downtime_ms, rtol=1e-5)
    np.testing.assert_allclose(to_numpy(got.duration_s), ref.duration_s, rtol=1e-5)
    # converged may only differ where lambda**n sits on the target within float32 rounding
    assert (to_numpy(got.converged) != ref.converged).mean() < 1e-3


def test_p_ok_and_proxy_agree(xp):
    mem, dirty, bw = _rand(1)
    ref = p_ok(dirty, dirty * 1.3, mem, bw)
    got = p_ok(xp.asarray(dirty), xp.asarray(dirty * 1.3), xp.asarray(mem), xp.asarray(bw))
    np.testing.assert_allclose(to_numpy(got), ref, atol=1e-5)
    cpu = np.linspace(0, 100, 50, dtype=np.float32)
    ref_p = dirty_rate_proxy(cpu, np.full(50, 4.0), np.full(50, 2048.0), np.full(50, 100.0))
    got_p = dirty_rate_proxy(*(xp.asarray(a, dtype=xp.float32) for a in (cpu, np.full(50, 4.0), np.full(50, 2048.0), np.full(50, 100.0))))
    np.testing.assert_allclose(to_numpy(got_p), ref_p, rtol=1e-6)


def test_best_window_agrees(xp):
    rng = np.random.default_rng(2)
    x = rng.uniform(10, 1000, (300, 288)).astype(np.float32).round()
    dur = rng.integers(1, 4, x.shape)
    s_ref, v_ref = best_window(x, dur, 1.0)
    s, v = best_window(xp.asarray(x), xp.asarray(dur), 1.0)
    np.testing.assert_array_equal(to_numpy(s), s_ref)
    np.testing.assert_allclose(to_numpy(v), v_ref)


def test_recommended_window_agrees(xp):
    rng = np.random.default_rng(5)
    x = rng.uniform(10, 400, (300, 288)).astype(np.float32).round()
    x[rng.random(x.shape) < 0.02] = np.nan
    dur = rng.integers(1, 4, x.shape)
    p = rng.uniform(0.7, 1.0, x.shape).astype(np.float32)
    p[rng.random(x.shape) < 0.02] = np.nan
    x[:30, :3], p[:30, :3] = 5.0, 0.99  # some VMs best off now
    target = rng.choice([150.0, 300.0], 300)  # per VM
    p_ref = window_min(p, dur)
    ref = recommended_window(x, dur, p_ref, target, 10.0, 0.1, 0.9)
    p_dev = window_min(xp.asarray(p), xp.asarray(dur))
    got = recommended_window(xp.asarray(x), xp.asarray(dur), p_dev, xp.asarray(target), 10.0, 0.1, 0.9)
    np.testing.assert_array_equal(to_numpy(p_dev), p_ref)
    np.testing.assert_array_equal(to_numpy(got[0]), ref[0])
    np.testing.assert_allclose(to_numpy(got[1]), ref[1])
    np.testing.assert_array_equal(to_numpy(got[2]), ref[2])
    assert len(set(ref[2].tolist())) == 3  # every rule occurs


def test_window_store_agrees(xp):
    from streams.schema import METRICS
    from streams.window_store import WindowStore

    rng = np.random.default_rng(3)
    n = 5000
    vm = [f"vm{i}" for i in rng.integers(0, 300, n)]
    host = [f"h{int(v[2:]) % 17}" for v in vm]
    ts = 1_700_000_000 + rng.uniform(0, 30 * 300, n)
    vals = rng.uniform(0, 100, (n, len(METRICS))).astype(np.float32)
    vals[rng.random(vals.shape) < 0.1] = np.nan
    ref, dev = WindowStore(24, 300, 3600), WindowStore(24, 300, 3600, xp=xp, capacity=64)
    for part in np.array_split(np.arange(n), 4):
        args = ([vm[i] for i in part], [host[i] for i in part], ts[part], vals[part])
        ref.update(*args)
        dev.update(*args)
    names = sorted(ref.row_of)
    w_ref, a_ref = ref.windows(ref.rows_of(names))
    w_dev, a_dev = dev.windows(dev.rows_of(names))
    np.testing.assert_allclose(to_numpy(w_dev), w_ref, rtol=1e-6, equal_nan=True)
    np.testing.assert_array_equal(a_dev["last_slot"], a_ref["last_slot"])
    snap = dev.snapshot()
    assert all(isinstance(a, np.ndarray) for a in snap.values())
    back = WindowStore.restore(snap, xp=xp)
    np.testing.assert_allclose(to_numpy(back.windows(back.rows_of(names))[0]), w_ref, rtol=1e-6, equal_nan=True)


def test_window_store_profiles_agree(xp):
    """The daily and weekly profiles folded on the device equal NumPy's, and survive a snapshot (S > slots per day)."""
    from streams.schema import METRICS
    from streams.window_store import WindowStore

    rng = np.random.default_rng(4)
    slot_s, S, V = 3600, 48, 200
    ref, dev = WindowStore(S, slot_s, 1e12, capacity=16), WindowStore(S, slot_s, 1e12, xp=xp, capacity=16)
    names = [f"vm{i}" for i in range(V)]
    for t in range(8 * 24):  # eight days of hourly slots, one batch per slot, 10 % missing, a long silence
        on = rng.random(V) > 0.1
        if 60 <= t < 115:
            on[:20] = False
        idx = np.flatnonzero(on)
        vals = rng.uniform(0, 100, (idx.size, len(METRICS))).astype(np.float32)
        vals[rng.random(vals.shape) < 0.1] = np.nan
        args = ([names[i] for i in idx], ["h"] * idx.size, (1_700_000_000 // slot_s + t + rng.uniform(0, 1, idx.size)) * slot_s, vals)
        ref.update(*args, seen=0.0)
        dev.update(*args, seen=0.0)
    p_ref = ref.profiles(ref.rows_of(names))
    p_dev = to_numpy(dev.profiles(dev.rows_of(names)))
    assert np.isfinite(p_ref).mean() > 0.5
    np.testing.assert_allclose(p_dev, p_ref, rtol=1e-5, equal_nan=True)
    w_ref, w_dev = ref.weeklies(ref.rows_of(names)), to_numpy(dev.weeklies(dev.rows_of(names)))
    assert np.isfinite(w_ref).mean() > 0.5
    np.testing.assert_allclose(w_dev, w_ref, rtol=1e-5, equal_nan=True)
    back = WindowStore.restore(dev.snapshot(), xp=xp)
    np.testing.assert_array_equal(to_numpy(back.profiles(back.rows_of(names))), p_dev)
    np.testing.assert_array_equal(to_numpy(back.weeklies(back.rows_of(names))), w_dev)


def test_scorer_agrees_with_a_real_xgboost_model(xp):
    xgb = pytest.importorskip("xgboost")
    from app.settings import Settings
    from gpu_kernels.features import FEATURE_NAMES, TARGETS
    from streams.schema import METRICS
    from streams.scorer import Scorer
    from streams.window_store import WindowStore

    rng = np.random.default_rng(4)
    X = rng.uniform(0, 100, (2000, len(FEATURE_NAMES))).astype(np.float32)
    params = {"objective": "reg:quantileerror", "quantile_alpha": np.array([0.5, 0.9]), "max_depth": 4, "nthread": 2}
    boosters = [xgb.train(params, xgb.DMatrix(X, X[:, j] * 5 + rng.normal(0, 5, 2000)), 20) for j in range(len(TARGETS))]

    class Model:
        version = "gpu-agreement"
        horizons = np.array([1, 3, 12, 24])

        def predict(self, X, device="cpu"):
            from gpu_kernels.inference import predict

            mod = np if device == "cpu" else xp
            cols = [mod.asarray(predict(b, X, device), dtype=mod.float32).reshape(-1, 1, 2) for b in boosters]
            return mod.concatenate(cols, axis=1)

    s = Settings.from_env({}, window_span_s=24 * 300, horizon_s=24 * 300)
    n = 3000
    vm = [f"vm{i}" for i in rng.integers(0, 200, n)]
    ts = 1_700_000_000 + rng.uniform(0, 24 * 300, n)
    vals = rng.uniform(0, 100, (n, len(METRICS))).astype(np.float32)
    out = []
    for mod in (np, xp):
        store = WindowStore(s.window_slots, s.slot_s, s.vm_ttl_s, xp=mod)
        rows = store.update(vm, ["h"] * n, ts, vals)
        out.append(Scorer(s, Model, xp=mod).score(store, rows, 1_700_010_000))
    a, b = out
    assert a.vm == b.vm
    # single-precision tree inference may flip a row sitting on a split threshold
    assert (a.best_start != b.best_start).mean() < 0.01
    same = a.best_start == b.best_start
    np.testing.assert_allclose(b.best_downtime_ms[same], a.best_downtime_ms[same], rtol=1e-3)
    assert (a.min_start != b.min_start).mean() < 0.01
    assert (a.window_rule != b.window_rule).mean() < 0.01
    np.testing.assert_allclose(b.now_total_s, a.now_total_s, rtol=1e-3)
