"""The lab's drain executor without QEMU: when each migration starts, at what share, on which port, and the totals.

A fake migration function takes the place of ``lab.migrate.migrate`` (it sleeps
for the VM's duration on a fast real lab clock); ``lab.migrate._run`` is
checked against a fake QMP client for the ``max-bandwidth`` it sets.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import pytest

from lab import drain
from lab.migrate import LIFTED_BANDWIDTH, MigrationOutcome, MigrationPolicy
from lab.state import LabClock

SPEED = 600.0  # lab seconds per wall second: a 60 s plan slot passes in 0.1 s
T0 = 1_700_000_000.0
LINK = 30.0
POLICY = MigrationPolicy(downtime_limit_ms=300.0, timeout_s=15.0, on_timeout="force")
TOL = 0.08 * SPEED  # lab seconds of scheduling slack a busy test machine may add


def clock(offset_s: float = 0.0) -> LabClock:
    """A lab clock reading T0 + offset_s now."""
    return LabClock(SPEED, T0 + offset_s, time.time())


class FakeMigrations:
    """Stands in for ``lab.migrate.migrate``: records each call, sleeps the VM's wall duration, returns an outcome."""

    def __init__(self, clk: LabClock, wall_s: dict[str, float], *, pauses: dict[str, float] | None = None,
                 forced: tuple[str, ...] = (), fail: tuple[str, ...] = ()) -> None:  # fmt: skip
        self.clk, self.wall_s, self.pauses, self.forced, self.fail = clk, wall_s, pauses or {}, forced, fail
        self.calls: list[dict[str, Any]] = []
        self.running = 0
        self.max_running = 0
        self.shares_in_use = 0.0
        self.max_shares = 0.0

    async def __call__(self, state_dir: str, lab: str, vm: str, to_host: str | None, policy: MigrationPolicy, *,
                       port: int, max_bandwidth_mbps: float | None) -> MigrationOutcome:  # fmt: skip
        start = self.clk.now()
        self.calls.append({"vm": vm, "start": start, "port": port, "bw": max_bandwidth_mbps, "to": to_host})
        self.running += 1
        self.shares_in_use += max_bandwidth_mbps or 0.0
        self.max_running = max(self.max_running, self.running)
        self.max_shares = max(self.max_shares, self.shares_in_use)
        try:
            await asyncio.sleep(self.wall_s[vm])
            if vm in self.fail:
                raise RuntimeError(f"{vm}: QEMU did not start")
        finally:
            self.running -= 1
            self.shares_in_use -= max_bandwidth_mbps or 0.0
        end = self.clk.now()
        return MigrationOutcome(
            vm=vm, host_from="h1", host_to=to_host or "h2", start=start, end=end, status="completed",
            converged=vm not in self.forced, policy=policy.name, downtime_limit_ms=policy.downtime_limit_ms,
            downtime_ms=self.pauses.get(vm, 250.0), qemu_downtime_ms=None, total_ms=(end - start) / SPEED * 1000,
            setup_ms=None, transferred_bytes=1, downtime_bytes=None, dirty_syncs=3, dirty_rate_seen_mbps=None,
            link_mbit=LINK * 8 * 2**20 / 1e6,
        )  # fmt: skip

    def start_of(self, vm: str) -> float:
        return next(c["start"] for c in self.calls if c["vm"] == vm)


def plan(rows: list[tuple[str, float, float, float]], k: int = 2) -> dict[str, Any]:
    """A plan JSON (``api.plans``' keys) from (vm, start offset s, bw, predicted downtime ms) rows."""
    return {
        "host": "h1", "t0": T0, "deadline": T0 + 6 * 3600, "max_concurrent": k, "link_mbps": LINK,
        "vms": [{"vm": vm, "order": i, "start": T0 + off, "end": T0 + off + 10, "duration_s": 10.0, "downtime_ms": dt,
                 "bw_mbps": bw} for i, (vm, off, bw, dt) in enumerate(rows)],
        "unplaced": [], "total_downtime_ms": sum(r[3] for r in rows),
    }  # fmt: skip


def test_plan_migrations_start_when_the_lab_clock_reaches_their_start_at_their_share_on_their_own_port():
    clk = clock(-30.0)  # the run begins 30 lab s before t0
    fake = FakeMigrations(clk, {"a": 0.05, "b": 0.05, "c": 0.05})
    p = plan([("a", 0.0, 15.0, 290.0), ("b", 0.0, 15.0, 280.0), ("c", 300.0, 30.0, 270.0)])
    out = asyncio.run(drain.run_plan("/nowhere", "lab", p, "h2", POLICY, migrate_fn=fake, clock=clk))
    for vm, off in (("a", 0.0), ("b", 0.0), ("c", 300.0)):
        assert T0 + off - 1.0 <= fake.start_of(vm) <= T0 + off + TOL, (vm, fake.start_of(vm) - T0)
    assert [c["bw"] for c in fake.calls] == [15.0, 15.0, 30.0]
    assert len({c["port"] for c in fake.calls}) == 3 and all(c["to"] == "h2" for c in fake.calls)
    rows = {r["vm"]: r for r in out.rows}
    assert rows["c"]["planned_start"] == T0 + 300.0 and 0.0 <= rows["c"]["lag_s"] <= TOL
    assert rows["a"]["predicted_downtime_ms"] == 290.0
    s = out.summary()
    assert s["completed"] == 3 and s["total_downtime_ms"] == 750.0 and s["worst_downtime_ms"] == 250.0
    assert s["predicted_total_downtime_ms"] == 840.0 and s["not_converged"] == 0
    assert s["makespan_s"] == pytest.approx(rows["c"]["end"] - rows["a"]["start"], abs=0.1)
    assert s["makespan_wall_s"] == pytest.approx(s["makespan_s"] / SPEED, abs=0.01)


def test_a_due_migration_waits_while_the_link_or_k_is_taken_and_reports_its_lag():
    """On a compressed clock a migration outlasts its plan slot: the next waits for the link instead of overlapping."""
    clk = clock(0.0)
    # a takes 0.3 s wall = 180 lab s, though the plan gave it one 60 s slot; b wants the whole link at 60 s
    fake = FakeMigrations(clk, {"a": 0.3, "b": 0.05, "c": 0.05})
    p = plan([("a", 0.0, 30.0, 250.0), ("b", 60.0, 30.0, 250.0), ("c", 60.0, 15.0, 250.0)])
    out = asyncio.run(drain.run_plan("/nowhere", "lab", p, None, POLICY, migrate_fn=fake, clock=clk))
    a_end = next(r["end"] for r in out.rows if r["vm"] == "a")
    assert fake.start_of("b") >= a_end - 1.0, "b (full link) starts only once a has freed the link"
    assert fake.start_of("c") >= fake.start_of("b") - 1.0, "the plan's order holds: c does not overtake b"
    assert fake.max_shares <= LINK + 1e-9 and fake.max_running <= 2
    lag = {r["vm"]: r["lag_s"] for r in out.rows}
    assert lag["b"] >= 180.0 - 60.0 - TOL and out.summary()["max_lag_s"] == max(lag.values())


def test_k_limits_concurrency_even_when_shares_would_fit():
    clk = clock(0.0)
    fake = FakeMigrations(clk, {v: 0.2 for v in "abc"})
    p = plan([("a", 0.0, 10.0, 1.0), ("b", 0.0, 10.0, 1.0), ("c", 0.0, 10.0, 1.0)], k=2)
    asyncio.run(drain.run_plan("/nowhere", "lab", p, None, POLICY, migrate_fn=fake, clock=clk))
    assert fake.max_running == 2
    assert fake.start_of("c") >= min(fake.start_of("a"), fake.start_of("b")) + 0.2 * SPEED - TOL


def test_all_now_runs_k_at_once_at_link_over_k_and_starts_the_next_when_one_ends():
    clk = clock(0.0)
    fake = FakeMigrations(clk, {"v1": 0.3, "v2": 0.1, "v3": 0.1, "v4": 0.1}, pauses={"v1": 2000.0}, forced=("v1",))
    preds = {"v2": {"predicted_downtime_ms": 260.0}}
    out = asyncio.run(drain.run_all_now("/nowhere", "lab", ["v1", "v2", "v3", "v4"], "h2", 2, POLICY, link_mbps=LINK,
                                        predictions=preds, migrate_fn=fake, clock=clk))  # fmt: skip
    assert [c["vm"] for c in fake.calls] == ["v1", "v2", "v3", "v4"], "the given order"
    assert all(c["bw"] == LINK / 2 for c in fake.calls) and fake.max_running == 2
    assert fake.start_of("v2") - fake.start_of("v1") < TOL, "two at once from now"
    v2_end = next(r["end"] for r in out.rows if r["vm"] == "v2")
    assert v2_end - 1.0 <= fake.start_of("v3") <= v2_end + TOL, "v3 takes v2's lane as soon as it frees"
    s = out.summary()
    assert s["forced"] == 1 and s["not_converged"] == 1 and s["completed"] == 4
    assert s["total_downtime_ms"] == 2000.0 + 3 * 250.0 and s["converged_downtime_ms"] == 750.0
    assert s["worst_downtime_ms"] == 2000.0
    assert s["predicted_total_downtime_ms"] == 260.0 and s["predicted_not_converged"] == 3
    assert out.t_begin == pytest.approx(fake.start_of("v1"), abs=TOL)


def test_all_now_with_fewer_vms_than_k_gives_each_link_over_n_and_can_wait_for_a_start_time():
    clk = clock(-120.0)
    fake = FakeMigrations(clk, {"v1": 0.05, "v2": 0.05})
    asyncio.run(drain.run_all_now("/nowhere", "lab", ["v1", "v2"], None, 4, POLICY, link_mbps=LINK, at=T0,
                                  migrate_fn=fake, clock=clk))  # fmt: skip
    assert all(c["bw"] == LINK / 2 for c in fake.calls)
    assert min(c["start"] for c in fake.calls) >= T0 - 1.0


def test_a_failed_migration_is_an_outcome_and_the_others_still_run_and_are_published():
    clk = clock(0.0)
    fake = FakeMigrations(clk, {"a": 0.05, "b": 0.05}, fail=("a",))
    sent: list[dict[str, Any]] = []

    async def publish(messages: list[dict[str, Any]]) -> None:
        sent.extend(messages)

    p = plan([("a", 0.0, 15.0, 290.0), ("b", 0.0, 15.0, 280.0)])
    out = asyncio.run(drain.run_plan("/nowhere", "lab", p, None, POLICY, migrate_fn=fake, clock=clk, publish=publish))
    s = out.summary()
    assert s["failed"] == 1 and s["completed"] == 1 and s["total_downtime_ms"] == 250.0
    assert [m["vm"] for m in sent] == ["b"] and out.published == 1
    msg = sent[0]
    assert msg["predicted_downtime_ms"] == 280.0 and msg["predicted_total_ms"] == 10_000.0
    assert msg["predicted_at"] == T0 and msg["policy"].startswith("drain-plan:")
    assert next(r for r in out.rows if r["vm"] == "a")["error"].endswith("QEMU did not start")


def test_publish_failure_keeps_the_measurements():
    clk = clock(0.0)
    fake = FakeMigrations(clk, {"a": 0.02})

    async def broken(messages: list[dict[str, Any]]) -> None:
        raise ConnectionError("no broker")

    out = asyncio.run(drain.run_all_now("/nowhere", "lab", ["a"], None, 2, POLICY, link_mbps=LINK, migrate_fn=fake,
                                        clock=clk, publish=broken))  # fmt: skip
    assert out.summary()["completed"] == 1 and out.published == 0 and "no broker" in out.publish_error


def test_cancelling_a_drain_cancels_its_migrations():
    clk = clock(0.0)
    fake = FakeMigrations(clk, {"a": 5.0, "b": 5.0})

    async def main() -> None:
        task = asyncio.create_task(drain.run_all_now("/nowhere", "lab", ["a", "b"], None, 2, POLICY, link_mbps=LINK,
                                                     migrate_fn=fake, clock=clk))  # fmt: skip
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert fake.running == 0

    asyncio.run(asyncio.wait_for(main(), 3.0))


def test_plan_steps_follow_the_start_order_and_carry_the_plan_prediction():
    p = plan([("late", 600.0, 30.0, 300.0), ("early", 0.0, 15.0, 250.0)])
    steps = drain.plan_steps(p, model="m1")
    assert [s.vm for s in steps] == ["early", "late"]
    assert steps[0].prediction == {"predicted_downtime_ms": 250.0, "predicted_total_ms": 10_000.0,
                                   "predicted_at": T0, "model": "m1"}  # fmt: skip


# ------------------------------------------------------------------------------ lab.migrate: max-bandwidth


class FakeQMP:
    """Enough of ``qemu.qmp.QMPClient`` for ``lab.migrate._run``: a migration that completes at once."""

    def __init__(self, name: str, log: list[tuple[str, str, dict]]) -> None:
        self.name, self.log = name, log
        self.events = self._events()

    async def _events(self):  # noqa: ANN202
        now = time.time()
        yield {"event": "STOP" if self.name == "src" else "RESUME", "timestamp": {"seconds": int(now), "microseconds": 0}}
        await asyncio.Event().wait()

    async def execute(self, cmd: str, args: dict | None = None) -> dict:
        self.log.append((self.name, cmd, args or {}))
        if cmd == "query-migrate":
            return {"status": "completed", "ram": {"transferred": 10, "dirty-sync-count": 2}}
        return {}


@pytest.mark.parametrize(("bw", "want"), [(None, LIFTED_BANDWIDTH), (15.25, int(15.25 * 2**20))])
def test_migrate_sets_qemus_max_bandwidth_to_the_share_or_lifts_it(monkeypatch: pytest.MonkeyPatch, bw, want) -> None:
    from lab import migrate as mig
    from lab.qemu import GuestProcess

    log: list[tuple[str, str, dict]] = []

    @contextlib.asynccontextmanager
    async def fake_qmp(guest: GuestProcess):  # noqa: ANN202
        yield FakeQMP(guest.name, log)

    monkeypatch.setattr(mig.qemu, "qmp", fake_qmp)

    class State:
        clock = LabClock()

    src = GuestProcess("src", "h1", 1, "/x")
    dest = GuestProcess("dest", "h2", 2, "/y", "tcp:10.0.0.2:4460")
    args = () if bw is None else (bw,)
    out = asyncio.run(mig._run(State(), src, dest, 256.0, POLICY, *args))
    params = [a for who, cmd, a in log if cmd == "migrate-set-parameters"]
    assert params[0]["max-bandwidth"] == want and params[0]["downtime-limit"] == 300
    assert out.status == "completed"


# ------------------------------------------------------------------------------ lab.drain_compare: its report and history


def test_the_comparison_report_puts_predicted_and_measured_side_by_side_as_json():
    import json

    from lab.drain_compare import _report, history
    from lab.qemu import GuestSpec

    clk = clock(0.0)
    fake = FakeMigrations(clk, {"vm1": 0.05, "vm2": 0.05}, pauses={"vm1": 3000.0}, forced=("vm1",))
    p = plan([("vm1", 0.0, 15.0, 290.0), ("vm2", 0.0, 15.0, 280.0)])
    p.update({"baselines": {"all_now": {"total_downtime_ms": 280.0, "worst_downtime_ms": 280.0, "makespan_s": 20.0,
                                        "not_converged": 1, "late": 0}},
              "worst_downtime_ms": 290.0, "makespan_s": 10.0, "solver": {"strategy": "cp-sat"}})  # fmt: skip
    run1 = asyncio.run(drain.run_plan("/nowhere", "lab", p, None, POLICY, migrate_fn=fake, clock=clk))
    run2 = asyncio.run(drain.run_all_now("/nowhere", "lab", ["vm1", "vm2"], None, 2, POLICY, link_mbps=LINK,
                                         migrate_fn=fake, clock=clk))  # fmt: skip
    loads = {"vm1": {"kind": "constant", "rate": 1.0}, "vm2": {"kind": "constant", "rate": 2.0}}
    doc = _report(p, run1, run2, {"vm1": {}, "vm2": {}}, ["vm1", "vm2"], loads, {"vm1": [1.0]}, speed=SPEED, k=2,
                  deadline_s=6 * 3600, link_mbit=256.0, policy=POLICY, spec=GuestSpec("vm1", 320), model="m")  # fmt: skip
    json.dumps(doc)
    assert doc["measured"]["plan"]["total_downtime_ms"] == 3250.0 and doc["measured"]["all_now"]["forced"] == 1
    assert doc["predicted"]["plan"]["total_downtime_ms"] == 570.0
    assert doc["predicted"]["all_now"]["makespan_from_t0_s"] == 20.0 and doc["predicted"]["all_now"]["not_converged"] == 1
    assert doc["measured"]["plan"]["last_end_after_deadline_s"] < 0
    assert [r["vm"] for r in doc["rows"]["all_now"]] == ["vm1", "vm2"]

    msgs = history(T0, loads, "h1", 142.0, 320.0, days=1)
    assert len(msgs) == 288 and all(k == b"h1" for k, _ in msgs)
    first = json.loads(msgs[0][1])
    assert [s["vm"] for s in first] == ["vm1", "vm2"] and first[0]["ts"] == T0 - 86400
    assert json.loads(msgs[-1][1])[0]["ts"] < T0


# ------------------------------------------------------------------------------ the dilated clock


class RebasingClock(LabClock):
    """An in-memory lab clock that can be re-based like ``lab.drain.LiveClock`` (records every speed it was set to)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.speeds: list[float] = []

    def rebase(self, speed: float) -> None:
        now = self.now()
        self.speed, self.origin, self.wall0 = speed, now, time.time()
        self.speeds.append(speed)


def test_dilated_drains_run_the_clock_in_real_time_while_migrating_and_compressed_between():
    clk = RebasingClock(SPEED, T0, time.time())
    fake = FakeMigrations(clk, {"a": 0.2, "b": 0.2, "c": 0.2})
    seen: dict[str, float] = {}
    inner = fake.__call__

    async def migrate(*args: Any, **kw: Any) -> MigrationOutcome:
        seen[args[2]] = clk.speed
        return await inner(*args, **kw)

    # a and b overlap (half link each), c follows ten minutes of plan time later at the full link
    p = plan([("a", 0.0, 15.0, 1.0), ("b", 0.0, 15.0, 1.0), ("c", 600.0, 30.0, 1.0)])
    t = time.monotonic()
    out = asyncio.run(drain.run_plan("/nowhere", "lab", p, None, POLICY, migrate_fn=migrate, clock=clk, dilate=True))
    wall = time.monotonic() - t
    assert set(seen.values()) == {drain.REAL_TIME}, "every migration reads a real-time clock"
    rows = {r["vm"]: r for r in out.rows}
    for vm in "abc":
        assert rows[vm]["end"] - rows[vm]["start"] == pytest.approx(0.2, abs=0.1), "a migration lasts what it lasts"
    assert rows["c"]["start"] >= T0 + 600.0 and 0 <= rows["c"]["lag_s"] < 0.1 * SPEED
    assert wall < 0.2 + 600.0 / SPEED + 0.2 + 1.0, "the gap between them stays compressed"
    assert clk.speed == SPEED and clk.speeds == [drain.REAL_TIME, SPEED, drain.REAL_TIME, SPEED]
    assert out.dilated and out.summary()["makespan_wall_s"] == pytest.approx(wall, abs=0.5)


def test_the_clock_gets_its_speed_back_when_a_dilated_drain_is_cancelled():
    clk = RebasingClock(SPEED, T0, time.time())
    fake = FakeMigrations(clk, {"a": 5.0})

    async def main() -> None:
        task = asyncio.create_task(drain.run_all_now("/nowhere", "lab", ["a"], None, 2, POLICY, link_mbps=LINK,
                                                     migrate_fn=fake, clock=clk, dilate=True))  # fmt: skip
        await asyncio.sleep(0.1)
        assert clk.speed == drain.REAL_TIME
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert clk.speed == SPEED


def test_a_clock_without_rebase_or_at_real_speed_is_left_alone():
    clk = clock(0.0)  # a plain LabClock: no rebase
    fake = FakeMigrations(clk, {"a": 0.05})
    out = asyncio.run(drain.run_all_now("/nowhere", "lab", ["a"], None, 1, POLICY, link_mbps=LINK, migrate_fn=fake,
                                        clock=clk, dilate=True))  # fmt: skip
    assert not out.dilated and clk.speed == SPEED


def test_the_cli_prints_a_plan_and_its_measured_outcome(capsys: pytest.CaptureFixture[str]) -> None:
    from app.commands.lab import _print_outcome, _print_plan

    clk = clock(0.0)
    fake = FakeMigrations(clk, {"a": 0.02, "b": 0.02}, pauses={"b": 1500.0}, forced=("b",))
    p = plan([("a", 0.0, 15.0, 290.0), ("b", 0.0, 15.0, 280.0)])
    p.update({"unplaced": [{"vm": "c", "reason": "does not converge"}], "solver": {"strategy": "cp-sat", "status": "OPTIMAL"},
              "baselines": {"all_now": {"total_downtime_ms": None, "not_converged": 2}}})  # fmt: skip
    _print_plan(p)
    out = asyncio.run(drain.run_plan("/nowhere", "lab", p, None, POLICY, migrate_fn=fake, clock=clk))
    _print_outcome(out)
    text = capsys.readouterr().out
    assert "predicted pause 290 ms" in text and "not placed c: does not converge" in text
    assert "measured total downtime 1750 ms (predicted 570 ms over 2 converging)" in text
    assert "1 not converged (1 forced, 0 aborted)" in text
