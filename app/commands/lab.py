"""`zhuge lab ...`: emulated hosts with QEMU guests, real live migrations, calibration of the downtime model."""

from __future__ import annotations

import json
from typing import Optional

import typer

from app.context import settings_of

lab_app = typer.Typer(help="A QEMU lab on this machine: emulated hosts, guests, real live migrations.", no_args_is_help=True)
NAME = typer.Option("default", "--name", help="lab name (several labs can run side by side)")


def _fail(message: str) -> typer.Exit:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(1)


@lab_app.command("up")
def up(
    ctx: typer.Context,
    name: str = NAME,
    hosts: int = typer.Option(2, min=2, help="emulated hosts"),
    link_mbit: float = typer.Option(256.0, "--link-mbit", min=1.0, help="each host's migration link, Mbit/s"),
    guests: int = typer.Option(2, min=1, help="guests, placed round-robin on the hosts"),
    ram: int = typer.Option(512, help="guest RAM, MB"),
    mem: int = typer.Option(128, help="memory the guest workload keeps resident, MB"),
    wss: int = typer.Option(64, help="writable working set of the workload, MB"),
    rate: float = typer.Option(0.0, help="dirty rate of the workload, MiB/s (constant load)"),
    load: Optional[str] = typer.Option(None, help="load program: square[:busy,quiet] or trace:bitbrains:<vm>[:max_rate] (PATH in ZHUGE_LAB_TRACES)"),
    speed: float = typer.Option(1.0, min=1.0, help="lab clock speed: >1 compresses time (e.g. 300: a 5-minute slot per second)"),
    start_days_ago: float = typer.Option(2.0, help="with --speed > 1: where the lab clock starts, days before now"),
    on: Optional[str] = typer.Option(None, "--on", help="boot every guest on this host (h1, ...) instead of round-robin, e.g. to drain it"),
) -> None:
    """Create the hosts (network namespaces, tc-shaped links) and boot the guests."""
    import time

    from lab import lab as labmod
    from lab.qemu import GuestSpec
    from lab.state import LabClock

    settings = settings_of(ctx)
    specs = [GuestSpec(f"vm{i}", ram_mb=ram, mem_mb=mem, wss_mb=wss, rate_mbps=rate) for i in range(1, guests + 1)]
    program = _load_program(load, rate) if load else None
    clock = LabClock(speed, time.time() - start_days_ago * 86400, time.time()) if speed > 1 else None
    plan = labmod.LabPlan(hosts, link_mbit, specs, {s.name: program for s in specs} if program else None, clock,
                          {s.name: on for s in specs} if on else None)  # fmt: skip
    try:
        labmod.up(settings.state_dir, name, plan, echo=typer.echo)
    except (labmod.LabError, OSError) as exc:
        raise _fail(str(exc)) from exc


def _load_program(text: str, rate: float) -> dict:
    import os

    kind, _, rest = text.partition(":")
    if kind == "square":
        busy, _, quiet = rest.partition(",")
        return {"kind": "square", "busy_rate": float(busy or 40), "quiet_rate": float(quiet or 2)}
    if kind == "trace":
        fmt, _, more = rest.partition(":")
        vm, _, max_rate = more.partition(":")
        path = os.environ.get("ZHUGE_LAB_TRACES", f"../shared/data/{'bitbrains-rnd-2013-08' if fmt == 'bitbrains' else fmt}")
        return {"kind": "trace", "format": fmt, "path": path, "vm": vm or "1", "max_rate": float(max_rate or 60)}
    raise typer.BadParameter(f"unknown load {text!r}: square[:busy,quiet] or trace:<format>:<vm>[:max_rate]", param_hint="--load")


@lab_app.command("image")
def image() -> None:
    """Build (or find in the cache) the guest image: Debian's kernel + busybox + the workload, compiled here."""
    from lab.image import ImageError, build_image

    try:
        img = build_image()
    except ImageError as exc:
        raise _fail(str(exc)) from exc
    typer.echo(f"kernel {img.kernel}\ninitrd {img.initrd}")


@lab_app.command("down")
def down(ctx: typer.Context, name: str = NAME) -> None:
    """Stop every guest and the load driver, remove the lab's namespaces."""
    from lab import lab as labmod

    labmod.down(settings_of(ctx).state_dir, name, echo=typer.echo)


@lab_app.command("status")
def status(ctx: typer.Context, name: str = NAME, as_json: bool = typer.Option(False, "--json")) -> None:
    """Hosts, guests (where each runs), the load driver."""
    from lab import lab as labmod

    st = labmod.status(settings_of(ctx).state_dir, name)
    if as_json:
        typer.echo(json.dumps(st, indent=2))
        return
    if not st["up"]:
        typer.echo(f"lab {name}: down")
        raise typer.Exit(1)
    typer.echo(f"lab {name}: up ({st['accel']}), load driver {'running' if st['driver'] else 'off'}")
    for h, info in st["hosts"].items():
        typer.echo(f"  host {h}  {info['address']:<15} link {info['link_mbit']:g} Mbit/s")
    for g, info in st["guests"].items():
        alive = "running" if info["alive"] else "NOT RUNNING"
        typer.echo(f"  guest {g} on {info['host']} pid {info['pid']} {alive}: RAM {info['ram_mb']} MB, "
                   f"workload {info['mem_mb']} MB, working set {info['wss_mb']} MB, load {info['load']}")  # fmt: skip


@lab_app.command("set")
def set_load(
    ctx: typer.Context,
    vm: str = typer.Argument(..., help="guest name"),
    name: str = NAME,
    rate: Optional[float] = typer.Option(None, help="dirty rate, MiB/s"),
    wss: Optional[int] = typer.Option(None, help="writable working set, MB"),
    cpu: Optional[float] = typer.Option(None, help="extra CPU share, %"),
) -> None:
    """Change a guest's workload now (a guest with a load program gets it back at the next driver tick)."""
    import asyncio

    from lab import workload
    from lab.state import lab_dir, load

    st = load(lab_dir(settings_of(ctx).state_dir, name))
    if st is None or vm not in st.guests:
        raise _fail(f"no guest {vm!r} in lab {name!r}")
    stat = asyncio.run(workload.send(st.guests[vm].process.ctl_path, rate=rate, wss=wss, cpu=cpu))
    typer.echo(f"{vm}: dirty rate {stat.target:g} MiB/s, working set {stat.wss} MB, cpu {stat.cpu:g} %")


@lab_app.command("drive", hidden=True)
def drive(ctx: typer.Context, name: str = NAME) -> None:
    """Play the guests' load programs (started in the background by `lab up`)."""
    from lab import lab as labmod

    labmod.run_driver(settings_of(ctx).state_dir, name)


@lab_app.command("migrate")
def migrate_cmd(
    ctx: typer.Context,
    vm: str = typer.Argument(..., help="guest name"),
    name: str = NAME,
    to: Optional[str] = typer.Option(None, "--to", help="destination host (default: the next one)"),
    at: str = typer.Option("now", "--at", help="now, recommended (the window zhuge publishes for it) or an ISO time (lab clock)"),
    limit_ms: float = typer.Option(300.0, "--limit-ms", help="QEMU downtime-limit, ms"),
    timeout: float = typer.Option(60.0, help="completion timeout of the management layer, s"),
    on_timeout: str = typer.Option("abort", help="abort (cancel: the guest stays) or force (raise the limit)"),
    publish: bool = typer.Option(True, help="publish the outcome to vm.migrations (with the prediction in force)"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Live-migrate a guest to another lab host and report what QEMU measured."""
    import asyncio

    from lab.executor import MigrationRequest, execute

    settings = settings_of(ctx)
    try:
        req = MigrationRequest(vm=vm, lab=name, to_host=to, at=at, limit_ms=limit_ms, timeout_s=timeout,
                               on_timeout=on_timeout, publish=publish)  # fmt: skip
        outcome, message = asyncio.run(execute(settings, req, echo=lambda m: typer.echo(m, err=True)))
    except (ValueError, RuntimeError, FileNotFoundError) as exc:
        raise _fail(str(exc)) from exc
    if as_json:
        typer.echo(json.dumps(message))
        return
    o = outcome
    pause = f"{o.downtime_ms:.0f} ms" if o.downtime_ms is not None else "none (not migrated)"
    typer.echo(f"{vm}: {o.status} {o.host_from} -> {o.host_to if o.status == 'completed' else o.host_from}, "
               f"total {o.total_ms / 1000:.1f} s, pause {pause}, {o.dirty_syncs} dirty syncs, "
               f"{o.transferred_bytes / 2**20:.0f} MiB sent, converged: {o.converged}")  # fmt: skip


@lab_app.command("drain")
def drain_cmd(
    ctx: typer.Context,
    host: str = typer.Argument(..., help="the lab host to empty (h1, h2, ...)"),
    name: str = NAME,
    strategy: str = typer.Option("plan", "--strategy", help="plan (zhuge's drain plan from Redis) or all-now (K at once, link/K each)"),
    k: Optional[int] = typer.Option(None, "-k", "--max-concurrent", min=1, max=16, help="migrations at once [env ZHUGE_DRAIN_MAX_CONCURRENT]"),
    deadline: str = typer.Option("6h", "--deadline", help="plan: every migration ends within this, lab time (6h, 90m, 3600)"),
    to: Optional[str] = typer.Option(None, "--to", help="destination host (default: the next one)"),
    limit_ms: Optional[float] = typer.Option(None, "--limit-ms", help="QEMU downtime-limit, ms [env ZHUGE_DOWNTIME_TARGET_MS: the model's]"),
    timeout: Optional[float] = typer.Option(None, help="completion timeout of the management layer, s (wall) [env ZHUGE_MIGRATION_TIMEOUT_S: the model's]"),
    on_timeout: Optional[str] = typer.Option(None, help="abort or force [env ZHUGE_MIGRATION_ON_TIMEOUT: the model's]"),
    time_limit: Optional[float] = typer.Option(None, "--time-limit", help="plan: solver seconds [env ZHUGE_DRAIN_TIME_LIMIT_S]"),
    publish: bool = typer.Option(True, help="publish each outcome to vm.migrations (with the prediction it ran under)"),
    dilate: bool = typer.Option(True, help="a compressed lab clock runs in real time while migrations run (lab/drain.py)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object: the plan (if any) and the measured outcome"),
) -> None:
    """Empty a lab host for real: by zhuge's drain plan (starts on the lab clock, shares via max-bandwidth) or all now at K."""
    import asyncio

    from app.commands.api import _duration_s
    from lab import drain
    from lab.executor import publish as publish_migrations
    from lab.migrate import MigrationPolicy

    settings = settings_of(ctx)
    if strategy not in ("plan", "all-now"):
        raise typer.BadParameter(f"{strategy!r}: plan or all-now", param_hint="--strategy")
    k = k or settings.drain_max_concurrent
    echo = (lambda m: typer.echo(m, err=True))  # noqa: E731
    try:
        policy = MigrationPolicy(downtime_limit_ms=limit_ms or settings.downtime_target_ms, timeout_s=timeout or settings.migration_timeout_s,
                                 on_timeout=on_timeout or settings.migration_on_timeout)  # fmt: skip
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc

    async def pub(messages: list) -> None:  # type: ignore[type-arg]
        await publish_migrations(settings, messages)

    plan = None
    try:
        if strategy == "plan":  # a refused plan (api.plans.PlanRefused) is a ValueError: reported below
            plan, _, model, _ = asyncio.run(drain.plan_in_lab(settings, name, host, _duration_s(deadline), k, time_limit))
            if not as_json:
                _print_plan(plan)
            outcome = asyncio.run(drain.run_plan(settings.state_dir, name, plan, to, policy, model=model, echo=echo,
                                                 publish=pub if publish else None, dilate=dilate))  # fmt: skip
        else:
            vms = drain.host_guests(settings.state_dir, name, host)
            if not vms:
                raise ValueError(f"no guests on {host} in lab {name!r}")
            predictions, _ = asyncio.run(drain.all_now_in_lab(settings, name, host, k))  # from Redis, when there
            outcome = asyncio.run(drain.run_all_now(settings.state_dir, name, vms, to, k, policy, echo=echo,
                                                    predictions=predictions, publish=pub if publish else None,
                                                    dilate=dilate))  # fmt: skip
    except (ValueError, RuntimeError, FileNotFoundError) as exc:
        raise _fail(str(exc)) from exc
    if as_json:
        typer.echo(json.dumps({"plan": plan, "outcome": outcome.as_dict()}))
        return
    _print_outcome(outcome)


def _utc(ts: Optional[float]) -> str:
    import datetime as dt

    return "-" if ts is None else f"{dt.datetime.fromtimestamp(ts, dt.timezone.utc):%m-%d %H:%M:%S}"


def _print_plan(plan: dict) -> None:  # type: ignore[type-arg]
    typer.echo(f"plan for {plan['host']}: {len(plan['vms'])} VMs, K={plan['max_concurrent']}, link "
               f"{plan['link_mbps']:.1f} MiB/s, t0 {_utc(plan['t0'])}, deadline {_utc(plan['deadline'])} (lab clock, UTC); "
               f"solver {plan['solver']['strategy']} {plan['solver']['status']}")  # fmt: skip
    for row in plan["vms"]:
        typer.echo(f"  {row['order']:>2} {row['vm']:<10} start {_utc(row['start'])}  end {_utc(row['end'])}  "
                   f"{row['bw_mbps']:6.1f} MiB/s  predicted pause {row['downtime_ms']:.0f} ms")  # fmt: skip
    for row in plan["unplaced"]:
        typer.echo(f"  not placed {row['vm']}: {row['reason']}")
    b = plan["baselines"].get("all_now", {})
    typer.echo(f"predicted total downtime {plan['total_downtime_ms']:.0f} ms (all now at K: "
               f"{b.get('total_downtime_ms') or 0:.0f} ms over the converging ones, {b.get('not_converged', 0)} not converging)")  # fmt: skip


def _print_outcome(outcome: object) -> None:
    o = outcome  # lab.drain.DrainOutcome
    for r in o.rows:  # type: ignore[attr-defined]
        pause = "-" if r.get("downtime_ms") is None else f"{r['downtime_ms']:.0f} ms"
        pred = "-" if r.get("predicted_downtime_ms") is None else f"{r['predicted_downtime_ms']:.0f} ms"
        lag = "" if r.get("lag_s") is None else f", {r['lag_s'] / 60:.0f} lab min after its planned start"
        typer.echo(f"  {r['vm']:<10} {r['status']:<9} converged {str(r.get('converged')):<5} pause {pause:>8} "
                   f"(predicted {pred}) at {r['bw_mbps']:.1f} MiB/s, started {_utc(r.get('start'))}{lag}")  # fmt: skip
    s = o.summary()  # type: ignore[attr-defined]
    predicted = "no prediction" if s["predicted_not_converged"] == s["vms"] else (
        f"predicted {s['predicted_total_downtime_ms']:.0f} ms over {s['vms'] - s['predicted_not_converged']} converging")
    span = f"{s['makespan_s'] / 3600:.2f} lab h, " if o.speed > 1 else ""  # type: ignore[attr-defined]
    typer.echo(f"{s['strategy']}: measured total downtime {s['total_downtime_ms']:.0f} ms ({predicted}), worst "
               f"{s['worst_downtime_ms']:.0f} ms, makespan {span}{s['makespan_wall_s']:.1f} s wall, {s['not_converged']} "
               f"not converged ({s['forced']} forced, {s['aborted']} aborted), {s['failed']} failed")  # fmt: skip


@lab_app.command("drain-compare")
def drain_compare(
    ctx: typer.Context,
    guests: int = typer.Option(5, min=4, max=6, help="guests on the drained host (profiles A B C A B A: lab/drain_compare.py)"),
    k: int = typer.Option(2, "-k", "--max-concurrent", min=1, max=16, help="migrations at once, both strategies"),
    deadline: str = typer.Option("8h", "--deadline", help="the plan's deadline, lab time"),
    speed: float = typer.Option(300.0, min=1.0, help="lab clock speed"),
    ram: int = typer.Option(320, help="guest RAM, MB"),
    mem: int = typer.Option(64, help="memory each guest's workload keeps resident, MB"),
    wss: int = typer.Option(48, help="working set each guest's workload writes, MB"),
    timeout: float = typer.Option(15.0, help="completion timeout, s (wall); then forced, in both runs and in the model"),
    time_limit: float = typer.Option(5.0, "--time-limit", help="the planner's solver seconds"),
    workdir: Optional[str] = typer.Option(None, "--workdir", help="logs, models, history (default: a temp dir, removed on success)"),
    keep: bool = typer.Option(False, "--keep", help="keep the temp dir with the logs"),
    dilate: bool = typer.Option(True, help="the lab clock runs in real time while migrations run (lab/drain.py)"),
) -> None:
    """From nothing: a host of 4-6 phase-shifted guests drained twice, by the plan and all-now at K; one JSON object."""
    from app.commands.api import _duration_s
    from lab.drain_compare import run_compare

    try:
        result = run_compare(settings_of(ctx), guests=guests, k=k, deadline_s=_duration_s(deadline), speed=speed,
                             ram_mb=ram, mem_mb=mem, wss_mb=wss, timeout_s=timeout, time_limit_s=time_limit,
                             workdir=workdir, keep=keep, dilate=dilate, echo=lambda m: typer.echo(m, err=True))  # fmt: skip
    except (RuntimeError, ValueError, OSError) as exc:
        raise _fail(str(exc)) from exc
    typer.echo(json.dumps(result))


@lab_app.command("calibrate")
def calibrate(
    ctx: typer.Context,
    quick: bool = typer.Option(False, "--quick", help="6 migrations (CI) instead of the full grid"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object with the figures"),
    out: Optional[str] = typer.Option(None, "--out", help="folder for runs.jsonl, report.md and plots"),
    runs: Optional[str] = typer.Option(None, "--runs", help="score a runs.jsonl from an earlier calibration instead of migrating"),
    timeout: float = typer.Option(45.0, help="completion timeout per migration, s"),
) -> None:
    """Real migrations over a grid, each against the downtime models' predictions from the agent's inputs."""
    from lab.report import calibrate_command

    try:
        result = calibrate_command(settings_of(ctx), quick=quick, out=out, runs=runs, timeout_s=timeout,
                                   echo=lambda m: typer.echo(m, err=True))  # fmt: skip
    except (RuntimeError, FileNotFoundError) as exc:
        raise _fail(str(exc)) from exc
    typer.echo(json.dumps(result) if as_json else result["text"])


def register(cli: typer.Typer) -> None:
    cli.add_typer(lab_app, name="lab")
