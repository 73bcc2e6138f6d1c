"""`zhuge worker`: run one streaming worker of the consumer group."""

from __future__ import annotations

from typing import Optional

import typer

from app.context import settings_of


def register(cli: typer.Typer) -> None:
    """Add the ``worker`` command."""

    @cli.command()
    def worker(
        ctx: typer.Context,
        metrics_port: Optional[int] = typer.Option(None, help="Prometheus /metrics port (0 = pick a free one) [env ZHUGE_METRICS_PORT]"),
        batch_max: Optional[int] = typer.Option(None, help="largest micro-batch, messages [env ZHUGE_BATCH_MAX]"),
        within: Optional[float] = typer.Option(None, help="longest wait to fill a batch, s [env ZHUGE_BATCH_WITHIN_S]"),
        group: Optional[str] = typer.Option(None, help="consumer group [env ZHUGE_CONSUMER_GROUP]"),
    ) -> None:
        """Consume vm.metrics, keep per-VM windows, score migration windows into Redis and vm.scores.

        Several workers with the same group share the topic's partitions. Stop with Ctrl-C
        (windows are snapshotted on shutdown; a kill -9 is recovered from the last snapshot
        plus a replay from Kafka).
        """
        import logging

        from app.worker import run_worker

        settings = settings_of(ctx).replace(
            metrics_port=metrics_port, batch_max=batch_max, batch_within_s=within, consumer_group=group
        )
        logging.basicConfig(
            level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        run_worker(settings)
