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
        worker_id: Optional[str] = typer.Option(None, "--id", help="static member id in the group [env ZHUGE_WORKER_ID]"),
    ) -> None:
        """Consume vm.metrics, keep per-VM windows, score migration windows into Redis and vm.scores.

        Several workers with the same group share the topic's partitions; a worker restarted
        with the same --id (default: <hostname>-<n>, the lowest slot free on this machine) takes
        its partitions back at once. Start it before or after Kafka, its topics and its
        producers: it waits and creates the topics. Stop with Ctrl-C or SIGTERM (it exits
        within ZHUGE_SHUTDOWN_TIMEOUT_S, windows snapshotted first; a kill -9 is recovered
        from the last snapshot plus a replay from Kafka).
        """
        import logging

        from app.worker import run_worker

        settings = settings_of(ctx).replace(
            metrics_port=metrics_port, batch_max=batch_max, batch_within_s=within, consumer_group=group,
            worker_id=worker_id,
        )
        logging.basicConfig(
            level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        run_worker(settings)
