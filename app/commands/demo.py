"""`zhuge demo`: services, simulated fleet, worker and a live view, in one command."""

from __future__ import annotations

from typing import Optional

import typer

from app.context import settings_of


def register(cli: typer.Typer) -> None:
    """Add the ``demo`` command."""

    @cli.command()
    def demo(
        ctx: typer.Context,
        vms: int = typer.Option(500, help="simulated VMs"),
        hosts: int = typer.Option(50, help="simulated hosts"),
        duration: Optional[float] = typer.Option(None, help="stop after this many seconds (default: until Ctrl-C)"),
    ) -> None:
        """Run the whole loop locally: Kafka+Redis (started if none answer), simulator, worker, live top-N view.

        Ctrl-C stops everything the demo started.
        """
        from rich.console import Console

        from app.demo import run_demo

        console = Console()
        n = run_demo(settings_of(ctx), vms=vms, hosts=hosts, duration=duration, console=console)
        console.print(f"{n} VMs had migration-window scores in Redis at the end.")
        if duration is not None and n == 0:
            raise typer.Exit(1)
