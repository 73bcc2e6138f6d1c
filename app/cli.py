"""The ``zhuge`` command line: one Typer app, commands registered by area.

Each module under ``app/commands`` owns the commands of one area and imports
its heavy dependencies inside the command bodies, so ``zhuge --help`` stays fast.
"""

from __future__ import annotations

from typing import Optional

import typer

from app.commands import agent, api, bench, demo, lab, models, produce, query, services, worker
from app.settings import Settings

cli = typer.Typer(
    name="zhuge",
    help="Predict, for every VM of a fleet, when it can be live-migrated with the least downtime.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


@cli.callback()
def _global_options(
    ctx: typer.Context,
    kafka: Optional[str] = typer.Option(None, "--kafka", help="Kafka bootstrap servers [env ZHUGE_KAFKA_BOOTSTRAP]"),
    redis_url: Optional[str] = typer.Option(None, "--redis", help="Redis URL [env ZHUGE_REDIS_URL]"),
    device: Optional[str] = typer.Option(None, "--device", help="auto|cpu|gpu [env ZHUGE_DEVICE]"),
    model_store: Optional[str] = typer.Option(None, "--model-store", help="model store URL [env ZHUGE_MODEL_STORE]"),
    log_level: Optional[str] = typer.Option(None, "--log-level", help="log level [env ZHUGE_LOG_LEVEL]"),
) -> None:
    """Settings come from ZHUGE_* environment variables; these flags override them."""
    try:
        ctx.obj = Settings.from_env(
            kafka_bootstrap=kafka, redis_url=redis_url, device=device, model_store=model_store, log_level=log_level
        )
    except (ValueError, TypeError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    for line in Settings.unknown_env():
        typer.echo(f"warning: {line}", err=True)


for area in (services, produce, worker, query, api, models, bench, demo, lab, agent):
    area.register(cli)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
