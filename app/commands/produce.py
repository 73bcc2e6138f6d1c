"""`zhuge simulate` and `zhuge replay`: feed ``vm.metrics`` from a synthetic fleet or a real trace."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone
from typing import Optional

import typer

from app.context import settings_of


def parse_when(text: str) -> float:
    """Epoch seconds from ``1704067200`` or an ISO date/time (UTC when no zone is given)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(text)
    except ValueError as exc:
        raise typer.BadParameter(f"{text!r} is neither epoch seconds nor an ISO date") from exc
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def parse_duration(text: str) -> float:
    """Seconds from ``3600``, ``90s``, ``30m``, ``6h`` or ``2d``."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    t = text.strip().lower()
    try:
        if t and t[-1] in units:
            return float(t[:-1]) * units[t[-1]]
        return float(t)
    except ValueError as exc:
        raise typer.BadParameter(f"bad duration {text!r}: use e.g. 3600, 30m, 6h, 2d") from exc


def _run(coro_factory, live_line) -> object:  # noqa: ANN001
    """Run the coroutine under a rich live line; Ctrl-C cancels it cleanly (producer flushed).

    Warnings (the broker away: "... sending them again") print above the live line, each kind of
    client error once per 30 s (``app.logs.quiet_repeats``), so an outage shows and scrolls slowly.
    """
    import logging

    from rich.console import Console
    from rich.live import Live
    from rich.logging import RichHandler

    from app.logs import quiet_repeats

    console = Console(stderr=True)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s",
                        handlers=[RichHandler(console=console, show_path=False)])  # fmt: skip
    quiet_repeats()
    last: list[object] = [None]

    def show(p: object) -> None:
        last[0] = p
        live.update(live_line(p))

    with Live(console=console, refresh_per_second=4, transient=True) as live:
        try:
            return asyncio.run(coro_factory(show))
        except KeyboardInterrupt:
            console.print("[yellow]interrupted: stopped after flushing what was queued[/]")
            return last[0]  # the totals so far, for the summary


def register(cli: typer.Typer) -> None:
    """Add this area's commands to the CLI."""

    @cli.command()
    def simulate(
        ctx: typer.Context,
        vms: int = typer.Option(1000, "--vms", min=1, help="number of VMs"),
        hosts: int = typer.Option(50, "--hosts", min=1, help="number of hosts"),
        period: float = typer.Option(300.0, "--period", min=1.0, help="seconds between samples of a VM"),
        realtime: bool = typer.Option(False, "--realtime/--fast", help="sleep between periods, or as fast as possible"),
        start: Optional[str] = typer.Option(None, "--start", help="first timestamp (ISO or epoch); --fast default: now - duration"),
        duration: Optional[str] = typer.Option(None, "--duration", help="how long to simulate (e.g. 2d, 6h); default 1 day"),
        steps: Optional[int] = typer.Option(None, "--steps", min=1, help="number of periods (instead of --duration)"),
        batched: bool = typer.Option(True, "--batched/--per-vm", help="one JSON array per host and period, or one message per VM"),
        seed: int = typer.Option(0, "--seed", help="random seed of the fleet"),
        topic: Optional[str] = typer.Option(None, "--topic", help="target topic [default: settings.topic_metrics]"),
    ) -> None:
        """Produce a synthetic fleet's metrics to Kafka."""
        import time

        from sim.produce import simulate as run_sim

        settings = settings_of(ctx)
        if steps is not None and duration is not None:
            raise typer.BadParameter("give --duration or --steps, not both")
        span = parse_duration(duration) if duration is not None else (None if realtime and steps is None else 86400.0)
        n_steps = steps if steps is not None else (None if span is None else max(1, int(span // period)))
        if start is not None:
            start_ts = parse_when(start)
        elif realtime:
            start_ts = time.time()
        else:
            start_ts = time.time() - (n_steps or 1) * period
        start_ts = start_ts - start_ts % period  # align periods to slot boundaries
        topic_name = topic or settings.topic_metrics

        def line(p):  # noqa: ANN001, ANN202
            mps, sps = p.rates()
            total = "" if n_steps is None else f"/{n_steps}"
            return f"simulate -> {topic_name}: period {p.periods}{total}  {p.messages:,} msgs  {mps:,.0f} msg/s  {sps:,.0f} samples/s"

        prog = _run(lambda cb: run_sim(settings, n_vms=vms, n_hosts=hosts, start_ts=start_ts, n_steps=n_steps,
                                       period_s=period, realtime=realtime, batched=batched, seed=seed,
                                       topic=topic_name, on_progress=cb), line)
        if prog is not None:
            mps, sps = prog.rates()
            typer.echo(f"sent {prog.samples:,} samples in {prog.messages:,} messages ({prog.periods} periods) "
                       f"to {topic_name}: {mps:,.0f} msg/s, {sps:,.0f} samples/s")

    @cli.command()
    def replay(
        ctx: typer.Context,
        path: str = typer.Argument(..., help="trace file or folder (e.g. ../shared/data/bitbrains-rnd-2013-08)"),
        fmt: str = typer.Option(..., "--format", help="bitbrains | azure | planetlab"),
        vms: Optional[str] = typer.Option(None, "--vms", help="VM subset, e.g. 1-5,9 (Bitbrains file numbers, else 1-based indices)"),
        start: Optional[str] = typer.Option(None, "--start", help="anchor of Azure/PlanetLab step 0 (ISO or epoch) [default 2024-01-01Z]"),
        speed: float = typer.Option(0.0, "--speed", min=0.0, help="trace seconds per wall second; 0 = as fast as possible"),
        fast: bool = typer.Option(False, "--fast", help="as fast as possible (same as --speed 0)"),
        batched: bool = typer.Option(False, "--batched/--per-vm", help="one JSON array per (pseudo) host and step, or one message per row"),
        topic: Optional[str] = typer.Option(None, "--topic", help="target topic [default: settings.topic_metrics]"),
    ) -> None:
        """Replay a real trace (Bitbrains, Azure, PlanetLab) into Kafka, rows in time order."""
        from sim.replay import replay as run_replay
        from sim.traces import DEFAULT_START_TS, FORMATS

        if fmt not in FORMATS:
            raise typer.BadParameter(f"--format must be one of {', '.join(FORMATS)}")
        settings = settings_of(ctx)
        start_ts = parse_when(start) if start is not None else DEFAULT_START_TS
        topic_name = topic or settings.topic_metrics

        def line(s):  # noqa: ANN001, ANN202
            mps, rps = s.rates()
            return f"replay {fmt} -> {topic_name}: {s.rows_sent:,}/{s.rows_read:,} rows  {mps:,.0f} msg/s  {rps:,.0f} rows/s"

        try:
            stats = _run(lambda cb: run_replay(settings, fmt, path, vms=vms, start_ts=start_ts,
                                               speed=0.0 if fast else speed, batched=batched, topic=topic_name,
                                               on_progress=cb), line)
        except (FileNotFoundError, ValueError) as exc:
            raise typer.BadParameter(str(exc)) from exc
        if stats is not None:
            mps, rps = stats.rates()
            dropped = ", ".join(f"{v:,} {k}" for k, v in stats.dropped.items()) or "none"
            typer.echo(f"replayed {stats.vms} VMs: {stats.rows_sent:,} of {stats.rows_read:,} rows sent in "
                       f"{stats.messages:,} messages ({rps:,.0f} rows/s); dropped: {dropped}")
