"""The lab's and the agent's parts that need no QEMU: image format, workload protocol, load programs,
state, clock, the agent's messages, the executor's timing and the calibration's scoring."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from agent.agent import Target, host_messages
from agent.qemu import GuestReading
from app.settings import Settings
from gpu_kernels.downtime import PrecopyParams
from lab.calibrate import GridPoint, Run, summary
from lab.executor import prediction_of, start_time
from lab.image import GuestImage, newc_archive
from lab.load import program, targets
from lab.migrate import MigrationOutcome, MigrationPolicy
from lab.net import Host
from lab.qemu import GuestProcess, GuestSpec
from lab.report import fit_constants, render, score
from lab.state import GuestState, LabClock, LabState
from lab.workload import WorkloadStat, _applied, command


def read_newc(data: bytes) -> dict[str, tuple[int, bytes]]:
    """A minimal reader of the kernel's newc cpio format: name -> (mode, content)."""
    out, pos = {}, 0
    while True:
        assert data[pos : pos + 6] == b"070701"
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name = data[pos + 110 : pos + 110 + namesize - 1].decode()
        pos += 110 + namesize
        pos += -pos % 4
        body = data[pos : pos + size]
        pos += size
        pos += -pos % 4
        if name == "TRAILER!!!":
            return out
        out[name] = (mode, body)


def test_the_initramfs_holds_the_files_with_their_directories_executable():
    files = {"init": b"#!/bin/sh\n", "bin/busybox": b"\x7fELF" + b"x" * 13, "workload": b"abc"}
    got = read_newc(newc_archive(files))
    assert got["bin"][0] == 0o040755
    for name, content in files.items():
        assert got[name] == (0o100755, content)


def test_workload_commands_and_replies():
    assert command(rate=20.0, wss=64, cpu=None) == "set rate=20 wss=64"
    assert command() == "stat"
    stat = WorkloadStat.parse("stat t=1.500 pages=1234 rate=19.900 mem=128 wss=64 target=20.000 cpu=5.0 pattern=seq\n")
    assert (stat.pages, stat.target, stat.wss, stat.pattern) == (1234, 20.0, 64, "seq")
    assert _applied(stat, {"rate": 20.0, "wss": 64}) and not _applied(stat, {"rate": 4.0})
    assert not _applied(stat, {"pattern": "rand"})


def test_load_programs_follow_the_lab_clock():
    square = program({"kind": "square", "busy_rate": 40, "quiet_rate": 1, "busy_from_s": 8 * 3600,
                      "busy_to_s": 20 * 3600}, origin=0.0)  # fmt: skip
    day = 86400 * 20000
    assert square(day + 7.99 * 3600)[0] == 1 and square(day + 8 * 3600)[0] == 40 and square(day + 20 * 3600)[0] == 1
    assert program({"kind": "constant", "rate": 3, "cpu": 7}, 0.0)(123.0) == (3.0, 7.0)
    with pytest.raises(ValueError, match="unknown load program"):
        program({"kind": "sawtooth"}, 0.0)


def _state(clock: LabClock | None = None) -> LabState:
    hosts = {"h1": Host("h1", "zl-t-h1", "10.233.9.1", 256.0), "h2": Host("h2", "zl-t-h2", "10.233.9.2", 256.0)}
    guest = GuestState(GuestSpec("vm1", mem_mb=64), GuestProcess("vm1", "h1", 4242, "/tmp/lab/guests/vm1"),
                       {"kind": "constant", "rate": 5})  # fmt: skip
    return LabState("t", 9, "tcg", GuestImage("/k", "/i"), hosts, {"vm1": guest}, clock or LabClock())  # type: ignore[arg-type]


def test_lab_state_round_trips_through_json():
    state = _state(LabClock(300.0, 1_700_000_000.0, 1_790_000_000.0))
    back = LabState.from_json(state.to_json())
    assert back.hosts == state.hosts and back.guests["vm1"].spec == state.guests["vm1"].spec
    assert back.guests["vm1"].process == state.guests["vm1"].process and back.clock == state.clock
    assert targets(back, 0.0) == {"vm1": (5.0, 0.0)}
    assert Host("h", "n", "a", 256.0).link_mib_s == pytest.approx(30.5176, rel=1e-4)


def test_a_compressed_lab_clock_maps_lab_time_to_wall_time_both_ways(monkeypatch):
    clock = LabClock(300.0, origin=1_000_000.0, wall0=5_000_000.0)
    monkeypatch.setattr("time.time", lambda: 5_000_010.0)
    assert clock.now() == 1_000_000.0 + 3000.0
    assert clock.wall_of(1_003_000.0) == 5_000_010.0
    assert LabClock().wall_of(42.0) == 42.0


def test_the_agent_sends_one_array_per_host_keyed_by_the_host():
    readings = [
        (Target("a", "h1", None, 1), GuestReading("a", 10.0, 150.0, 1, 512.0, 140.04, 12.3456, None)),  # type: ignore[arg-type]
        (Target("b", "h2", None, 2), GuestReading("b", 10.2, 5.0, 2, 1024.0, 300.0, 0.0, 64.0)),  # type: ignore[arg-type]
        (Target("c", "h1", None, 3), GuestReading("c", 10.4, 1.0, 1, 512.0, 90.0, 1.0, None)),  # type: ignore[arg-type]
    ]
    lab_clock = lambda wall: 1_700_000_000.0 + 300.0 * wall  # noqa: E731 - the lab's 300x clock
    messages = dict(host_messages(readings, stamp=lab_clock))
    assert sorted(messages) == [b"h1", b"h2"]
    h1 = json.loads(messages[b"h1"])
    # one time for the cycle: the middle of the measurement windows (wall 10.2) on the lab clock
    assert [s["vm"] for s in h1] == ["a", "c"] and all(s["ts"] == 1_700_003_060.0 and s["host"] == "h1" for s in h1)
    assert h1[0]["cpu_pct"] == 100.0 and "wss_mb" not in h1[0] and h1[0]["dirty_mbps"] == 12.346
    assert json.loads(messages[b"h2"])[0]["wss_mb"] == 64.0


def test_a_start_past_the_scores_first_slot_is_recorded_against_the_curve_at_that_slot():
    """A worker behind its agent: the score's "now" (busy) is two slots before the quiet window the VM starts in."""
    from streams.curve import Curve

    score_hash = {"now_downtime_ms": 4800.0, "now_total_s": 19.5, "downtime_factor": 1.0, "updated": 5.0, "model": "m1"}
    t0 = 1e9
    curve = Curve(t0=t0, slot_s=300, mem_mb=512.0, wss_mb=math.nan, factor=1.0, horizons=np.arange(1, 4),
                  downtime_ms=np.array([4800.0, 4700.0, 310.0, math.inf], np.float32),
                  forecast=np.zeros((3, 3, 2), np.float32))  # fmt: skip
    assert prediction_of(score_hash, curve, start=t0 + 299.0)["predicted_total_ms"] == 19500.0  # type: ignore[index]
    late = prediction_of(score_hash, curve, start=t0 + 600.0 + 48.0)
    assert late == {"predicted_downtime_ms": 310.0, "predicted_total_ms": None, "predicted_factor": 1.0,
                    "predicted_at": 5.0, "model": "m1"}  # fmt: skip
    assert prediction_of(score_hash, curve, start=t0 + 900.0)["predicted_downtime_ms"] is None  # type: ignore[index]
    assert prediction_of(score_hash, curve, start=t0 + 1200.0) is None, "past the forecast: no prediction"
    assert prediction_of(score_hash, None, start=t0 + 900.0)["predicted_downtime_ms"] == 4800.0  # type: ignore[index]


def test_the_executor_never_starts_before_the_window_on_a_fast_clock(tmp_path):
    import asyncio
    import time

    from lab.executor import _sleep_until

    state = _state(LabClock(300.0, origin=1e9, wall0=time.time()))
    when = 1e9 + 60.0  # 0.2 s of wall time at 300x
    after = asyncio.run(_sleep_until(tmp_path / "no-lab-here", when, state))
    assert after.clock.now() >= when


def test_the_executor_takes_the_prediction_in_force_and_waits_for_the_window():
    score_hash = {"now_downtime_ms": 4800.0, "now_total_s": 19.5, "downtime_factor": 1.2, "updated": 1.0, "model": "m1",
                  "best_start": 1e9 + 600}  # fmt: skip
    assert prediction_of(score_hash) == {"predicted_downtime_ms": 4800.0, "predicted_total_ms": 19500.0,
                                         "predicted_factor": 1.2, "predicted_at": 1.0, "model": "m1"}  # fmt: skip
    assert prediction_of({"now_total_s": math.inf})["predicted_total_ms"] is None  # type: ignore[index]
    assert prediction_of(None) is None
    import time

    state = _state(LabClock(2.0, origin=1e9, wall0=time.time()))  # lab time ~1e9 now: the window is 10 min ahead
    assert start_time(state, "now", None) == pytest.approx(1e9, abs=5.0)
    assert start_time(state, "recommended", score_hash) == 1e9 + 600
    with pytest.raises(ValueError, match="no recommended window"):
        start_time(state, "recommended", {})
    with pytest.raises(ValueError, match="ISO time"):
        start_time(state, "tomorrow", None)
    assert start_time(state, "2100-01-01T00:00:00Z", None) == pytest.approx(4102444800.0)


def test_a_policy_must_abort_or_force():
    with pytest.raises(ValueError, match="abort or force"):
        MigrationPolicy(on_timeout="retry")
    assert MigrationPolicy(ramp=((5.0, 500.0),)).name == "ramp+abort"


def test_the_migration_record_carries_the_outcome_and_the_prediction():
    o = MigrationOutcome("vm1", "h1", "h2", 10.0, 20.0, "completed", True, "abort", 300.0, 280.5, 240, 10_000.0, 1.0,
                         123, 456, 7, 12.5, 256.0)  # fmt: skip
    msg = o.message({"predicted_downtime_ms": 300.0, "model": "m", "predicted_at": None})
    assert msg["converged"] is True and msg["rounds"] == 7 and msg["bytes"] == 123 and msg["link_mbps"] == 32.0
    assert msg["predicted_downtime_ms"] == 300.0 and "predicted_at" not in msg
    assert "trace" not in o.as_dict()


def _run(rate: float, converged: bool, total_ms: float, pause_ms: float | None, down_bytes: int | None = None) -> Run:
    return Run(GridPoint(64, 32, rate, 256.0), {"dirty_mbps": rate, "wss_mb": 30.0, "mem_used_mb": 142.0,
               "mem_total_mb": 512.0, "cpu_pct": 1.0, "guest_rate_mbps": rate},
               {"converged": converged, "total_ms": total_ms, "downtime_ms": pause_ms, "downtime_bytes": down_bytes,
                "dirty_rate_seen_mbps": rate or None, "status": "completed" if converged else "cancelled"})  # fmt: skip


def test_constants_come_from_the_idle_runs_and_the_models_are_scored_on_the_others():
    runs = [_run(0.0, True, 4983, 316.9, 7_606_722), _run(10.0, True, 6542, 301.1), _run(25.5, True, 10772, 333.9),
            _run(32.5, False, 45165, None)]  # fmt: skip
    fitted = fit_constants(runs, PrecopyParams())
    assert fitted["idle_runs"] == 1 and 0.9 < fitted["efficiency"] <= 1.0 and 40 < fitted["gap_ms"] < 80
    result = score(runs, Settings.from_env({}), timeout_s=45.0)
    assert set(result["held_out"]) == {"classic", "qemu", "qemu_calibrated"}
    cal = result["held_out"]["qemu_calibrated"]
    assert cal["runs"] == 3 and cal["convergence_accuracy"] == 1.0 and cal["mape_total_time"] < 0.15
    doc = {"runs": 4, "grid": "test", "seconds": 1.0, "machine": "x", "timeout_s": 45.0, "held_out_runs": 3, **result}
    text = render(json.loads(json.dumps(doc, default=lambda v: None)))
    assert "qemu_calibrated" in text and "| model |" in text


def test_summary_counts_convergence_and_errors_only_where_they_apply():
    runs = [_run(10.0, True, 1000.0, 300.0), _run(40.0, False, 45000.0, None)]
    runs[0].predictions["m"] = {"converged": True, "total_s": 1.1, "downtime_ms": 330.0}
    runs[1].predictions["m"] = {"converged": True, "total_s": 30.0, "downtime_ms": 300.0}
    s = summary(runs, "m")
    assert s["convergence_accuracy"] == 0.5 and s["mape_total_time"] == pytest.approx(0.1)
    assert s["downtime_mae_ms"] == pytest.approx(30.0) and s["downtime_within_20pct_or_10ms"] == 1.0
    assert np.isfinite(s["downtime_mape"])
