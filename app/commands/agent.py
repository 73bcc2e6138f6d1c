"""`zhuge agent`: a hypervisor agent publishing its QEMU guests' samples to vm.metrics."""

from __future__ import annotations

from typing import Optional

import typer

from app.context import settings_of


def register(cli: typer.Typer) -> None:
    """Add the ``agent`` command."""

    @cli.command()
    def agent(
        ctx: typer.Context,
        lab: Optional[str] = typer.Option(None, "--lab", help="read the guests of this lab (zhuge lab up), following migrations"),
        qmp: list[str] = typer.Option([], "--qmp", help="a guest to read: NAME=QMP_SOCKET (repeatable; QEMU found by its socket)"),
        host: Optional[str] = typer.Option(None, "--host", help="host name for --qmp guests (default: this machine's)"),
        period: float = typer.Option(5.0, min=1.0, help="seconds between samples"),
        calc: float = typer.Option(1.0, min=1.0, help="dirty-rate window per sample, s"),
        wss_calc: float = typer.Option(6.0, help="working-set window, s (0: never measure it)"),
        wss_every: int = typer.Option(12, help="measure the working set every N samples (0: never)"),
        cycles: Optional[int] = typer.Option(None, help="stop after N samples (default: run until Ctrl-C)"),
    ) -> None:
        """Read each guest over QMP (dirty rate, vCPU time, memory) and publish one message per host to vm.metrics.

        With --lab the guests and their hosts come from the lab state; with --qmp from the sockets given.
        See README "Hypervisor agent" for what is measured how, and the libvirt equivalents.
        """
        import asyncio
        import logging
        import socket
        from pathlib import Path

        from agent.agent import Agent, Target, find_qemu_pid, lab_targets

        settings = settings_of(ctx)
        logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        if (lab is None) == (not qmp):
            raise typer.BadParameter("give either --lab NAME or one or more --qmp NAME=SOCKET")
        if lab is not None:
            def discover():  # noqa: ANN202
                return lab_targets(settings.state_dir, lab)
        else:
            import time

            here = host or socket.gethostname()
            targets = []
            for item in qmp:
                name, _, path = item.partition("=")
                if not name or not path:
                    raise typer.BadParameter(f"--qmp wants NAME=SOCKET, not {item!r}")
                targets.append(Target(name, here, Path(path), find_qemu_pid(Path(path))))

            def discover():  # noqa: ANN202
                return targets, time.time
        runner = Agent(settings, discover, period_s=period, calc_s=calc, wss_calc_s=wss_calc, wss_every=wss_every)
        try:
            asyncio.run(runner.run(cycles=cycles))
        except KeyboardInterrupt:
            pass
        typer.echo(f"agent: {runner.sent} messages sent in {runner.cycles} samples", err=True)
