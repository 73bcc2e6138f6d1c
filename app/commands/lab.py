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
    plan = labmod.LabPlan(hosts, link_mbit, specs, {s.name: program for s in specs} if program else None, clock)
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
