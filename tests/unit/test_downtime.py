"""Pre-copy closed form vs a round-by-round reference; dirty proxy; p_ok."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gpu_kernels.downtime import (
    DIRTY_MBPS_PER_BUSY_VCPU,
    PrecopyParams,
    dirty_rate_proxy,
    max_converging_dirty,
    p_ok,
    precopy,
    precopy_with,
)


def reference(mem, dirty, bw, target_ms, max_rounds, resume_ms):
    """Round-by-round pre-copy simulation (the straightforward loop the kernel must match)."""
    target_s = target_ms / 1000
    lam = dirty / bw
    to_send, elapsed, rounds = mem, 0.0, 0
    while True:
        elapsed += to_send / bw
        rounds += 1
        remainder = min(to_send * lam, mem)  # dirtied during this round, capped at all memory
        if remainder / bw <= target_s and lam < 1:
            converged = True
            break
        if rounds >= max_rounds:
            converged = False
            break
        to_send = remainder
    downtime_ms = remainder / bw * 1000 + resume_ms
    return downtime_ms, elapsed + downtime_ms / 1000, converged, rounds


@pytest.mark.parametrize("seed", range(3))
def test_matches_round_by_round_reference(seed):
    rng = np.random.default_rng(seed)
    n = 400
    mem = rng.uniform(256, 65536, n)
    bw = rng.uniform(100, 2500, n)
    lam = rng.uniform(0, 1.3, n)
    dirty = lam * bw
    target, rounds, resume = rng.uniform(50, 500), int(rng.integers(1, 40)), rng.uniform(0, 50)
    got = precopy(mem, dirty, bw, target, rounds, resume)
    ref = np.array([reference(m, d, b, target, rounds, resume) for m, d, b in zip(mem, dirty, bw)])
    np.testing.assert_allclose(got.downtime_ms, ref[:, 0], rtol=1e-9)
    np.testing.assert_allclose(got.duration_s, ref[:, 1], rtol=1e-9)
    np.testing.assert_array_equal(got.converged, ref[:, 2].astype(bool))
    np.testing.assert_array_equal(got.rounds, ref[:, 3])


def test_broadcasts_vms_by_slots_and_keeps_float32():
    mem = np.array([[4096.0], [16384.0]], dtype=np.float32)  # (k, 1)
    dirty = np.linspace(0, 1500, 6, dtype=np.float32).reshape(1, 6)  # (1, T)
    out = precopy(mem, dirty, np.float32(1250), 300, 30, 20)
    assert out.downtime_ms.shape == (2, 6) and out.downtime_ms.dtype == np.float32
    # idle guests converge, a dirty rate above the link never does
    assert out.converged[:, 0].all() and not out.converged[:, -1].any()


def test_non_converging_reports_forced_stop_with_remainder_capped_at_memory():
    out = precopy(8192.0, 2000.0, 1250.0, 300, 30, 20)
    assert not out.converged
    assert out.downtime_ms == pytest.approx(8192 / 1250 * 1000 + 20)


def test_nan_in_nan_out():
    out = precopy(np.array([np.nan, 1024]), np.array([10.0, np.nan]), 1250.0)
    assert np.isnan(out.downtime_ms).all() and not out.converged.any()


def test_params_from_settings():
    from app.settings import Settings

    s = Settings.from_env({}, link_mbps=500.0, downtime_target_ms=100.0, max_rounds=5, resume_ms=7.0,
                          downtime_model="classic", migration_timeout_s=90.0)
    p = PrecopyParams.from_settings(s)
    assert p == PrecopyParams(500.0, 100.0, 5, 7.0, "classic", timeout_s=90.0)
    a = precopy_with(p, 4096.0, 100.0, 500.0)
    b = precopy(4096.0, 100.0, 500.0, 100.0, 5, 7.0)
    assert a.downtime_ms == b.downtime_ms


def test_dirty_proxy_terms():
    # scales with busy vCPUs
    base = dirty_rate_proxy(np.array([50.0]), np.array([4.0]), np.array([1e6]), np.array([0.0]))
    assert base[0] == pytest.approx(0.5 * 4 * DIRTY_MBPS_PER_BUSY_VCPU)
    # capped by the writable working set of a small VM
    small = dirty_rate_proxy(np.array([100.0]), np.array([16.0]), np.array([400.0]), np.array([0.0]))
    assert small[0] == pytest.approx(100.0)
    # buffered disk writes add their rate; unknowns default sensibly
    disk = dirty_rate_proxy(np.array([0.0]), np.array([np.nan]), np.array([np.nan]), np.array([2048.0]))
    assert disk[0] == pytest.approx(2.0)
    assert np.isnan(dirty_rate_proxy(np.array([np.nan]), np.array([2.0]), np.array([1.0]), np.array([0.0]))[0])


def test_max_converging_dirty_is_the_convergence_boundary():
    mem, bw, target, rounds = 16384.0, 1250.0, 300.0, 30
    d_star = float(max_converging_dirty(mem, bw, target, rounds))
    assert precopy(mem, d_star * 0.999, bw, target, rounds).converged
    assert not precopy(mem, d_star * 1.001, bw, target, rounds).converged


def test_p_ok_is_the_lognormal_cdf_at_the_boundary():
    mem, bw = 16384.0, 1250.0
    d_star = float(max_converging_dirty(mem, bw, 300.0, 30))
    # median at the boundary -> one half
    assert float(p_ok(d_star, d_star * 2, mem, bw)) == pytest.approx(0.5, abs=1e-6)
    # q90 at the boundary -> 0.9
    assert float(p_ok(d_star / 2, d_star, mem, bw)) == pytest.approx(0.9, abs=1e-5)
    # monotone: more dirtying, less chance
    ps = p_ok(np.array([10.0, 300.0, 900.0]), np.array([20.0, 600.0, 1500.0]), mem, bw)
    assert ps[0] > ps[1] > ps[2]
    # no spread: a step; idle guest: ok
    assert float(p_ok(d_star * 1.1, d_star * 1.1, mem, bw)) == 0.0
    assert float(p_ok(0.0, 0.0, mem, bw)) == 1.0


def test_p_ok_erf_matches_math_erf():
    from gpu_kernels.downtime import _erf

    x = np.linspace(-4, 4, 81)
    np.testing.assert_allclose(_erf(x, np), [math.erf(v) for v in x], atol=2e-7)
