"""The QEMU pre-copy model: its stop rule, saturation, policy, and the real migrations it was checked against."""

from __future__ import annotations

import numpy as np
import pytest

from gpu_kernels.downtime import PrecopyParams, p_ok, precopy_with
from gpu_kernels.qemu_precopy import QemuLink, max_converging_dirty, qemu_precopy

LINK = QemuLink(limit_ms=300.0, efficiency=0.96, gap_ms=50.0, resume_ms=20.0, timeout_s=60.0)
B = 30.52  # MiB/s: a 256 Mbit/s link


def run(mem, dirty, wss=np.nan, link=LINK, bw=B):  # noqa: ANN001
    return qemu_precopy(np.float64(mem), np.float64(dirty), np.float64(bw), np.float64(wss), link, np)


def test_an_idle_guest_stops_after_one_pass_with_the_rest_just_under_the_limit():
    pc = run(256.0, 0.0)
    b = B * LINK.efficiency
    assert bool(pc.converged) and float(pc.passes) == 0
    assert float(pc.downtime_ms) == pytest.approx(LINK.limit_ms - LINK.gap_ms + LINK.resume_ms)
    assert float(pc.duration_s) == pytest.approx(256.0 / b + float(pc.downtime_ms) / 1000)


def test_a_converging_pause_never_exceeds_the_limit_plus_the_resume_cost():
    rng = np.random.default_rng(3)
    mem, wss = rng.uniform(64, 4096, 5000), rng.uniform(8, 4096, 5000)
    dirty = rng.uniform(0, 2 * B, 5000)
    pc = qemu_precopy(mem, dirty, np.full(5000, B), wss, LINK, np)
    conv = pc.converged
    assert conv.any() and (~conv).any()
    assert (pc.downtime_ms[conv] <= LINK.limit_ms + LINK.resume_ms + 1e-6).all()
    assert np.isinf(pc.downtime_ms[~conv]).all(), "abort policy: a migration that does not converge never pauses"
    assert (pc.duration_s[~conv] == LINK.timeout_s).all()


@pytest.mark.parametrize("limit_ms", [10.0, 30.0, 50.0, 80.0])
def test_a_limit_below_the_stop_gap_still_bounds_the_pause(limit_ms: float) -> None:
    link = QemuLink(limit_ms=limit_ms, efficiency=0.96, gap_ms=65.0, resume_ms=20.0, timeout_s=60.0)
    rng = np.random.default_rng(5)
    dirty = rng.uniform(0, 0.9 * B, 2000)
    pc = qemu_precopy(np.full(2000, 256.0), dirty, np.full(2000, B), np.full(2000, 128.0), link, np)
    conv = pc.converged
    assert conv.mean() > 0.5
    assert (pc.downtime_ms[conv] <= limit_ms + link.resume_ms + 1e-3).all(), "pending bytes at the stop never exceed the threshold"


def test_dirtying_at_the_link_rate_never_converges_unless_the_working_set_fits_the_gap():
    assert not bool(run(256.0, 1.2 * B, wss=64.0).converged)
    tiny = run(256.0, 1.2 * B, wss=B * LINK.efficiency * 0.3)  # the working set is inside the bytes left for the pause
    assert bool(tiny.converged)


def test_a_smaller_working_set_shortens_the_tail():
    durations = [float(run(512.0, 0.8 * B, wss=w).duration_s) for w in (400.0, 200.0, 100.0, 50.0)]
    assert durations == sorted(durations, reverse=True)


def test_force_policy_pauses_for_the_whole_pending_set_instead_of_aborting():
    forced = run(256.0, 1.5 * B, wss=96.0, link=QemuLink(timeout_s=20.0, on_timeout="force"))
    b = B * 0.96
    rest = b * (0.300 - 0.050)
    assert not bool(forced.converged)
    assert float(forced.downtime_ms) == pytest.approx(((rest + (96.0 - rest)) / b + 0.020) * 1000)
    assert float(forced.duration_s) == pytest.approx(20.0 + float(forced.downtime_ms) / 1000)


def test_duration_grows_with_the_dirty_rate_and_convergence_switches_at_the_closed_form_rate():
    mem, wss = 384.0, 256.0
    d_star = float(max_converging_dirty(np.float64(mem), np.float64(B), np.float64(wss), LINK, np))
    assert 0 < d_star < B
    rates = np.linspace(0, B, 200)
    pc = qemu_precopy(np.full(200, mem), rates, np.full(200, B), np.full(200, wss), LINK, np)
    ok = pc.duration_s[pc.converged]
    assert (np.diff(ok) >= -1e-9).all()
    switch = rates[~pc.converged].min()
    assert switch == pytest.approx(d_star, rel=0.05)


def test_one_code_path_broadcasts_vms_against_slots_in_float32():
    mem = np.array([[256.0], [1024.0]], np.float32)
    dirty = np.array([[0.0, 10.0, 40.0], [5.0, 5.0, 5.0]], np.float32)
    pc = qemu_precopy(mem, dirty, np.float32(B), None, LINK, np)
    assert pc.downtime_ms.shape == (2, 3) and pc.downtime_ms.dtype == np.float32
    assert pc.converged.tolist() == [[True, True, False], [True, True, True]]


def test_precopy_with_and_p_ok_dispatch_on_the_model_name():
    qemu, classic = PrecopyParams(link_mbps=B, timeout_s=60.0), PrecopyParams(link_mbps=B, model="classic")
    mem, dirty = np.float32(256.0), np.float32(0.0)
    assert float(precopy_with(qemu, mem, dirty, np.float32(B)).downtime_ms) == pytest.approx(270.0)
    assert float(precopy_with(classic, mem, dirty, np.float32(B)).downtime_ms) == pytest.approx(20.0)
    # far below the converging rate: sure; far above: hopeless
    assert float(p_ok(1.0, 2.0, 256.0, B, params=qemu, wss_mb=64.0)) == pytest.approx(1.0, abs=1e-3)
    assert float(p_ok(3 * B, 4 * B, 256.0, B, params=qemu, wss_mb=256.0)) == pytest.approx(0.0, abs=1e-3)


# Real QEMU 7.2 migrations from the lab (zhuge lab calibrate, 2026-12-01, 2-core box, TCG, 256 Mbit/s links,
# downtime-limit 300 ms, abort after 45 s): the agent's inputs and QEMU's outcome. The model with the lab's
# fitted constants must stay close to them.
LAB_LINK = QemuLink(limit_ms=300.0, efficiency=0.967, gap_ms=62.0, resume_ms=56.0, timeout_s=45.0)
MEASURED = [
    # mem_used_mb, wss_mb (None: not saturated), dirty MiB/s, link Mbit/s, converged, total s, pause ms
    (142, 30.0, 10.0, 256, True, 6.54, 301),
    (142, 30.0, 25.5, 256, True, 10.77, 334),
    (142, 30.0, 32.5, 256, False, 45.16, None),
    (268, None, 8.0, 256, True, 12.20, 323),
    (268, 66.0, 26.5, 256, True, 24.99, 347),
    (396, 120.0, 28.0, 384, True, 16.39, 343),
    (223, None, 4.5, 128, True, 23.03, 365),
    (268, None, 25.0, 256, False, 45.19, None),
]


@pytest.mark.parametrize(("mem", "wss", "dirty", "mbit", "converged", "total_s", "pause_ms"), MEASURED)
def test_the_model_reproduces_real_qemu_migrations(mem, wss, dirty, mbit, converged, total_s, pause_ms):  # noqa: ANN001
    pc = run(mem, dirty, wss=np.nan if wss is None else wss, link=LAB_LINK, bw=mbit * 1e6 / 8 / 2**20)
    assert bool(pc.converged) == converged
    if converged:
        assert float(pc.duration_s) == pytest.approx(total_s, rel=0.2)
        assert float(pc.downtime_ms) == pytest.approx(pause_ms, rel=0.2)
