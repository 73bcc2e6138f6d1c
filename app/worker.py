"""The Faust worker: consumes ``vm.metrics`` in micro-batches and drives the pipeline.

Windows are not kept in a Faust Table (Table writes fail inside ``take`` and cap
out around 4 k msg/s); each worker holds NumPy/CuPy window stores per assigned
partition (``streams.pipeline``) and recovers them from snapshots plus Kafka
replay. Events are taken with ``noack_take`` and acked only after the batch's
sinks succeeded, so Faust commits nothing that was not written.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faust
from aiokafka import AIOKafkaProducer

from app.metrics import WorkerMetrics, start_http_server
from app.settings import Settings
from gpu_kernels.xp import get_xp, resolve_device
from streams.pipeline import Pipeline, Record

log = logging.getLogger("zhuge.worker")


def broker_credentials(settings: Settings) -> Any:
    """Faust credentials for the configured Kafka security protocol (None for PLAINTEXT)."""
    proto = settings.kafka_security_protocol
    if proto == "PLAINTEXT":
        return None
    ssl_context = settings.aiokafka_kwargs().get("ssl_context")
    if proto == "SSL":
        return faust.SSLCredentials(ssl_context)
    return faust.SASLCredentials(
        username=settings.kafka_sasl_username,
        password=settings.kafka_sasl_password,
        mechanism=settings.kafka_sasl_mechanism or "PLAIN",
        ssl_context=ssl_context if proto == "SASL_SSL" else None,
    )


@dataclass
class WorkerRuntime:
    """Everything the agent needs, created on worker start (not at import)."""

    pipeline: Pipeline
    producer: AIOKafkaProducer
    metrics: WorkerMetrics
    watcher: Any
    history: Any
    redis: Any
    metrics_server: Any = None
    correction: Any = None  # streams.migrations.DowntimeCorrection, shared through Redis


def create_app(settings: Settings) -> faust.App:
    """Build the Faust app for these settings; no module-level app, no global state."""
    app = faust.App(
        settings.consumer_group,
        broker=[f"kafka://{b.strip()}" for b in settings.kafka_bootstrap.split(",")],
        broker_credentials=broker_credentials(settings),
        store="memory://",
        datadir=f"{settings.state_dir}/faust/{settings.consumer_group}",
        web_enabled=False,
        topic_partitions=settings.topic_partitions,
        topic_allow_declare=False,
        consumer_auto_offset_reset="earliest",
        broker_commit_every=10_000,
        broker_commit_interval=1.0,
        stream_buffer_maxsize=max(4 * settings.batch_max, 8192),
        broker_max_poll_records=max(settings.batch_max, 500),
        loghandlers=[],
    )
    topic = app.topic(settings.topic_metrics, key_type=bytes, value_type=bytes, value_serializer="raw", key_serializer="raw")
    migrations = app.topic(
        settings.topic_migrations, key_type=bytes, value_type=bytes, value_serializer="raw", key_serializer="raw"
    )
    runtime: dict[str, WorkerRuntime] = {}
    ready = asyncio.Event()

    @app.task
    async def _start() -> None:
        runtime["rt"] = await _start_runtime(settings)
        ready.set()

    @app.on_before_shutdown.connect
    async def _on_shutdown(app: faust.App, **_: Any) -> None:  # noqa: ARG001
        rt = runtime.pop("rt", None)
        if rt is not None:
            await _stop_runtime(rt)

    @app.on_partitions_revoked.connect
    async def _on_revoked(app: faust.App, revoked: set, **_: Any) -> None:  # noqa: ARG001
        rt = runtime.get("rt")
        if rt is not None:
            mine = [tp.partition for tp in revoked if tp.topic == settings.topic_metrics]
            await rt.pipeline.snapshot_all()
            rt.pipeline.release(mine)

    @app.agent(topic, name="score-vms")
    async def score_vms(stream: faust.StreamT) -> None:
        await ready.wait()
        async for events in stream.noack_take(settings.batch_max, within=settings.batch_within_s):
            rt = runtime["rt"]
            _maybe_reload(rt)
            records = [
                Record(e.message.partition, e.message.offset, e.message.key, e.message.value)
                for e in events
            ]
            await rt.pipeline.process(records)
            for e in events:
                await stream.ack(e)
            _observe_lag(app, settings.topic_metrics, records, rt.metrics)

    @app.agent(migrations, name="learn-migrations")
    async def learn_migrations(stream: faust.StreamT) -> None:
        from streams.dlq import dlq_records
        from streams.migrations import handle_migrations

        await ready.wait()
        async for events in stream.noack_take(settings.batch_max, within=settings.batch_within_s):
            rt = runtime["rt"]
            values, keys = [e.message.value for e in events], [e.message.key for e in events]
            rejected = await rt.pipeline.retry("migrations", lambda: handle_migrations(
                values, keys, correction=rt.correction, redis_client=rt.redis, prefix=settings.redis_prefix))
            source = ("topic", settings.topic_migrations.encode())
            sent = [await rt.producer.send(settings.topic_dlq, value=v, key=k, headers=[*h, source])
                    for k, v, h in dlq_records(rejected)]
            await asyncio.gather(*sent)
            for e in events:
                await stream.ack(e)

    @app.timer(interval=settings.model_check_s)
    async def _refresh_correction() -> None:
        rt = runtime.get("rt")
        if rt is not None:  # other workers' migrations reach this one's scorer
            await rt.correction.load(rt.redis, settings.redis_prefix)

    @app.timer(interval=max(1.0, settings.batch_within_s * 4))
    async def _flush_due() -> None:
        rt = runtime.get("rt")
        if rt is None:
            return
        _maybe_reload(rt)
        await rt.pipeline.flush_due()

    return app


def _observe_lag(app: faust.App, topic: str, records: list[Record], metrics: WorkerMetrics) -> None:
    """Consumer lag per partition: the partition's high watermark minus what we processed."""
    from faust.types import TP

    newest: dict[int, int] = {}
    for r in records:
        newest[r.partition] = r.offset
    lags: dict[int, int] = {}
    for partition, offset in newest.items():
        try:
            high = app.consumer.highwater(TP(topic, partition))
        except Exception:  # not known yet right after assignment
            continue
        if high is not None:
            lags[partition] = max(0, high - offset - 1)
    metrics.set_consumer_lag(lags)


def _maybe_reload(rt: WorkerRuntime) -> None:
    new = rt.watcher.maybe_reload()
    if new is not None:
        log.info("model swapped to %s without restart", new.version)
        rt.metrics.set_model(new.version, new.created)


async def _start_runtime(settings: Settings) -> WorkerRuntime:
    from app.model_watch import ModelWatcher
    from app.topics import ensure_topics
    from streams.migrations import DowntimeCorrection
    from streams.scorer import Scorer
    from streams.sinks.history import HistorySink
    from streams.sinks.redis_sink import RedisSink
    from training.bootstrap import bootstrap_model
    from training.store import ModelStore

    device = resolve_device(settings.device)
    xp = get_xp(device)
    metrics = WorkerMetrics(device=device, engine=_engine_name(device))
    server = start_http_server(settings.metrics_port, metrics.registry) if settings.metrics_port > 0 else None
    await ensure_topics(
        settings, [settings.topic_metrics, settings.topic_dlq, settings.topic_scores, settings.topic_migrations]
    )

    store = ModelStore(settings.model_store)
    if store.latest_version() is None:
        log.warning("model store %s is empty: training a bootstrap model on simulated data", settings.model_store)
        model = await asyncio.to_thread(bootstrap_model, settings)
        store.publish(model)
    else:
        model = store.load()
    log.info("serving model %s on device %s", model.version, device)
    watcher = ModelWatcher(settings, store, model, metrics=metrics)
    await watcher.start()
    metrics.set_model(model.version, model.created)

    redis = settings.redis_client()
    producer = AIOKafkaProducer(**settings.aiokafka_kwargs(), linger_ms=5, max_batch_size=1 << 20)
    await producer.start()
    history = HistorySink(settings.history_url)
    correction = DowntimeCorrection()
    await correction.load(redis, settings.redis_prefix)  # absent: factor 1 until migrations are observed
    scorer = Scorer(settings, watcher.current, xp, correction=correction)
    pipeline = Pipeline(
        settings,
        scorer=scorer,
        producer=producer,
        redis_sink=RedisSink(settings, redis),
        history=history,
        metrics=metrics,
        xp=xp,
    )
    return WorkerRuntime(pipeline, producer, metrics, watcher, history, redis, server, correction)


def _engine_name(device: str) -> str:
    try:
        from gpu_kernels.inference import engine_name

        return engine_name(device)
    except Exception:  # engine detection is informative only
        return "xgboost"


async def _stop_runtime(rt: WorkerRuntime) -> None:
    try:
        await rt.pipeline.snapshot_all()
    finally:
        await rt.watcher.stop()
        await asyncio.to_thread(rt.history.close)
        await rt.producer.stop()
        await rt.redis.aclose()
        if rt.metrics_server is not None:
            rt.metrics_server.close()


def run_worker(settings: Settings) -> None:
    """Run one worker until interrupted (used by ``zhuge worker``)."""
    from faust.worker import Worker

    logging.getLogger("aiokafka").setLevel(logging.WARNING)  # replay consumers log every subscription
    Path(settings.state_dir, "faust", settings.consumer_group).mkdir(parents=True, exist_ok=True)
    app = create_app(settings)
    worker = Worker(app, loglevel=settings.log_level.lower(), quiet=True)
    worker.execute_from_commandline()
