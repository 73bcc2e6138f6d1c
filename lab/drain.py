"""Drains executed on the lab: a host emptied by a drain plan, or everything-now-at-K, measured.

``run_plan`` runs a plan from ``api.plans.plan_host_drain`` (``zhuge drain --json``):
each VM's migration starts when the LAB clock reaches its ``start``, concurrently
(one asyncio task each, its own incoming port), with QEMU's ``max-bandwidth`` set
to the plan's ``bw_mbps`` (MiB/s) so every migration gets the share the plan
assumed; the host's tc link still caps the total. ``run_all_now`` is what
count-limited tools do (Nova's max_concurrent_live_migrations, KubeVirt's
parallel migrations per node), as ``drain.baselines.all_now`` models it: the VMs
in the given order, K at once from now, each at link/K (link/n with fewer VMs),
the next one starting when one ends.

The plan's resources are enforced, not only its times: a VM that comes due
while the migrations before it still hold K lanes or the link waits until it
fits (never more than the plan's ``max_concurrent`` at once, never more than the
link in shares). How late each VM started against its plan is reported
(``lag_s``, lab seconds).

A compressed lab clock (``--speed 300``) compresses the waiting, but migrations
take wall seconds: undilated, a 10 s migration would last 50 lab minutes while
the plan (and the model) give it 10 s, so the VMs planned after it start late,
a drain overruns its deadline and all-now sees lab hours (and load phases) pass
while it runs. With ``dilate`` (the default) the lab clock runs in real time
(1x) while any migration of the drain is in flight and at its speed between
them: a migration lasts in lab time what it lasts, as the plan assumes, and
only the gaps are compressed. The clock lives in the lab state, so the load
driver and the agent follow it; it is restored when the drain ends, however it ends.

``DrainOutcome``: every VM's measured outcome (``MigrationOutcome.as_dict``) with
its planned start, share and prediction; the total measured downtime (the sum
of the pauses of every migration that completed, forced ones included: their
pause is real), the worst, the makespan (first start to last end, lab and wall
seconds), how many did not converge (forced or aborted) and how many failed.
Each outcome goes to ``vm.migrations`` as ``lab.executor`` does, with the
prediction in force: the plan row's ``downtime_ms`` for plan runs.

The migration function is a parameter (``migrate_fn``) so the scheduling is
tested without QEMU (``tests/unit/test_lab_drain.py``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from lab.migrate import MigrationOutcome, MigrationPolicy, migrate
from lab.state import LabClock, lab_dir, load, updating

log = logging.getLogger(__name__)

BASE_PORT = 4460  # incoming ports BASE_PORT + i, one per VM of a drain (concurrent migrations need distinct ones)
SHARE_TOLERANCE = 1e-6  # shares are link/j floats: a sum of K shares of link/K may exceed the link by rounding

MigrateFn = Callable[..., Awaitable[MigrationOutcome]]
PublishFn = Callable[[list[dict[str, Any]]], Awaitable[None]]
Echo = Callable[[str], None]


REAL_TIME = 1.0 + 1e-9  # a lab clock speed of "1x" that is still a lab clock (LabClock treats exactly 1.0 as wall time)


class Clock(Protocol):
    speed: float

    def now(self) -> float: ...

    def wall_of(self, t: float) -> float: ...


class LiveClock:
    """The lab's clock as its state file says now (a dilated drain re-bases it while it runs)."""

    def __init__(self, state_dir: str, lab: str) -> None:
        self.folder = lab_dir(state_dir, lab)
        if self._clock() is None:
            raise FileNotFoundError(f"no lab {lab!r} under {state_dir}: run `zhuge lab up` first")

    def _clock(self) -> LabClock | None:
        state = load(self.folder)
        return None if state is None else state.clock

    def _current(self) -> LabClock:
        clock = self._clock()
        if clock is None:
            raise FileNotFoundError(f"the lab at {self.folder} is gone")
        return clock

    @property
    def speed(self) -> float:
        return self._current().speed

    def now(self) -> float:
        return self._current().now()

    def wall_of(self, t: float) -> float:
        return self._current().wall_of(t)

    def rebase(self, speed: float) -> None:
        """From now on run at ``speed``, continuing from the lab time it reads now."""
        with updating(self.folder) as st:
            st.clock = LabClock(speed, st.clock.now(), time.time())


class _Dilation:
    """Real time while any migration runs, the clock's own speed between (``rebase``-able clocks only)."""

    def __init__(self, clock: Clock, enabled: bool) -> None:
        self.clock = clock
        self.nominal = float(clock.speed)
        self.enabled = enabled and self.nominal > REAL_TIME and hasattr(clock, "rebase")
        self.running = 0

    def begin(self) -> None:
        if self.enabled and self.running == 0:
            self.clock.rebase(REAL_TIME)  # type: ignore[attr-defined]
        self.running += 1

    def end(self) -> None:
        self.running -= 1
        if self.enabled and self.running == 0:
            self.clock.rebase(self.nominal)  # type: ignore[attr-defined]

    def restore(self) -> None:
        if self.enabled and self.running > 0:
            self.running = 0
            self.clock.rebase(self.nominal)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class DrainStep:
    """One migration of a drain: when (lab clock; None = as soon as it fits), at what share, predicted what."""

    vm: str
    order: int
    start: float | None
    bw_mbps: float
    prediction: dict[str, Any] | None = None  # the vm.migrations prediction fields


@dataclass
class DrainOutcome:
    """What a drain measured, per VM and in total (times: lab clock, epoch s)."""

    strategy: str  # plan | all-now
    lab: str
    max_concurrent: int
    link_mbps: float
    t_begin: float  # lab time the run began (plan: its t0, all-now: the instant it started)
    rows: list[dict[str, Any]] = field(default_factory=list)  # per VM, in start order
    unplaced: list[dict[str, Any]] = field(default_factory=list)  # plan: VMs it could not place (not migrated)
    published: int = 0
    publish_error: str | None = None
    speed: float = 1.0  # the lab clock's speed between migrations
    dilated: bool = False  # the clock ran in real time while migrations ran

    @property
    def completed(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r.get("status") == "completed" and r.get("downtime_ms") is not None]

    @property
    def total_downtime_ms(self) -> float:
        """Sum of the measured pauses of every migration that completed (forced ones included)."""
        return float(sum(r["downtime_ms"] for r in self.completed))

    @property
    def worst_downtime_ms(self) -> float:
        return float(max((r["downtime_ms"] for r in self.completed), default=0.0))

    @property
    def converged_downtime_ms(self) -> float:
        """Sum of the pauses of the migrations that converged within the downtime limit."""
        return float(sum(r["downtime_ms"] for r in self.completed if r.get("converged")))

    @property
    def makespan_s(self) -> float:
        """First start to last end, lab seconds."""
        starts = [r["start"] for r in self.rows if r.get("start") is not None]
        ends = [r["end"] for r in self.rows if r.get("end") is not None]
        return float(max(ends) - min(starts)) if starts and ends else 0.0

    @property
    def makespan_wall_s(self) -> float:
        """First migration called to the last one returned, wall seconds (destination QEMU start-up included)."""
        starts = [r["start_wall"] for r in self.rows if r.get("start_wall") is not None]
        ends = [r["end_wall"] for r in self.rows if r.get("end_wall") is not None]
        return float(max(ends) - min(starts)) if starts and ends else 0.0

    @property
    def span_from_begin_s(self) -> float:
        """``t_begin`` to the last end, lab seconds (the plan's own ``makespan_s`` measures from t0)."""
        ends = [r["end"] for r in self.rows if r.get("end") is not None]
        return float(max(ends) - self.t_begin) if ends else 0.0

    def summary(self) -> dict[str, Any]:
        rows = self.rows
        return {
            "strategy": self.strategy,
            "dilated": self.dilated,
            "vms": len(rows),
            "completed": len(self.completed),
            "converged": sum(bool(r.get("converged")) for r in rows),
            "not_converged": sum(not r.get("converged") for r in rows),
            "forced": sum(r.get("status") == "completed" and not r.get("converged") for r in rows),
            "aborted": sum(r.get("status") == "cancelled" for r in rows),
            "failed": sum(r.get("status") not in ("completed", "cancelled") for r in rows),
            "unplaced": len(self.unplaced),
            "total_downtime_ms": round(self.total_downtime_ms, 1),
            "converged_downtime_ms": round(self.converged_downtime_ms, 1),
            "worst_downtime_ms": round(self.worst_downtime_ms, 1),
            "makespan_s": round(self.makespan_s, 1),
            "makespan_wall_s": round(self.makespan_wall_s, 2),
            "span_from_begin_s": round(self.span_from_begin_s, 1),
            "max_lag_s": round(max((r.get("lag_s") or 0.0 for r in rows), default=0.0), 1),
            # the predictions these migrations were run under (plan rows / the all-now baseline), converging ones only
            "predicted_total_downtime_ms": _round(sum(p for p in map(_pred, rows) if math.isfinite(p))),
            "predicted_not_converged": sum(not math.isfinite(_pred(r)) for r in rows),
            "published": self.published,
            "publish_error": self.publish_error,
        }

    def as_dict(self) -> dict[str, Any]:
        return {**self.summary(), "lab": self.lab, "max_concurrent": self.max_concurrent, "link_mbps": self.link_mbps,
                "t_begin": self.t_begin, "speed": self.speed, "rows": self.rows, "unplaced_vms": self.unplaced}  # fmt: skip


def _pred(row: dict[str, Any]) -> float:
    v = row.get("predicted_downtime_ms")
    return float(v) if isinstance(v, (int, float)) else math.nan


def _round(x: float, nd: int = 1) -> float:
    return round(float(x), nd)


# ------------------------------------------------------------------------------ steps from a plan / all-now


def plan_steps(plan: dict[str, Any], model: str | None = None) -> list[DrainStep]:
    """The plan's rows as steps, by start: each with the plan's prediction (downtime, duration; made at t0)."""
    steps = []
    for row in sorted(plan["vms"], key=lambda r: (r["start"], r["order"])):
        prediction = {"predicted_downtime_ms": row.get("downtime_ms"),
                      "predicted_total_ms": None if row.get("duration_s") is None else row["duration_s"] * 1000.0,
                      "predicted_at": plan.get("t0"), "model": model}  # fmt: skip
        steps.append(DrainStep(row["vm"], int(row["order"]), float(row["start"]), float(row["bw_mbps"]), prediction))
    return steps


def all_now_steps(vms: Sequence[str], k: int, link_mbps: float,
                  predictions: dict[str, dict[str, Any]] | None = None) -> list[DrainStep]:  # fmt: skip
    """``vms`` in order, each at link/K (link/n with fewer VMs than K), no start time: as soon as a lane frees."""
    lanes = max(1, min(k, len(vms)))
    return [DrainStep(vm, i, None, link_mbps / lanes, (predictions or {}).get(vm)) for i, vm in enumerate(vms)]


def all_now_predictions(baseline_rows: Sequence[Any], model: str | None = None,
                        at: float | None = None) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Per-VM predictions from ``drain.baselines.all_now(problem).rows`` (a non-converging row: no downtime)."""
    out = {}
    for r in baseline_rows:
        ok = r.converged and math.isfinite(r.downtime_ms)
        out[r.vm] = {"predicted_downtime_ms": r.downtime_ms if ok else None,
                     "predicted_total_ms": r.duration_s * 1000.0 if math.isfinite(r.duration_s) else None,
                     "predicted_at": at, "model": model, "predicted_converged": bool(r.converged)}  # fmt: skip
    return out


# ------------------------------------------------------------------------------ the scheduler


async def execute_steps(
    steps: Sequence[DrainStep], *, k: int, link_mbps: float, clock: Clock, run_one: Callable[[DrainStep, int], Awaitable[dict[str, Any]]],
    echo: Echo = lambda m: None, dilate: bool = False,
) -> list[dict[str, Any]]:  # fmt: skip
    """Start each step in order once it is due (its ``start`` on ``clock``) and fits (fewer than ``k`` running,
    shares within the link); returns the rows ``run_one(step, index)`` gave, in start order.

    Steps keep their order: one that is due but does not fit holds back the ones behind it.
    A step that fits nothing (a share above the link) starts alone. Cancelling this
    cancels every migration it started. ``dilate``: the clock (one with ``rebase``)
    runs in real time while any step runs (module docstring).
    """
    dilation = _Dilation(clock, dilate)
    try:
        return await _schedule(steps, k, link_mbps, clock, run_one, echo, dilation)
    finally:
        dilation.restore()


async def _schedule(steps: Sequence[DrainStep], k: int, link_mbps: float, clock: Clock,
                    run_one: Callable[[DrainStep, int], Awaitable[dict[str, Any]]], echo: Echo,
                    dilation: _Dilation) -> list[dict[str, Any]]:  # fmt: skip
    pending = list(steps)
    running: dict[asyncio.Task, DrainStep] = {}
    started: list[tuple[asyncio.Task, DrainStep]] = []
    index = 0
    try:
        while pending or running:
            while pending:
                head = pending[0]
                due = head.start is None or clock.now() >= head.start
                used = sum(s.bw_mbps for s in running.values())
                fits = not running or (len(running) < k and used + head.bw_mbps <= link_mbps * (1 + SHARE_TOLERANCE))
                if not (due and fits):
                    break
                pending.pop(0)
                dilation.begin()  # before the migration reads the clock: it then lasts in lab time what it lasts
                task = asyncio.create_task(run_one(head, index))
                index += 1
                running[task] = head
                started.append((task, head))
                echo(f"{head.vm}: migrating at {head.bw_mbps:.1f} MiB/s ({len(running)} running)")
            if not running and not pending:
                break
            timeout = None
            head = pending[0] if pending else None
            if head is not None and head.start is not None and clock.now() < head.start:
                timeout = max(0.0, clock.wall_of(head.start) - clock.wall_of(clock.now()))
            if running:
                done, _ = await asyncio.wait(running, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    running.pop(task)
                    dilation.end()
            else:
                await asyncio.sleep(timeout or 0.0)
    except BaseException:
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        raise
    return [task.result() for task, _ in started]


def _runner(state_dir: str, lab: str, to_host: str | None, policy: MigrationPolicy, clock: Clock, migrate_fn: MigrateFn,
            base_port: int, echo: Echo) -> Callable[[DrainStep, int], Awaitable[dict[str, Any]]]:  # fmt: skip
    async def run_one(step: DrainStep, index: int) -> dict[str, Any]:
        began, began_wall = clock.now(), time.time()
        port = base_port + index
        extra = {"order": step.order, "planned_start": step.start, "bw_mbps": round(step.bw_mbps, 3), "port": port,
                 "lag_s": None if step.start is None else round(began - step.start, 1),
                 "predicted_downtime_ms": (step.prediction or {}).get("predicted_downtime_ms"),
                 "predicted_total_ms": (step.prediction or {}).get("predicted_total_ms")}  # fmt: skip
        try:
            outcome = await migrate_fn(state_dir, lab, step.vm, to_host, policy, port=port,
                                       max_bandwidth_mbps=step.bw_mbps)  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - one migration that cannot run is an outcome of the drain
            log.warning("%s: migration failed: %s", step.vm, exc)
            echo(f"{step.vm}: FAILED: {exc}")
            return {"vm": step.vm, "status": "failed", "converged": False, "start": began, "end": clock.now(),
                    "downtime_ms": None, "error": str(exc)[-500:], **extra, "start_wall": began_wall,
                    "end_wall": time.time(), "_outcome": None}  # fmt: skip
        pause = f"{outcome.downtime_ms:.0f} ms" if outcome.downtime_ms is not None else "none"
        echo(f"{step.vm}: {outcome.status}, converged {outcome.converged}, pause {pause}, "
             f"total {outcome.total_ms / 1000:.1f} s")  # fmt: skip
        return {**outcome.as_dict(), **extra, "start_wall": began_wall, "end_wall": time.time(), "_outcome": outcome}

    return run_one


async def _finish(result: DrainOutcome, rows: list[dict[str, Any]], steps: Sequence[DrainStep],
                  publish: PublishFn | None) -> DrainOutcome:  # fmt: skip
    predictions = {s.vm: s.prediction for s in steps}
    messages = []
    for row in rows:
        outcome = row.pop("_outcome", None)
        result.rows.append(row)
        if isinstance(outcome, MigrationOutcome):
            msg = outcome.message({k: v for k, v in (predictions.get(row["vm"]) or {}).items()
                                   if k in ("predicted_downtime_ms", "predicted_total_ms", "predicted_at", "model")})  # fmt: skip
            msg["policy"] = f"drain-{result.strategy}:{outcome.policy}"[:64]
            messages.append(msg)
    if publish is not None and messages:
        try:
            await publish(messages)
            result.published = len(messages)
        except Exception as exc:  # noqa: BLE001 - the measurements stand; say what did not reach Kafka
            result.publish_error = str(exc)[-300:]
    return result


async def run_plan(
    state_dir: str, lab: str, plan_json: dict[str, Any], to_host: str | None, policy: MigrationPolicy, *,
    migrate_fn: MigrateFn = migrate, publish: PublishFn | None = None, clock: Clock | None = None,
    base_port: int = BASE_PORT, model: str | None = None, echo: Echo = lambda m: None, dilate: bool = True,
) -> DrainOutcome:  # fmt: skip
    """Execute ``plan_json`` on the lab: each VM at its ``start`` (lab clock) and ``bw_mbps``, within the plan's K and link."""
    clock = clock or LiveClock(state_dir, lab)
    steps = plan_steps(plan_json, model)
    k, link = int(plan_json["max_concurrent"]), float(plan_json["link_mbps"])
    speed = float(clock.speed)
    result = DrainOutcome("plan", lab, k, link, float(plan_json["t0"]), unplaced=list(plan_json.get("unplaced", [])),
                          speed=speed, dilated=dilate and _Dilation(clock, True).enabled)  # fmt: skip
    rows = await execute_steps(steps, k=k, link_mbps=link, clock=clock, echo=echo, dilate=dilate,
                               run_one=_runner(state_dir, lab, to_host, policy, clock, migrate_fn, base_port, echo))  # fmt: skip
    return await _finish(result, rows, steps, publish)


async def run_all_now(
    state_dir: str, lab: str, vms: Sequence[str], to_host: str | None, k: int, policy: MigrationPolicy, *,
    link_mbps: float | None = None, predictions: dict[str, dict[str, Any]] | None = None, at: float | None = None,
    migrate_fn: MigrateFn = migrate, publish: PublishFn | None = None, clock: Clock | None = None,
    base_port: int = BASE_PORT, echo: Echo = lambda m: None, dilate: bool = True,
) -> DrainOutcome:  # fmt: skip
    """``vms`` in order, ``k`` at once from now (or from lab time ``at``), each at link/K; the next when one ends.

    ``link_mbps``: the source host's link in MiB/s (default: read from the lab state).
    """
    clock = clock or LiveClock(state_dir, lab)
    if link_mbps is None:
        link_mbps = _source_link(state_dir, lab, vms)
    if at is not None and clock.now() < at:
        await asyncio.sleep(max(0.0, clock.wall_of(at) - clock.wall_of(clock.now())))
    steps = all_now_steps(vms, k, link_mbps, predictions)
    result = DrainOutcome("all-now", lab, k, link_mbps, clock.now(), speed=float(clock.speed),
                          dilated=dilate and _Dilation(clock, True).enabled)  # fmt: skip
    rows = await execute_steps(steps, k=k, link_mbps=link_mbps, clock=clock, echo=echo, dilate=dilate,
                               run_one=_runner(state_dir, lab, to_host, policy, clock, migrate_fn, base_port, echo))  # fmt: skip
    return await _finish(result, rows, steps, publish)


def _source_link(state_dir: str, lab: str, vms: Sequence[str]) -> float:
    state = load(lab_dir(state_dir, lab))
    if state is None:
        raise FileNotFoundError(f"no lab {lab!r} under {state_dir}: run `zhuge lab up` first")
    hosts = {state.guests[vm].process.host for vm in vms if vm in state.guests}
    if not hosts:
        raise ValueError(f"none of {list(vms)} is a guest of lab {lab!r}")
    return min(state.hosts[h].link_mib_s for h in hosts)


def host_guests(state_dir: str, lab: str, host: str) -> list[str]:
    """The guests running on ``host`` now, by name (the order all-now takes them in, as the planner's baseline)."""
    state = load(lab_dir(state_dir, lab))
    if state is None:
        raise FileNotFoundError(f"no lab {lab!r} under {state_dir}: run `zhuge lab up` first")
    if host not in state.hosts:
        raise ValueError(f"no host {host!r} in lab {lab!r} (hosts: {', '.join(sorted(state.hosts))})")
    return sorted(g for g, st in state.guests.items() if st.process.host == host)

# ------------------------------------------------------------------------------ planning on the lab clock (Redis)


class LabPlan(NamedTuple):
    plan: dict[str, Any]  # the plan's JSON (api.plans.plan_host_drain)
    all_now: dict[str, dict[str, Any]]  # per VM: the all-now baseline's prediction from the same curves
    model: str | None  # the model that scored the VMs
    dirty_hourly: dict[str, list[float]]  # per VM: the dirty rate (MiB/s) the plan used, every hour from t0


async def plan_in_lab(
    settings: Any, lab: str, host: str, deadline_s: float, k: int, time_limit_s: float | None = None,
    lead_wall_s: float | None = None,
) -> LabPlan:  # fmt: skip
    """Plan the drain of lab host ``host`` from the worker's curves in Redis (``api.plans.plan_host_drain``).

    The plan's t0 is on the lab clock (the agent stamps samples with it), ``lead_wall_s``
    (default: the solver's time limit + 3 s) ahead of now, so that no start has passed by
    the time the plan is ready; its link is the lab host's. Returns the plan, the
    all-now baseline's per-VM predictions from the same curves (``drain.baselines.all_now``),
    the model that scored them and the forecast the plan was made on.
    """
    from api.plans import build_problem, plan_host_drain, unusable
    from api.reads import ScoreReads
    from drain.baselines import all_now

    state = load(lab_dir(settings.state_dir, lab))
    if state is None:
        raise FileNotFoundError(f"no lab {lab!r} under {settings.state_dir}: run `zhuge lab up` first")
    if host not in state.hosts:
        raise ValueError(f"no host {host!r} in lab {lab!r} (hosts: {', '.join(sorted(state.hosts))})")
    planning = settings.replace(link_mbps=state.hosts[host].link_mib_s)
    limit = float(planning.drain_time_limit_s if time_limit_s is None else time_limit_s)
    lead = (limit + 3.0) if lead_wall_s is None else lead_wall_s
    now = state.clock.now() + lead * (state.clock.speed if state.clock.speed > 1 else 1.0)

    class Recording(ScoreReads):
        seen: tuple[list[dict[str, Any]], dict[str, Any]] = ([], {})

        async def host_curves(self, h: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
            self.seen = await super().host_curves(h)
            return self.seen

    from redis.exceptions import RedisError

    client = planning.redis_client()
    try:
        reads = Recording(client, planning.redis_prefix)
        plan = await plan_host_drain(reads, planning, host, deadline_s, k, limit, now=now)
    except (RedisError, OSError) as exc:
        raise RuntimeError(f"cannot read the scores from Redis at {planning.redis_address}: {exc}") from exc
    finally:
        await client.aclose()
    rows, curves = reads.seen
    curves = {vm: c for vm, c in curves.items() if vm not in unusable(curves)}  # as the plan did
    models = [r.get("model") for r in rows if r.get("model")]
    model = max(set(models), key=models.count) if models else None
    problem = build_problem(host, curves, planning, now, deadline_s, k) if curves else None
    baseline = all_now(problem) if problem is not None else None
    every = max(1, round(3600 / problem.slot_s)) if problem is not None else 1
    hourly = {v.vm: [round(float(x), 1) for x in v.dirty_mbps[::every]] for v in (problem.vms if problem else [])}
    return LabPlan(plan, all_now_predictions(baseline.rows if baseline else [], model, now), model, hourly)


async def all_now_in_lab(settings: Any, lab: str, host: str, k: int, horizon_s: float = 6 * 3600.0,
                         ) -> tuple[dict[str, dict[str, Any]], str | None]:  # fmt: skip
    """The all-now baseline's per-VM predictions (and the scoring model) from the worker's curves in Redis,
    starting now on the lab clock; ({}, None) when Redis or the curves are not there (nothing to predict with)."""
    from api.plans import PlanRefused, build_problem, unusable
    from api.reads import ScoreReads
    from drain.baselines import all_now

    state = load(lab_dir(settings.state_dir, lab))
    if state is None or host not in state.hosts:
        return {}, None
    planning = settings.replace(link_mbps=state.hosts[host].link_mib_s)
    client = planning.redis_client()
    try:
        rows, curves = await ScoreReads(client, planning.redis_prefix).host_curves(host)
    except Exception:  # noqa: BLE001 - no Redis: the drain runs without predictions
        return {}, None
    finally:
        await client.aclose()
    curves = {vm: c for vm, c in curves.items() if vm not in unusable(curves)}
    if not curves:
        return {}, None
    now = state.clock.now()
    try:
        baseline = all_now(build_problem(host, curves, planning, now, horizon_s, k))
    except (PlanRefused, ValueError):
        return {}, None
    models = [r.get("model") for r in rows if r.get("model")]
    model = max(set(models), key=models.count) if models else None
    return all_now_predictions(baseline.rows, model, now), model
