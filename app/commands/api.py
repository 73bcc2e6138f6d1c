"""`zhuge api` (the HTTP service and web page) and `zhuge drain HOST` (a drain plan from the command line)."""

from __future__ import annotations

import json
import math
from typing import Optional

import typer

from app.commands.query import _fail, _run, _utc
from app.context import settings_of


def _duration_s(text: str) -> float:
    """'6h', '90m', '45s' or plain seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0}
    try:
        if text and text[-1].lower() in units:
            return float(text[:-1]) * units[text[-1].lower()]
        return float(text)
    except ValueError as exc:
        raise typer.BadParameter(f"{text!r}: expected a duration like 6h, 90m or 3600") from exc


def register(cli: typer.Typer) -> None:
    """Add the ``api`` and ``drain`` commands."""

    @cli.command("api")
    def api_cmd(
        ctx: typer.Context,
        host: Optional[str] = typer.Option(None, "--host", help="listen address [env ZHUGE_API_HOST, default 127.0.0.1]"),
        port: Optional[int] = typer.Option(None, "--port", help="listen port [env ZHUGE_API_PORT, default 8000]"),
        workers: int = typer.Option(1, min=1, help="uvicorn worker processes (the service is stateless)"),
    ) -> None:
        """Serve the scores, downtime curves and drain plans over HTTP (OpenAPI at /docs), and the web page at /."""
        import uvicorn

        from api.service import check_exposure

        settings = settings_of(ctx).replace(api_host=host, api_port=port)
        try:
            check_exposure(settings)
        except ValueError as exc:
            raise _fail(str(exc)) from exc
        typer.echo(f"zhuge api on http://{settings.api_host}:{settings.api_port}/ (Redis {settings.redis_address}, "
                   f"token {'required' if settings.api_token else 'off'})", err=True)  # fmt: skip
        if workers == 1:
            from api.service import create_app

            uvicorn.run(create_app(settings), host=settings.api_host, port=settings.api_port, log_level="warning")
            return
        import os

        # worker processes import the app factory themselves; settings travel as the environment
        os.environ.update({"ZHUGE_API_HOST": settings.api_host, "ZHUGE_API_PORT": str(settings.api_port),
                           "ZHUGE_REDIS_URL": settings.redis_url})  # fmt: skip
        uvicorn.run("api.asgi:app", host=settings.api_host, port=settings.api_port, workers=workers, log_level="warning")

    @cli.command("drain")
    def drain_cmd(
        ctx: typer.Context,
        host: str = typer.Argument(..., help="the host to empty"),
        deadline: str = typer.Option("6h", "--deadline", help="every migration ends within this (6h, 90m, 3600)"),
        max_concurrent: Optional[int] = typer.Option(None, "--max-concurrent", "-k", min=1, max=16,
                                                     help="migrations at once [env ZHUGE_DRAIN_MAX_CONCURRENT]"),
        time_limit: Optional[float] = typer.Option(None, "--time-limit", help="solver seconds [env ZHUGE_DRAIN_TIME_LIMIT_S]"),
        as_json: bool = typer.Option(False, "--json", help="print the plan as JSON (the same as POST /v1/drain)"),
    ) -> None:
        """Plan the drain of HOST from the scores in Redis: order, start times and link shares of its VMs."""
        from rich.console import Console
        from rich.table import Table

        from api.plans import PlanRefused, plan_host_drain
        from api.reads import ScoreReads

        settings = settings_of(ctx)
        k = max_concurrent or settings.drain_max_concurrent
        deadline_s = _duration_s(deadline)
        try:
            with Console(stderr=True).status(f"planning the drain of {host} (K={k}, deadline {deadline})"):
                plan = _run(lambda c: plan_host_drain(ScoreReads(c, settings.redis_prefix), settings, host, deadline_s,
                                                      k, time_limit), settings)  # fmt: skip
        except PlanRefused as exc:
            raise _fail(str(exc)) from exc
        if as_json:
            typer.echo(json.dumps(plan))
            return
        table = Table(title=f"drain {host}: {len(plan['vms'])} VMs, K={k}, by {_utc(plan['deadline'])}")
        for col in ("#", "vm", "start (UTC)", "end (UTC)", "bw MB/s", "downtime ms"):
            table.add_column(col, justify="right" if col in ("#", "bw MB/s", "downtime ms") else "left")
        for row in plan["vms"]:
            table.add_row(str(row["order"]), row["vm"], _utc(row["start"]), _utc(row["end"]), f"{row['bw_mbps']:.0f}",
                          f"{row['downtime_ms']:.1f}")  # fmt: skip
        console = Console()
        console.print(table)
        for row in plan["unplaced"]:
            console.print(f"[yellow]not placed[/yellow] {row['vm']}: {row['reason']}")

        def total(d: dict) -> str:  # type: ignore[type-arg]
            v = d.get("total_downtime_ms")
            return "-" if v is None or not math.isfinite(v) else f"{v:,.1f} ms"

        b = plan["baselines"]
        console.print(f"total predicted downtime {total(plan)} (all now at K: {total(b['all_now'])}, "
                      f"one by one: {total(b['sequential'])}); solver {plan['solver']['strategy']} "
                      f"{plan['solver']['status']} in {plan['solver']['wall_s']:.1f} s; stored at "
                      f"{settings.redis_keys().drain(host)}")  # fmt: skip
