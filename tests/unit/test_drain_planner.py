"""Host drain planner (``drain``): valid plans, the concurrency cost, unplaceable VMs, the baseline guarantee."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from drain import DrainProblem, DrainVM, all_now, check_plan, plan_drain, sequential
from gpu_kernels.downtime import PrecopyParams, precopy_with

T0 = 1_700_000_000.0
LINK = 1250.0
NAN = float("nan")


def problem(vms: list[DrainVM], k: int = 4, horizon_s: float = 6 * 3600, slot_s: int = 60,
            params: PrecopyParams | None = None) -> DrainProblem:  # fmt: skip
    return DrainProblem("host-a", vms, T0, slot_s, T0 + horizon_s, k, LINK, params or PrecopyParams())


def vm(name: str, dirty: np.ndarray, mem_mb: float = 8192.0, wss_mb: float = NAN, factor: float = 1.0) -> DrainVM:
    return DrainVM(name, mem_mb, wss_mb, np.asarray(dirty, dtype=np.float64), factor)


def daily_fleet(n: int = 20, seed: int = 0, slot_s: int = 60, hours: int = 6) -> tuple[list[DrainVM], list[bool]]:
    """Half the VMs busy now with a quiet spell of 1.5 h a few hours in; half quiet now, busy later."""
    rng = np.random.default_rng(seed)
    h = np.arange(hours * 3600 // slot_s) * slot_s / 3600
    vms, busy = [], []
    for i in range(n):
        busy_now = i % 2 == 0
        start = rng.uniform(1.5, 3.5)
        quiet = (h >= start) & (h < start + 1.5)
        peak = rng.uniform(120, 260)
        level = peak if busy_now else rng.uniform(1, 4)
        d = np.where(quiet, rng.uniform(0.5, 3), level) * rng.uniform(0.9, 1.1, h.size)
        if not busy_now:
            d = np.where(h > 4.5, peak, d)
        vms.append(vm(f"vm{i:02d}", d, mem_mb=float(rng.choice([2048, 4096, 8192]))))
        busy.append(busy_now)
    return vms, busy


def running_at(rows: list[dict], t: float) -> list[dict]:
    return [r for r in rows if r["start"] <= t < r["end"]]


def test_daily_cycle_host_plan_is_valid_beats_both_baselines_and_defers_busy_vms():
    vms, busy = daily_fleet()
    p = problem(vms)
    plan = plan_drain(p, time_limit_s=3.0)
    out = plan.to_json()
    totals = {"plan": out["total_downtime_ms"], **{k: b["total_downtime_ms"] for k, b in out["baselines"].items()}}
    print(f"\n20-VM drain totals (ms): plan {totals['plan']:.1f}, all_now {totals['all_now']:.1f}, "
          f"sequential {totals['sequential']:.1f} ({out['solver']})")  # fmt: skip
    assert check_plan(p, out) == []
    assert out["unplaced"] == [] and len(out["vms"]) == 20
    assert all(b["not_converged"] == 0 and b["late"] == 0 for b in out["baselines"].values())
    assert totals["plan"] <= totals["all_now"] and totals["plan"] <= totals["sequential"]
    assert out["solver"]["lower_bound_ms"] <= totals["plan"] + 1e-6
    by_name = {v.vm: (v, b) for v, b in zip(vms, busy)}
    for r in out["vms"]:
        v, is_busy = by_name[r["vm"]]
        slot = int((r["start"] - T0) // p.slot_s)
        if is_busy:  # deferred into its quiet spell: far below the rate it has now
            assert r["start"] > T0 and v.dirty_mbps[slot] < 0.1 * v.dirty_mbps[0], r


@pytest.mark.parametrize("k", [1, 2])
def test_max_concurrent_is_respected_and_k1_never_overlaps(k):
    # eight identical VMs all wanting the same short quiet spell (slots 10..13 of 10 s)
    d = np.full(60, 150.0)
    d[10:14] = 1.0
    vms = [vm(f"v{i}", d, mem_mb=4096.0) for i in range(8)]
    p = problem(vms, k=k, horizon_s=600, slot_s=10)
    out = plan_drain(p, time_limit_s=2.0).to_json()
    assert check_plan(p, out) == []
    assert len(out["vms"]) + len(out["unplaced"]) == 8
    for r in out["vms"]:
        assert len(running_at(out["vms"], r["start"])) <= k
    if k == 1:
        rows = sorted(out["vms"], key=lambda r: r["start"])
        assert all(a["end"] <= b["start"] + 1e-6 for a, b in zip(rows, rows[1:]))
        assert all(r["bw_mbps"] == LINK for r in rows)


def test_vm_dirtying_faster_than_the_link_is_unplaced_for_convergence():
    p = problem([vm("ok", np.full(360, 5.0)), vm("hot", np.full(360, 2000.0))], k=2)
    out = plan_drain(p, time_limit_s=1.0).to_json()
    assert [r["vm"] for r in out["vms"]] == ["ok"]
    [u] = out["unplaced"]
    assert u["vm"] == "hot" and "converge" in u["reason"] and "1250" in u["reason"] and "2000" in u["reason"]
    assert check_plan(p, out) == []


def test_deadline_too_short_is_unplaced_with_a_deadline_reason():
    big = vm("big", np.full(10, 5.0), mem_mb=65536.0)  # ~55 s at the full link
    p = problem([big, vm("small", np.full(10, 5.0), mem_mb=1024.0)], k=2, horizon_s=30, slot_s=10)
    out = plan_drain(p, time_limit_s=1.0).to_json()
    assert [r["vm"] for r in out["vms"]] == ["small"]
    [u] = out["unplaced"]
    assert u["vm"] == "big" and "deadline" in u["reason"] and "30 s remain" in u["reason"]
    assert check_plan(p, out) == []


def test_two_at_once_share_the_link_and_take_longer_than_alone():
    # one quiet 60 s slot (the rest does not converge even at the full link): both must run in it together
    d = np.full(6, 3000.0)
    d[3] = 1.0
    p = problem([vm("a", d), vm("b", d)], k=2, horizon_s=360)
    out = plan_drain(p, time_limit_s=1.0).to_json()
    assert check_plan(p, out) == []
    assert out["unplaced"] == [] and len(out["vms"]) == 2
    alone = float(precopy_with(p.params, np.float64(8192.0), np.float64(1.0), np.float64(LINK)).duration_s)
    for r in out["vms"]:
        assert r["start"] == T0 + 180 and r["bw_mbps"] == pytest.approx(LINK / 2)
        assert r["duration_s"] > 1.9 * alone
    assert out["baselines"]["all_now"]["not_converged"] == 2  # starting now, nothing converges


def test_returns_a_feasible_baseline_when_the_grid_cannot_match_it():
    # K = 1, 60 s slots, 10 s migrations, 120 s to go: the grid holds two, the sequential baseline does all three
    vms = [vm(f"v{i}", np.full(2, 5.0)) for i in range(3)]
    p = problem(vms, k=1, horizon_s=120)
    plan = plan_drain(p, time_limit_s=1.0)
    out = plan.to_json()
    assert out["solver"]["strategy"] in ("all_now", "sequential")
    assert out["unplaced"] == [] and check_plan(p, out) == []
    assert out["total_downtime_ms"] == pytest.approx(sequential(p).total_downtime_ms)


def test_tiny_time_limit_is_still_no_worse_than_the_feasible_baselines():
    vms, _ = daily_fleet(seed=1)
    p = problem(vms)
    out = plan_drain(p, time_limit_s=0.001).to_json()
    assert check_plan(p, out) == []
    mine = (len(out["unplaced"]), out["total_downtime_ms"])
    for base in (all_now(p), sequential(p)):
        if base.feasible:
            assert mine <= (0, base.total_downtime_ms + 1e-6), (out["solver"], base.name)


def test_baselines_follow_their_policies():
    vms = [vm(f"v{i}", np.full(360, 20.0)) for i in range(5)]
    p = problem(vms, k=2)
    now, seq = all_now(p), sequential(p)
    assert [r.bw_mbps for r in now.rows] == [LINK / 2] * 5
    assert now.rows[0].start == now.rows[1].start == T0 and now.rows[2].start == min(now.rows[0].end, now.rows[1].end)
    assert all(a.end == b.start for a, b in zip(seq.rows, seq.rows[1:])) and seq.rows[0].bw_mbps == LINK
    assert seq.makespan_s == pytest.approx(sum(r.duration_s for r in seq.rows))
    assert all_now(problem(vms[:1], k=4)).rows[0].bw_mbps == LINK  # fewer VMs than K: link / n


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"horizon_s": 0}, "deadline"),
        ({"horizon_s": -60}, "deadline"),
        ({"k": 0}, "max_concurrent"),
        ({"slot_s": 0}, "slot_s"),
        ({"horizon_s": 3600}, "dirty_mbps has 10 slots but the plan needs 60"),
    ],
)
def test_invalid_problems_raise_clear_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        problem([vm("a", np.full(10, 5.0))], **{"horizon_s": 600, **kwargs})


def test_invalid_vms_raise_clear_value_errors():
    with pytest.raises(ValueError, match="listed twice"):
        problem([vm("a", np.full(10, 5.0)), vm("a", np.full(10, 5.0))], horizon_s=600)
    with pytest.raises(ValueError, match="mem_mb"):
        vm("a", np.full(10, 5.0), mem_mb=0.0)
    with pytest.raises(ValueError, match="factor"):
        vm("a", np.full(10, 5.0), factor=math.inf)
    with pytest.raises(ValueError, match="1-D"):
        vm("a", np.full((2, 5), 5.0))
    with pytest.raises(ValueError, match="link_mbps"):
        DrainProblem("h", [], T0, 60, T0 + 600, 1, 0.0, PrecopyParams())


def test_learned_factor_scales_the_planned_downtime():
    d = np.full(10, 5.0)
    p1 = problem([vm("a", d)], k=1, horizon_s=600)
    p2 = problem([vm("a", d, factor=1.5)], k=1, horizon_s=600)
    a, b = plan_drain(p1, 1.0).to_json(), plan_drain(p2, 1.0).to_json()
    assert b["total_downtime_ms"] == pytest.approx(1.5 * a["total_downtime_ms"])
    assert check_plan(p2, b) == []


def test_json_has_the_contract_keys_and_no_nan_or_inf():
    d = np.full(360, 10.0)
    p = problem([vm("a", d, wss_mb=1024.0), vm("b", d), vm("hot", np.full(360, 5000.0))], k=2)
    out = plan_drain(p, time_limit_s=1.0).to_json()
    json.dumps(out, allow_nan=False)
    assert set(out) == {"host", "created", "t0", "deadline", "max_concurrent", "link_mbps", "slot_s", "vms",
                        "unplaced", "total_downtime_ms", "worst_downtime_ms", "makespan_s", "solver", "baselines"}
    assert {"vm", "order", "start", "end", "duration_s", "downtime_ms", "bw_mbps"} == set(out["vms"][0])
    assert [r["order"] for r in out["vms"]] == list(range(len(out["vms"])))
    assert [r["start"] for r in out["vms"]] == sorted(r["start"] for r in out["vms"])
    assert set(out["unplaced"][0]) == {"vm", "reason"}
    assert set(out["solver"]) == {"strategy", "status", "wall_s", "lower_bound_ms", "options"}
    assert set(out["baselines"]) == {"all_now", "sequential"}
    for b in out["baselines"].values():
        assert set(b) == {"total_downtime_ms", "worst_downtime_ms", "makespan_s", "not_converged", "late"}
        assert b["not_converged"] == 1  # "hot" never converges; its inf is kept out of the totals
    assert isinstance(out["slot_s"], int) and isinstance(out["max_concurrent"], int)
    assert out["makespan_s"] == pytest.approx(max(r["end"] for r in out["vms"]) - T0)


def test_empty_host_is_an_empty_valid_plan():
    p = DrainProblem("h", [], T0, 60, T0 + 600, 2, LINK, PrecopyParams())
    out = plan_drain(p, 0.5).to_json()
    assert out["vms"] == [] and out["unplaced"] == [] and out["total_downtime_ms"] == 0.0
    assert check_plan(p, out) == []


def test_check_plan_reports_broken_plans():
    d = np.full(360, 10.0)
    p = problem([vm("a", d), vm("b", d), vm("c", d)], k=1)
    out = plan_drain(p, time_limit_s=1.0).to_json()
    assert check_plan(p, out) == []
    bad = json.loads(json.dumps(out))
    bad["vms"][1]["start"] = bad["vms"][0]["start"]  # overlap under K = 1 (and end - start no longer fits)
    bad["vms"][2]["end"] = p.deadline + 60
    bad["vms"][0]["duration_s"] /= 2
    bad["unplaced"].append({"vm": "a", "reason": "x"})
    bad["vms"].append({**bad["vms"][0], "vm": "ghost"})
    problems = "\n".join(check_plan(p, bad))
    for words in ("above K = 1", "after the deadline", "the model gives", "appears 2 times", "ghost"):
        assert words in problems, (words, problems)
    missing = {**out, "vms": out["vms"][1:]}
    assert any("neither placed nor unplaced" in v for v in check_plan(p, missing))
