"""The worker process: a Faust app whose hot path is ``app.ingest.MetricsIngest``.

Start order does not matter: before Faust subscribes to anything, the worker
waits for the broker (logging while it waits) and creates its topics, so a
worker started before its topics or its producers consumes within seconds of
the first message. Faust runs the application: the ``vm.migrations`` agent (in
the group ``<consumer_group>-app``), the timers (pending scores and eviction,
correction reload, Redis sweep) and signal handling. ``vm.metrics`` is read
beneath it by ``MetricsIngest`` in the group ``consumer_group``.

Every outage is back-pressure, not a crash: sinks retry, timers log and carry
on, and the process stops within ``shutdown_timeout_s`` of SIGTERM/SIGINT
whatever the broker and Redis are doing (snapshots first; a watchdog ends the
process if a library's shutdown hangs on a dead connection).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faust
from aiokafka import AIOKafkaProducer
from faust.worker import Worker

from app.deadlines import until_done, within
from app.ingest import MetricsIngest, claim_worker_id
from app.metrics import WorkerMetrics, start_http_server
from app.settings import Settings
from gpu_kernels.xp import get_xp, resolve_device
from streams.pipeline import Pipeline

log = logging.getLogger("zhuge.worker")

SWEEP_EVERY_S = 300.0
STOP_SHARE = 0.6  # of shutdown_timeout_s for zhuge's own stop (commit, snapshot); the rest is Faust's


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


def worker_topics(settings: Settings) -> list[str]:
    return [settings.topic_metrics, settings.topic_dlq, settings.topic_scores, settings.topic_migrations]


async def wait_for_topics(settings: Settings) -> None:
    """Wait for the broker (however long it takes), then create the worker's topics when missing."""
    from app.topics import ensure_topics

    created = await until_done(
        lambda: ensure_topics(settings, worker_topics(settings), replication_factor=settings.topic_replication),
        f"Kafka at {settings.kafka_bootstrap}",
    )  # fmt: skip
    if created:
        log.info("created topics %s (%d partitions, replication %d)", created, settings.topic_partitions,
                 settings.topic_replication)  # fmt: skip


@dataclass
class WorkerRuntime:
    """Everything the agents and timers need, created on worker start (not at import)."""

    pipeline: Pipeline
    ingest: MetricsIngest
    producer: AIOKafkaProducer
    metrics: WorkerMetrics
    watcher: Any
    history: Any
    redis: Any
    metrics_server: Any = None
    correction: Any = None  # streams.migrations.DowntimeCorrection, shared through Redis


class Runtimes:
    """Holds the worker's runtime once started, so the signal handler can stop it before Faust stops."""

    def __init__(self) -> None:
        self.rt: WorkerRuntime | None = None
        self.ready = asyncio.Event()

    def get(self) -> WorkerRuntime | None:
        return self.rt

    async def stop(self, budget_s: float) -> None:
        rt, self.rt = self.rt, None
        if rt is not None:
            await _stop_runtime(rt, budget_s)


def create_app(settings: Settings, worker_id: str, runtimes: Runtimes | None = None) -> faust.App:
    """Build the Faust app for these settings; no module-level app, no global state."""
    app = faust.App(
        f"{settings.consumer_group}-app",
        broker=[f"kafka://{b.strip()}" for b in settings.kafka_bootstrap.split(",")],
        broker_credentials=broker_credentials(settings),
        store="memory://",
        datadir=f"{settings.state_dir}/faust/{settings.consumer_group}",
        web_enabled=False,
        topic_partitions=settings.topic_partitions,
        topic_replication_factor=settings.topic_replication,
        topic_allow_declare=False,
        consumer_auto_offset_reset="earliest",
        consumer_group_instance_id=worker_id,
        broker_session_timeout=settings.kafka_session_timeout_s,
        broker_heartbeat_interval=settings.kafka_heartbeat_s,
        broker_commit_every=10_000,
        broker_commit_interval=1.0,
        loghandlers=[],
    )
    migrations = app.topic(
        settings.topic_migrations, key_type=bytes, value_type=bytes, value_serializer="raw", key_serializer="raw"
    )
    runtimes = runtimes or Runtimes()

    @app.task
    async def _start() -> None:
        runtimes.rt = await _start_runtime(settings, worker_id)
        runtimes.ready.set()

    @app.on_before_shutdown.connect
    async def _on_shutdown(app: faust.App, **_: Any) -> None:  # noqa: ARG001
        await runtimes.stop(settings.shutdown_timeout_s * STOP_SHARE)  # a no-op when the signal handler did it

    @app.agent(migrations, name="learn-migrations")
    async def learn_migrations(stream: faust.StreamT) -> None:
        await runtimes.ready.wait()
        async for events in stream.noack_take(settings.batch_max, within=settings.batch_within_s):
            rt = runtimes.get()
            if rt is None:  # stopping
                break
            try:
                await _learn(rt, settings, events)
            finally:  # whatever happened, Faust must be able to commit past these events
                for e in events:
                    await stream.ack(e)

    @app.timer(interval=settings.model_check_s)
    async def _refresh_correction() -> None:
        rt = runtimes.get()
        if rt is None:
            return
        try:  # other workers' migrations reach this one's scorer
            await rt.correction.load(rt.redis, settings.redis_prefix)
        except Exception as exc:  # Redis away: keep the factors we have
            log.warning("downtime correction not reloaded (%s: %s); keeping the current one", type(exc).__name__, exc)

    @app.timer(interval=max(1.0, settings.batch_within_s * 4))
    async def _flush_due() -> None:
        rt = runtimes.get()
        if rt is None:
            return
        try:
            _maybe_reload(rt)
            await rt.pipeline.flush_due()
        except Exception:  # a bug here must not take the timer (and Faust) down; the next tick tries again
            log.exception("scoring pending VMs failed")

    @app.timer(interval=SWEEP_EVERY_S)
    async def _sweep_redis() -> None:
        rt = runtimes.get()
        if rt is None:
            return
        try:
            removed = await rt.pipeline.redis_sink.prune()
        except Exception as exc:  # Redis away: the next sweep does it
            log.warning("Redis sweep skipped (%s: %s)", type(exc).__name__, exc)
            return
        if removed:
            log.info("Redis sweep removed %d rank/host entries of expired VMs", removed)

    return app


async def _learn(rt: WorkerRuntime, settings: Settings, events: list[Any]) -> None:
    """One batch of ``vm.migrations``: fold it into the shared correction, rejects to the DLQ."""
    from streams.dlq import dlq_records
    from streams.migrations import handle_migrations
    from streams.schema import Rejected
    from streams.sinks.kafka_out import OutRecord, send_all

    values, keys = [e.message.value for e in events], [e.message.key for e in events]
    sources = [(settings.topic_migrations, e.message.partition, e.message.offset) for e in events]
    try:
        rejected = await rt.pipeline.retry("redis", lambda: handle_migrations(
            values, keys, correction=rt.correction, redis_client=rt.redis, prefix=settings.redis_prefix,
            limits=rt.pipeline.limits))  # fmt: skip
        where = [sources[r.index] if r.index >= 0 else None for r in rejected]
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # a bug, not an outage (those are retried): keep the batch in the DLQ
        log.exception("vm.migrations batch of %d failed; dead-lettering it", len(events))
        rejected = [Rejected(raw=v or b"", key=k, reason=f"worker failed on this batch: {exc}") for v, k in zip(values, keys)]
        where = sources
    topic = ("topic", settings.topic_migrations.encode())
    out = [OutRecord(settings.topic_dlq, k, v, (*h, topic), output="dlq") for k, v, h in dlq_records(rejected, sources=where)]
    await send_all(rt.producer, out)


def _maybe_reload(rt: WorkerRuntime) -> None:
    new = rt.watcher.maybe_reload()
    if new is not None:
        log.info("model swapped to %s without restart", new.version)
        rt.metrics.set_model(new.version, new.created)
        rt.metrics.set_blend(new)


async def _start_runtime(settings: Settings, worker_id: str) -> WorkerRuntime:
    from app.model_watch import ModelWatcher
    from streams.accuracy import LiveAccuracy
    from streams.migrations import DowntimeCorrection
    from streams.scorer import Scorer
    from streams.sinks.history import HistorySink
    from streams.sinks.redis_sink import RedisSink
    from training.store import ModelStore

    device = resolve_device(settings.device)
    xp = get_xp(device)
    metrics = WorkerMetrics(device=device, engine=_engine_name(device))
    server = start_http_server(settings.metrics_port, metrics.registry) if settings.metrics_port > 0 else None

    store = ModelStore(settings.model_store)
    model = (await _first_model(settings, store)).use_threads(settings.predict_threads)
    log.info("serving model %s on device %s", model.version, device)
    watcher = ModelWatcher(settings, store, model, metrics=metrics)
    await watcher.start()
    metrics.set_model(model.version, model.created)
    metrics.set_blend(model)

    redis = settings.redis_client()
    producer = AIOKafkaProducer(
        **settings.aiokafka_kwargs(), linger_ms=5, max_batch_size=1 << 20, acks="all",
        request_timeout_ms=int(settings.kafka_request_timeout_s * 1000),
    )  # fmt: skip
    await until_done(producer.start, f"Kafka at {settings.kafka_bootstrap} (producer)")
    history = HistorySink.from_settings(settings)
    redis_sink = RedisSink(settings, redis)
    # a correction found absent after Redis lost everything is written back, not reset
    correction = DowntimeCorrection(redis_lost=lambda: redis_sink.lost_since_last_check(worker_id))
    try:
        await correction.load(redis, settings.redis_prefix)  # absent: factor 1 until migrations are observed
    except Exception as exc:  # Redis away at start: factor 1 now, the timer reloads it later
        log.warning("downtime correction not loaded (%s: %s); starting uncorrected", type(exc).__name__, exc)
    scorer = Scorer(settings, watcher.current, xp, correction=correction,
                    accuracy=LiveAccuracy.from_settings(settings, metrics))  # fmt: skip
    pipeline = Pipeline(
        settings,
        scorer=scorer,
        producer=producer,
        redis_sink=redis_sink,
        history=history,
        metrics=metrics,
        xp=xp,
        worker_name=worker_id,
        on_redis_reset=lambda: correction.restore(redis, settings.redis_prefix),
    )
    await pipeline.mark_redis()
    ingest = MetricsIngest(settings, pipeline, metrics, worker_id)
    await ingest.start()
    return WorkerRuntime(pipeline, ingest, producer, metrics, watcher, history, redis, server, correction)


async def _first_model(settings: Settings, store: Any) -> Any:
    """The newest loadable model in the store; a bootstrap model when there is none."""
    from training.bootstrap import bootstrap_model
    from training.model import ModelRejected

    try:
        model, skipped = await asyncio.to_thread(store.load_newest_loadable, settings.slot_s)
    except FileNotFoundError:
        log.warning("model store %s is empty: training a bootstrap model on simulated data", settings.model_store)
        model = await asyncio.to_thread(bootstrap_model, settings)
        store.publish(model)  # the other workers (and the next start) take it from there
        return model
    except ModelRejected as exc:  # the store is the operator's: serve a bootstrap model, leave LATEST alone
        log.error("no version in %s loads (%s): serving a bootstrap model until a good one is published",
                  settings.model_store, exc)  # fmt: skip
        return await asyncio.to_thread(bootstrap_model, settings)
    for version, reason in skipped:
        log.error("model %s REFUSED at start (%s); serving %s", version, reason, model.version)
    return model


def _engine_name(device: str) -> str:
    try:
        from gpu_kernels.inference import engine_name

        return engine_name(device)
    except Exception:  # engine detection is informative only
        return "xgboost"


async def _stop_runtime(rt: WorkerRuntime, budget_s: float) -> None:
    """Stop consuming, commit, snapshot, then close the clients, all within ``budget_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + budget_s
    log.info("stopping: finishing the batch in flight, committing, snapshotting (at most %.0f s)", budget_s)
    try:
        await rt.ingest.stop(budget_s * 0.6)
        log.info("stopping: offsets committed where possible, windows snapshotted")
    finally:
        await within(rt.watcher.stop(), 2.0, "stopping the model watcher")

        def left() -> float:
            return max(0.1, deadline - loop.time())

        for what, closing in (("the history flush", asyncio.to_thread(rt.history.close)),
                              ("closing the producer", rt.producer.stop()), ("closing Redis", rt.redis.aclose())):
            await within(closing, left(), what)  # a dead connection must not hold the shutdown
        if rt.metrics_server is not None:
            rt.metrics_server.close()


class BoundedWorker(Worker):
    """Faust's worker with zhuge's stop first and a hard bound on the whole shutdown.

    On SIGTERM/SIGINT: zhuge's runtime stops first (commit, snapshot, close; at most
    ``STOP_SHARE`` of the budget), then Faust's own services; a watchdog thread ends the
    process when the budget is spent (Faust's consumer thread can hang on a dead broker).
    """

    def __init__(self, *args: Any, runtimes: Runtimes, shutdown_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.runtimes = runtimes
        self.shutdown_timeout_s = shutdown_timeout_s

    def _schedule_shutdown(self, signal: Any) -> None:
        if not self._signal_stop_time:
            watchdog = threading.Timer(self.shutdown_timeout_s, _force_exit, args=(self.shutdown_timeout_s,))
            watchdog.daemon = True
            watchdog.start()
        super()._schedule_shutdown(signal)

    async def _stop_on_signal(self, signal: Any) -> None:
        log.info("signal %s: stopping (at most %.0f s)", getattr(signal, "name", signal), self.shutdown_timeout_s)
        try:
            await self.runtimes.stop(self.shutdown_timeout_s * STOP_SHARE)
        except Exception:  # Faust's stop must still run
            log.exception("stopping the worker runtime failed")
        await super()._stop_on_signal(signal)


def _force_exit(after_s: float) -> None:
    log.warning("shutdown still running after %.0f s (broker or Redis unreachable?): exiting now", after_s)
    logging.shutdown()
    os._exit(0)


def run_worker(settings: Settings) -> None:
    """Run one worker until interrupted (used by ``zhuge worker``)."""
    from app.logs import quiet_repeats

    logging.getLogger("aiokafka").setLevel(logging.WARNING)  # replay consumers log every subscription
    quiet_repeats()  # an outage is one line per kind of error every 30 s, not ten a second
    worker_id, _lock = claim_worker_id(settings)  # held until the process exits
    Path(settings.state_dir, "faust", settings.consumer_group).mkdir(parents=True, exist_ok=True)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    loop.run_until_complete(wait_for_topics(settings))
    runtimes = Runtimes()
    app = create_app(settings, worker_id, runtimes)
    log.info("worker %s starting (settings: %r)", worker_id, settings)
    worker = BoundedWorker(app, loglevel=settings.log_level.lower(), quiet=True, loop=loop, runtimes=runtimes,
                           shutdown_timeout_s=settings.shutdown_timeout_s)  # fmt: skip
    code: Any = 0
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        code = exc.code
    except BaseException:  # Faust re-raises what crashed it
        log.exception("worker %s crashed", worker_id)
        code = 1
    log.info("worker %s stopped (exit code %s)", worker_id, code)
    logging.shutdown()
    os._exit(code if isinstance(code, int) else 1)  # do not wait for library threads stuck on a dead broker
