"""``zhuge lab drain-compare``: one lab host drained twice, by zhuge's plan and all-now at K, measured.

From nothing: Kafka and Redis (started when they do not answer, stopped again at
the end), a worker of its own (own topics, Redis prefix, model store, history),
a lab of two hosts with 4-6 guests all on h1 whose daily loads are phase-shifted
on a compressed lab clock:

- ``A`` busy (40 MiB/s, above the 256 Mbit/s link: never converges) 05:00-13:00, quiet (1 MiB/s) otherwise;
- ``B`` quiet now, busy 15:00-23:00;
- ``C`` a constant 12 MiB/s: converges on the whole link, not on half of it within the timeout.

As in the lab's end-to-end test (``tests/integration/test_lab.py``): four days of
the guests' history as their agent would have reported it (with its measurement
noise) -> the worker -> ``zhuge retrain`` -> the worker hot-swaps to the retrained
model, which has seen the busy/quiet cycle; then the lab comes up (its clock
starting where the history ends) and ``zhuge agent --lab`` feeds the worker live.
When the lab clock reaches the decision window (t0 between 07:00 and 09:00, A busy
and B quiet), the agent stops (the curves in Redis hold still), the plan for h1 is
made (``api.plans.plan_host_drain`` via ``lab.drain.plan_in_lab``, K and deadline as
asked) and executed (``lab.drain.run_plan``). Then the lab is taken down and
brought up again, identical, its clock set so that the second run faces the same
lab time and the same loads from t0, and all-now at K runs (``lab.drain.run_all_now``,
the VMs in name order, as the planner's baseline takes them). Both runs have the
same background: no agent, the worker stopped; both run on the dilated lab clock
(real time while migrations run, ``lab.drain``) unless ``dilate`` is off.

Prints (returns) one JSON object: for both runs the measured total downtime (every
completed migration's pause, forced ones included), the worst, the makespan (first
start to last end, lab and wall seconds), the not-converged count, and the plan's
predicted figures for both strategies.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from app.settings import Settings
from app.topics import produce_messages, read_from_start

Echo = Callable[[str], None]

ZHUGE = [sys.executable, "-m", "app.cli"]
H = 3600.0
PROFILES: dict[str, dict[str, Any]] = {
    "A": {"kind": "square", "busy_rate": 40.0, "quiet_rate": 1.0, "busy_from_s": 5 * H, "busy_to_s": 13 * H,
          "busy_cpu": 10.0, "quiet_cpu": 1.0},
    "B": {"kind": "square", "busy_rate": 40.0, "quiet_rate": 1.0, "busy_from_s": 15 * H, "busy_to_s": 23 * H,
          "busy_cpu": 10.0, "quiet_cpu": 1.0},
    "C": {"kind": "constant", "rate": 12.0, "cpu": 5.0},
}  # fmt: skip
ORDER = "ABCABA"  # vm1..vm6: the name order all-now takes is not the worst one (A, A first) nor the best
WINDOW = (7 * H, 9 * H)  # where t0 (lab time of day) must fall: A busy for 4-6 h more, B quiet for 6-8 h
CLOCK_START = 4 * H  # lab time of day when the live part starts (where the history ends)
DAYS_BACK = 5  # the lab clock starts this many days before now: every timestamp stays in the past
HISTORY_DAYS = 4


def profile(i: int) -> str:
    return ORDER[i % len(ORDER)]


def history(origin: float, loads: dict[str, dict[str, Any]], host: str, mem_used_mb: float, mem_total_mb: float,
            days: float = HISTORY_DAYS, seed: int = 11) -> list[tuple[bytes, bytes]]:  # fmt: skip
    """The guests' last ``days`` before ``origin`` as their agent reports them (``tests/integration/test_lab.py``):
    one message per host and 5-minute period, keyed by the host, with the agent's measurement noise."""
    import numpy as np

    from lab.load import program

    plays = {vm: program(spec, origin) for vm, spec in loads.items()}
    rng = np.random.default_rng(seed)
    out = []
    t = origin - days * 86400
    while t < origin:
        batch = []
        for vm in sorted(plays):
            rate, cpu = plays[vm](t)
            batch.append({"vm": vm, "ts": t, "host": host, "cpu_pct": round(cpu * rng.uniform(0.85, 1.1), 2), "vcpus": 1,
                          "mem_total_mb": mem_total_mb, "mem_used_mb": round(mem_used_mb + rng.normal(0, 2.0), 1),
                          "dirty_mbps": float(round(rate * rng.uniform(0.9, 1.06)))})  # fmt: skip
        out.append((host.encode(), json.dumps(batch).encode()))
        t += 300.0
    return out


def experiment_settings(base: Settings, root: Path, link_mbit: float, timeout_s: float, time_limit_s: float) -> Settings:
    """Own topics, group, Redis prefix, model store, history and snapshots; the model set to the lab's link and policy
    (the constants of the lab's calibration, as the end-to-end test uses them)."""
    token = uuid.uuid4().hex[:8]
    return base.replace(
        topic_metrics=f"{base.topic_metrics}.drain-{token}", topic_dlq=f"{base.topic_dlq}.drain-{token}",
        topic_scores=f"{base.topic_scores}.drain-{token}", topic_migrations=f"{base.topic_migrations}.drain-{token}",
        consumer_group=f"zhuge-drain-{token}", redis_prefix=f"drain{token}:", topic_partitions=1,
        model_store=str(root / "models"), history_url=str(root / "history"), snapshot_dir=str(root / "snapshots"),
        history_flush_s=2.0, model_check_s=2.0, metrics_port=0,
        link_mbps=link_mbit * 1e6 / 8 / 2**20, link_efficiency=0.967, precopy_gap_ms=62.0, resume_ms=56.0,
        migration_timeout_s=timeout_s, migration_on_timeout="force", downtime_target_ms=300.0,
        batch_within_s=0.2, snapshot_every_s=5.0, drain_time_limit_s=time_limit_s,
    )  # fmt: skip


def _wait(predicate: Callable[[], bool], what: str, timeout_s: float, *logs: Path, poll_s: float = 0.5) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2500:]}" for p in logs if p.exists())
            raise TimeoutError(f"{what}: not reached after {timeout_s:.0f} s\n{tails}")
        time.sleep(poll_s)


def tod_h(ts: float | None) -> float | None:
    return None if ts is None else round(math.fmod(ts, 86400.0) / 3600.0, 2)


def _iso(ts: float | None) -> str | None:
    return None if ts is None else dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _compact(row: dict[str, Any]) -> dict[str, Any]:
    keep = ("vm", "status", "converged", "downtime_ms", "predicted_downtime_ms", "total_ms", "predicted_total_ms",
            "bw_mbps", "dirty_syncs", "dirty_rate_seen_mbps", "error")  # fmt: skip
    out = {k: (round(row[k], 1) if isinstance(row.get(k), float) else row.get(k)) for k in keep if k in row}
    out["start_h"], out["end_h"] = tod_h(row.get("start")), tod_h(row.get("end"))
    if row.get("planned_start") is not None:
        out["planned_start_h"] = tod_h(row["planned_start"])
        out["lag_min"] = round((row.get("lag_s") or 0.0) / 60.0, 1)
    return out


def run_compare(
    base: Settings, *, guests: int = 5, k: int = 2, deadline_s: float = 8 * H, speed: float = 300.0,
    ram_mb: int = 320, mem_mb: int = 64, wss_mb: int = 48, link_mbit: float = 256.0, timeout_s: float = 15.0,
    time_limit_s: float = 5.0, workdir: str | None = None, keep: bool = False, dilate: bool = True, echo: Echo = print,
) -> dict[str, Any]:  # fmt: skip
    """The whole comparison; see the module docstring. Cleans up what it started, also on failure."""
    from app import services

    if not 4 <= guests <= 6:
        raise ValueError("guests must be 4..6 (TCG on a small machine)")
    t_start = time.monotonic()
    root = Path(workdir or tempfile.mkdtemp(prefix="zhuge-drain-"))
    root.mkdir(parents=True, exist_ok=True)
    started = services.not_answering(base)
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a TERM still runs every cleanup below
    ok = False
    try:
        if started:
            services.up(base, echo=echo, only=started)
        settings = experiment_settings(base, root, link_mbit, timeout_s, time_limit_s)
        result = _experiment(settings, root, guests=guests, k=k, deadline_s=deadline_s, speed=speed, ram_mb=ram_mb,
                             mem_mb=mem_mb, wss_mb=wss_mb, link_mbit=link_mbit, timeout_s=timeout_s, dilate=dilate,
                             echo=echo)  # fmt: skip
        result["wall_s"] = round(time.monotonic() - t_start, 1)
        result["services_started"] = started
        ok = True
        return result
    finally:
        try:
            if started:
                services.down(base, echo=echo, only=started)
        finally:
            signal.signal(signal.SIGTERM, previous)
            if ok and not keep and workdir is None:
                shutil.rmtree(root, ignore_errors=True)
            else:
                echo(f"drain-compare: logs and state kept in {root}")


def _experiment(settings: Settings, root: Path, *, guests: int, k: int, deadline_s: float, speed: float, ram_mb: int,
                mem_mb: int, wss_mb: int, link_mbit: float, timeout_s: float, dilate: bool,
                echo: Echo) -> dict[str, Any]:  # fmt: skip
    from app.topics import ensure_topics
    from app.worker_process import WorkerProcess, settings_env
    from lab import drain
    from lab import lab as labmod
    from lab.executor import publish
    from lab.migrate import MigrationPolicy
    from lab.qemu import GuestSpec
    from lab.state import LabClock, lab_dir, updating

    names = [f"vm{i + 1}" for i in range(guests)]
    loads = {vm: PROFILES[profile(i)] for i, vm in enumerate(names)}
    specs = [GuestSpec(vm, ram_mb=ram_mb, mem_mb=mem_mb, wss_mb=wss_mb) for vm in names]
    lab_name = f"drain{os.getpid() % 10000}"
    source, dest = "h1", "h2"
    policy = MigrationPolicy(downtime_limit_ms=settings.downtime_target_ms, timeout_s=timeout_s, on_timeout="force")
    env = settings_env(settings)
    logs = root / "worker.log", root / "agent.log", root / "retrain.log"
    day = math.floor((time.time() - DAYS_BACK * 86400) / 86400) * 86400
    origin = day + CLOCK_START

    def lab_plan(clock: LabClock) -> labmod.LabPlan:
        return labmod.LabPlan(2, link_mbit, specs, loads, clock, {vm: source for vm in names})

    asyncio.run(ensure_topics(settings, [settings.topic_metrics, settings.topic_dlq, settings.topic_scores,
                                         settings.topic_migrations], partitions=1))  # fmt: skip
    worker = agent = None
    client = settings.redis_client(asyncio=False)
    try:
        # 1. history -> worker (bootstrap model) -> retrain -> hot reload, before the lab exists (CPU for training)
        echo(f"drain-compare: {guests} guests on {source} ({''.join(profile(i) for i in range(guests))}), "
             f"{HISTORY_DAYS} days of history, worker, retrain ...")  # fmt: skip
        mem_used = mem_mb + 78.0  # what the agent measures of such a guest: the workload plus the guest OS
        past = history(origin, loads, source, mem_used, float(ram_mb))
        asyncio.run(produce_messages(settings, past[:-1]))
        worker = WorkerProcess.start(settings, logs[0], ready_timeout=300)
        bootstrap = worker.model_version()
        # the worker flushes its history buffer when a write finds it older than history_flush_s: with no agent
        # running yet, the last period of the history, sent a little later, is that write
        _wait(lambda: worker.counter("zhuge_samples_in_total") >= (len(past) - 1) * guests, "history consumed", 180,
              *logs)  # fmt: skip
        time.sleep(settings.history_flush_s + 0.5)
        asyncio.run(produce_messages(settings, past[-1:]))
        _wait(lambda: len(list(Path(settings.history_url).rglob("*.parquet"))) >= HISTORY_DAYS, "history archived",
              180, *logs)  # fmt: skip
        retrain = subprocess.run([*ZHUGE, "retrain", "--workers", "1", "--max-rows", "20000"], env=env,
                                 capture_output=True, text=True, timeout=600)  # fmt: skip
        logs[2].write_text(retrain.stdout + retrain.stderr)
        if retrain.returncode != 0:
            raise RuntimeError(f"zhuge retrain failed:\n{(retrain.stdout + retrain.stderr)[-3000:]}")
        _wait(lambda: worker.model_version() not in (bootstrap, ""), "the retrained model in service", 120, *logs)
        model = worker.model_version()
        echo(f"drain-compare: model {model} in service (bootstrap was {bootstrap}); lab up ...")

        # 2. the lab, its clock starting where the history ends; the agent feeds the worker live
        labmod.up(settings.state_dir, lab_name, lab_plan(LabClock(speed, origin, time.time())), echo=echo)
        with updating(lab_dir(settings.state_dir, lab_name)) as st:  # lab time = origin now that all guests run
            st.clock = LabClock(speed, origin, time.time())
            clock = st.clock
        agent = subprocess.Popen([*ZHUGE, "agent", "--lab", lab_name, "--period", "1", "--wss-every", "0"], env=env,
                                 stdout=open(logs[1], "ab"), stderr=subprocess.STDOUT)  # noqa: SIM115  # fmt: skip

        def score(vm: str) -> dict[str, str]:
            return {k.decode(): v.decode() for k, v in client.hgetall(settings.redis_keys().vm(vm)).items()}

        def live(vm: str) -> bool:
            h = score(vm)
            return h.get("model") == model and float(h.get("last_ts", 0)) >= origin and \
                client.exists(settings.redis_keys().curve(vm)) == 1  # fmt: skip

        _wait(lambda: all(live(vm) for vm in names), "live scores by the retrained model", 180, *logs)

        # 3. the decision window: t0 (after the agent stops and the solver runs) between 07:00 and 09:00 lab time
        lead_lab = (float(settings.drain_time_limit_s) + 3.0 + 4.0) * speed  # plan_in_lab's lead + agent stop
        tod = math.fmod(clock.now() + lead_lab, 86400.0)
        if not WINDOW[0] <= tod < WINDOW[1]:
            wait_lab = (WINDOW[0] + 0.25 * H - tod) % 86400.0
            echo(f"drain-compare: lab time {tod_h(clock.now())} h; waiting {wait_lab / speed:.0f} s for the window")
            time.sleep(wait_lab / speed)
        agent.terminate()
        agent.wait(timeout=30)
        agent = None
        time.sleep(3.0)  # the worker scores the agent's last samples: the curves hold still from here
        scores_at = {vm: score(vm) for vm in names}
        planned = asyncio.run(drain.plan_in_lab(settings, lab_name, source, deadline_s, k))
        plan, allnow_pred, plan_model = planned.plan, planned.all_now, planned.model
        (root / "plan.json").write_text(json.dumps(plan))
        echo(f"drain-compare: plan t0 {tod_h(plan['t0'])} h: " + ", ".join(
            f"{r['vm']}@{tod_h(r['start'])}h/{r['bw_mbps']:.0f}" for r in plan["vms"]))  # fmt: skip
        worker.stop()
        worker = None

        async def pub(messages: list[dict[str, Any]]) -> None:
            await publish(settings, messages)

        # 4. run 1: the plan
        run1 = asyncio.run(drain.run_plan(settings.state_dir, lab_name, plan, dest, policy, model=plan_model,
                                          publish=pub, echo=echo, dilate=dilate))  # fmt: skip
        echo(f"drain-compare: plan run {run1.summary()}")
        (root / "run-plan.json").write_text(json.dumps(run1.as_dict()))
        labmod.down(settings.state_dir, lab_name, echo=echo)

        # 5. run 2: the same lab again, the same lab time and loads from t0, all-now at K
        t0 = float(plan["t0"])
        margin_wall = 6.0  # the driver applies the loads of t0 - margin before the first migration
        labmod.up(settings.state_dir, lab_name, lab_plan(LabClock(speed, t0 - 3600.0, time.time())), echo=echo)
        with updating(lab_dir(settings.state_dir, lab_name)) as st:
            st.clock = LabClock(speed, t0 - margin_wall * speed, time.time())
        run2 = asyncio.run(drain.run_all_now(settings.state_dir, lab_name, names, dest, k, policy,
                                             predictions=allnow_pred, at=t0, publish=pub, echo=echo, dilate=dilate))  # fmt: skip
        echo(f"drain-compare: all-now run {run2.summary()}")
        (root / "run-all-now.json").write_text(json.dumps(run2.as_dict()))
        records = asyncio.run(read_from_start(settings, settings.topic_migrations, run1.published + run2.published))
    finally:
        if agent is not None:
            agent.terminate()
            try:
                agent.wait(timeout=30)
            except subprocess.TimeoutExpired:
                agent.kill()
        if worker is not None:
            worker.stop()
        try:
            labmod.down(settings.state_dir, lab_name, echo=echo)
        finally:
            _drop_keys(client, settings.redis_prefix)
            client.close()
            asyncio.run(_drop_topics(settings))
    report = _report(plan, run1, run2, scores_at, names, loads, planned.dirty_hourly, speed=speed, k=k,
                     deadline_s=deadline_s, link_mbit=link_mbit, policy=policy, spec=specs[0], model=model)  # fmt: skip
    report["vm_migrations_read_back"] = {
        "records": len(records), "with_prediction": sum(r.get("predicted_downtime_ms") is not None for r in records),
        "policies": sorted({str(r.get("policy")) for r in records}),
    }  # fmt: skip
    (root / "result.json").write_text(json.dumps(report))
    return report


MEASURED_KEYS = ("dilated", "total_downtime_ms", "worst_downtime_ms", "makespan_s", "makespan_wall_s", "span_from_begin_s",
                 "not_converged", "forced", "aborted", "failed", "completed", "converged_downtime_ms",
                 "predicted_total_downtime_ms", "predicted_not_converged", "max_lag_s", "unplaced", "published")  # fmt: skip


def _report(plan: dict[str, Any], run1: Any, run2: Any, scores_at: dict[str, dict[str, str]], names: list[str],
            loads: dict[str, dict[str, Any]], dirty_hourly: dict[str, list[float]], **info: Any) -> dict[str, Any]:  # fmt: skip
    """The one JSON object: predicted (the plan and its all-now baseline) and measured (both runs) side by side."""
    allnow = dict(plan.get("baselines", {}).get("all_now", {}))
    spec, policy = info.pop("spec"), info.pop("policy")
    measured = {"plan": run1.summary(), "all_now": run2.summary()}
    ends = [r["end"] for r in run1.rows if r.get("end") is not None]
    measured["plan"]["last_end_after_deadline_s"] = round(max(ends) - plan["deadline"], 1) if ends else None
    return {
        "experiment": {
            **info, "guests": {vm: {"profile": profile(i), "load": loads[vm]} for i, vm in enumerate(names)},
            "guest": {"ram_mb": spec.ram_mb, "mem_mb": spec.mem_mb, "wss_mb": spec.wss_mb},
            "policy": {"downtime_limit_ms": policy.downtime_limit_ms, "timeout_s": policy.timeout_s,
                       "on_timeout": policy.on_timeout},
            "t0": _iso(plan["t0"]), "t0_h": tod_h(plan["t0"]), "deadline_h": tod_h(plan["deadline"]),
            "link_mbps": plan["link_mbps"],
        },  # fmt: skip
        "predicted": {
            "plan": {"total_downtime_ms": plan.get("total_downtime_ms"), "worst_downtime_ms": plan.get("worst_downtime_ms"),
                     "makespan_from_t0_s": plan.get("makespan_s"), "unplaced": len(plan.get("unplaced", [])),
                     "not_converged": 0, "solver": plan.get("solver")},
            "all_now": {**allnow, "makespan_from_t0_s": allnow.pop("makespan_s", None),
                        "note": "total/worst over the migrations the model says converge; not_converged ones excluded"},
        },  # fmt: skip
        "measured": {name: {key: s.get(key) for key in (*MEASURED_KEYS, "last_end_after_deadline_s") if key in s}
                     for name, s in measured.items()},  # fmt: skip
        "rows": {"plan": [_compact(r) for r in run1.rows], "all_now": [_compact(r) for r in run2.rows]},
        "scores_at_plan": {vm: {k: h.get(k) for k in ("now_downtime_ms", "now_p_ok", "best_start", "window_rule")}
                           for vm, h in scores_at.items()},  # fmt: skip
        "forecast_dirty_hourly_from_t0": dirty_hourly,
    }


def _drop_keys(client: Any, prefix: str) -> None:
    """The experiment's own keys (its prefix) out of Redis; best effort."""
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        for i in range(0, len(keys), 500):
            client.delete(*keys[i : i + 500])
    except Exception:  # noqa: BLE001 - Redis gone already (we may have stopped it): nothing left to drop
        pass


async def _drop_topics(settings: Settings) -> None:
    """The experiment's own topics out of Kafka; best effort."""
    try:
        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(**settings.aiokafka_kwargs(), request_timeout_ms=10_000)
        await asyncio.wait_for(admin.start(), 15)
        try:
            await admin.delete_topics([settings.topic_metrics, settings.topic_dlq, settings.topic_scores,
                                       settings.topic_migrations])  # fmt: skip
        finally:
            await admin.close()
    except Exception:  # noqa: BLE001
        pass
