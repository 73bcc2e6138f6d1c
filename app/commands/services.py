"""`zhuge services up|down|status`: local Kafka (KRaft) and Redis for development and tests."""

from __future__ import annotations

from typing import Optional

import typer

from app.context import settings_of


def register(cli: typer.Typer) -> None:
    """Add the `services` sub-app to the CLI."""
    app = typer.Typer(help="Local Kafka (KRaft, jars from Maven Central) and Redis on the configured ports.")

    @app.command("up")
    def up(
        ctx: typer.Context,
        names: Optional[list[str]] = typer.Argument(None, help="kafka and/or redis (default: both)"),
        timeout: float = typer.Option(90.0, help="seconds to wait until the services answer"),
    ) -> None:
        """Start Kafka and Redis (or only the named ones) unless already running, then wait until they answer."""
        from app import services

        settings = settings_of(ctx)
        try:
            states = services.up(settings, echo=typer.echo, timeout_s=timeout, only=names)
        except services.ServiceError as exc:
            typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
            raise typer.Exit(1) from exc
        _print(states)

    @app.command("down")
    def down(
        ctx: typer.Context,
        names: Optional[list[str]] = typer.Argument(None, help="kafka and/or redis (default: both)"),
        kill: bool = typer.Option(False, "--kill", help="SIGKILL at once (simulates a crash) instead of a clean stop"),
    ) -> None:
        """Stop the Kafka and Redis processes (or only the named ones) that `up` started for these addresses."""
        from app import services

        try:
            services.down(settings_of(ctx), echo=typer.echo, only=names, kill=kill)
        except services.ServiceError as exc:
            typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
            raise typer.Exit(1) from exc

    @app.command("status")
    def status(ctx: typer.Context) -> None:
        """Show each service: running (started by zhuge), foreign (port held by another process) or stopped.

        A listening service is also asked for a round trip with the configured security settings
        (TLS, SASL, password), so a stack started with other ones shows as "does NOT answer".
        """
        from app import services

        try:
            _print(services.status(settings_of(ctx), probe=True))
        except services.ServiceError as exc:
            typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
            raise typer.Exit(1) from exc

    cli.add_typer(app, name="services")


def _print(states: list) -> None:  # list[ServiceStatus]; typed loosely to keep imports lazy
    for st in states:
        pid = f"pid {st.pid}" if st.pid else "-"
        typer.echo(f"{st.name:<6} {st.state:<8} {st.address:<22} {pid:<11} {st.detail}".rstrip())
