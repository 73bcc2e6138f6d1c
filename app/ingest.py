"""The hot path's consumer: ``vm.metrics`` read in bulk beneath Faust, with the ack contract kept explicit.

Why not a Faust agent: Faust's per-event stream machinery caps one worker at a
few thousand messages a second, its commit bookkeeping never commits a
partition again once one taken event is left unacked, and a worker subscribed
before its topic existed sat idle until the next metadata refresh. Here one
aiokafka consumer in the worker group (``consumer_group``) reads micro-batches
of records, ``streams.pipeline.Pipeline`` processes them, and only the offsets
the pipeline returns are committed, by a background committer that never
blocks the batch loop. Faust keeps the application, the low-rate
``vm.migrations`` agent and the timers.

Group membership (what an SRE sees):

- **static membership**: every worker joins with a stable ``group.instance.id``
  (``worker_id``): a worker restarted within the session timeout (crash, deploy)
  gets its partitions back at once, without a rebalance of the others;
- a worker that stops for good hands its partitions to the others after
  ``kafka_session_timeout_s`` (static members do not leave the group on close);
- scale-up: a new id joins and the group rebalances; revoked partitions are
  committed and snapshotted first, so their next owner resumes without a gap.

Degraded states are visible: ``zhuge_consumer_lag`` (from the log end, refreshed
while a batch is stuck), ``zhuge_last_commit_age_seconds``,
``zhuge_batch_stalled_seconds`` and ``zhuge_partitions_assigned``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import socket
import time
from pathlib import Path
from typing import IO, Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition

from app.deadlines import until_done, within
from app.settings import Settings
from streams.pipeline import Pipeline, Record

log = logging.getLogger(__name__)

COMMIT_EVERY_S = 1.0
LAG_EVERY_S = 5.0
FLAPPING = (5, 60.0)  # this many assignments within this many seconds: something is wrong with the group


def claim_worker_id(settings: Settings) -> tuple[str, IO[str] | None]:
    """This worker's static member id, and the lock file that keeps it unique on this machine.

    ``ZHUGE_WORKER_ID`` when set. Otherwise ``<hostname>-<n>`` with ``n`` the lowest slot
    whose lock file under ``state_dir`` no running worker holds: a restarted worker gets
    its old id (and so its partitions) back; two workers on one machine never share one.
    """
    if settings.worker_id:
        return settings.worker_id, None
    folder = Path(settings.state_dir, "worker-ids")
    folder.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname() or "worker"
    for n in range(4096):
        handle = open(folder / f"{settings.consumer_group}-{n}.lock", "a+")  # noqa: SIM115 - held for the process' life
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            continue
        return f"{host}-{n}", handle
    raise RuntimeError(f"no free worker slot under {folder}; set ZHUGE_WORKER_ID")


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, ingest: MetricsIngest) -> None:
        self.ingest = ingest

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.ingest.revoke([tp.partition for tp in revoked])

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.ingest.assigned([tp.partition for tp in assigned])


class MetricsIngest:
    """Consume ``vm.metrics``, drive the pipeline, commit what it finished."""

    def __init__(self, settings: Settings, pipeline: Pipeline, metrics: Any, worker_id: str) -> None:
        self.settings = settings
        self.pipeline = pipeline
        self.metrics = metrics
        self.worker_id = worker_id
        self.consumer: AIOKafkaConsumer | None = None
        self._done: dict[int, int] = {}  # partition -> next offset whose batch finished (to commit)
        self._committed: dict[int, int] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._assignments: list[float] = []  # monotonic times of recent assignments
        self._flap_logged = -float("inf")

    def _consumer(self) -> AIOKafkaConsumer:
        s = self.settings
        return AIOKafkaConsumer(
            group_id=s.consumer_group,
            group_instance_id=self.worker_id,
            client_id=f"zhuge-{self.worker_id}",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=int(s.kafka_session_timeout_s * 1000),
            heartbeat_interval_ms=int(s.kafka_heartbeat_s * 1000),
            request_timeout_ms=int(max(s.kafka_request_timeout_s, s.kafka_session_timeout_s + 5) * 1000),
            metadata_max_age_ms=30_000,  # a topic recreated or repartitioned is noticed within 30 s
            max_poll_records=s.batch_max,
            **s.aiokafka_kwargs(),
        )

    async def start(self) -> None:
        self.consumer = self._consumer()
        self.consumer.subscribe([self.settings.topic_metrics], listener=_Rebalance(self))
        await until_done(self.consumer.start, f"Kafka at {self.settings.kafka_bootstrap} (consumer)")
        log.info("consuming %s as %s in group %s", self.settings.topic_metrics, self.worker_id, self.settings.consumer_group)
        self._tasks = [
            asyncio.create_task(self._run(), name="metrics-ingest"),
            asyncio.create_task(self._commit_loop(), name="metrics-commit"),
        ]

    # ------------------------------------------------------------------ batches
    async def _take(self) -> list[Record]:
        """Up to ``batch_max`` records, waiting at most ``batch_within_s`` once the first arrived."""
        assert self.consumer is not None
        s = self.settings
        records: list[Record] = []
        deadline: float | None = None
        while len(records) < s.batch_max:
            wait = 1.0 if deadline is None else deadline - time.monotonic()
            if wait <= 0:
                break
            got = await self.consumer.getmany(timeout_ms=int(wait * 1000), max_records=s.batch_max - len(records))
            for tp, recs in got.items():
                records += [Record(tp.partition, r.offset, r.key, r.value, r.timestamp) for r in recs]
            if not records:
                return records  # idle: let the loop look at the stop flag
            if deadline is None:
                deadline = time.monotonic() + s.batch_within_s
        return records

    async def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                records = await self._take()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the broker away: aiokafka reconnects by itself; keep polling
                log.warning("fetching %s failed (%s); retrying", self.settings.topic_metrics, exc)
                await asyncio.sleep(1.0)
                continue
            if not records:
                continue
            assigned = self._assigned()
            records = [r for r in records if r.partition in assigned]  # revoked while we waited
            result = await self.pipeline.process(records)
            for p, offset in result.commit.items():
                self._done[p] = max(self._done.get(p, 0), offset)

    def _assigned(self) -> set[int]:
        assert self.consumer is not None
        return {tp.partition for tp in self.consumer.assignment() if tp.topic == self.settings.topic_metrics}

    # ------------------------------------------------------------------ commits and lag
    async def commit(self, partitions: list[int] | None = None) -> bool:
        """Commit the finished offsets (of ``partitions``, default all assigned); False when it failed."""
        assert self.consumer is not None
        topic = self.settings.topic_metrics
        wanted = self._assigned() if partitions is None else set(partitions)
        offsets = {
            TopicPartition(topic, p): o for p, o in self._done.items() if p in wanted and o > self._committed.get(p, -1)
        }
        if not offsets:
            return True
        try:
            await asyncio.wait_for(self.consumer.commit(offsets), timeout=self.settings.kafka_request_timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # broker away or a rebalance under way: the next round commits newer offsets
            self.metrics.commit_errors.inc()
            log.warning("committing offsets failed (%s: %s); will retry", type(exc).__name__, exc)
            return False
        for tp, o in offsets.items():
            self._committed[tp.partition] = o
        self.metrics.committed()
        return True

    async def _commit_loop(self) -> None:
        last_lag = 0.0
        while not self._stopping.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), COMMIT_EVERY_S)
            await self.commit()
            if time.monotonic() - last_lag >= LAG_EVERY_S:
                last_lag = time.monotonic()
                await self._observe_lag()

    async def _observe_lag(self) -> None:
        """Messages behind the log end per owned partition, from a fresh end-offset request."""
        assert self.consumer is not None
        tps = [tp for tp in self.consumer.assignment() if tp.topic == self.settings.topic_metrics]
        if not tps:
            self.metrics.set_consumer_lag({})
            return
        try:
            ends = await asyncio.wait_for(self.consumer.end_offsets(tps), timeout=5.0)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # broker away: keep the last figures, they are what we know
            log.debug("end offsets unavailable (%s)", exc)
            return
        lags = {}
        for tp, end in ends.items():
            done = self._done.get(tp.partition, self._committed.get(tp.partition))
            if done is not None:  # unknown until the partition's first batch
                lags[tp.partition] = max(0, int(end) - done)
        self.metrics.set_consumer_lag(lags)

    # ------------------------------------------------------------------ rebalance
    def assigned(self, partitions: list[int]) -> None:
        mine = sorted(self._assigned())
        self.metrics.partitions_assigned.set(len(mine))
        self.metrics.ready.set(1)  # in the group, even with no partition to own
        self.metrics.rebalances.inc()
        log.info("assigned partitions %s of %s", mine, self.settings.topic_metrics)
        self._warn_if_flapping()

    def _warn_if_flapping(self) -> None:
        """Two workers with one static id fence each other at every heartbeat: say so loudly."""
        now = time.monotonic()
        count, window = FLAPPING
        self._assignments = [t for t in self._assignments if now - t < window] + [now]
        if len(self._assignments) >= count and now - self._flap_logged >= window:
            self._flap_logged = now
            log.error(
                "the group reassigned this worker's partitions %d times in %.0f s: is another worker running with "
                "the same id %r (ZHUGE_WORKER_ID)? Every worker of a group needs its own.",
                len(self._assignments), window, self.worker_id,
            )

    async def revoke(self, partitions: list[int]) -> None:
        """Before another worker takes them: commit what is finished, snapshot, forget."""
        if not partitions:
            return
        budget = max(1.0, self.settings.kafka_session_timeout_s / 2)
        await self.commit(partitions)
        await self.pipeline.snapshot_and_release(partitions, timeout_s=budget)
        for p in partitions:
            self._done.pop(p, None)
            self._committed.pop(p, None)
        log.info("revoked partitions %s of %s", sorted(partitions), self.settings.topic_metrics)

    # ------------------------------------------------------------------ stop
    async def stop(self, budget_s: float) -> None:
        """Stop within ``budget_s``: let the batch in flight finish (a third of it), commit, snapshot, close.

        The batch in flight, if cancelled, drops its half-applied partitions (see
        ``Pipeline``), so the snapshot taken here never holds uncommitted samples.
        """
        deadline = time.monotonic() + budget_s
        self._stopping.set()

        def left(share: float = 1.0) -> float:
            return max(0.1, (deadline - time.monotonic()) * share)

        run = self._tasks[0] if self._tasks else None
        if run is not None and not await within(asyncio.shield(run), left(1 / 3), "the batch in flight"):
            run.cancel()
            await within(run, 1.0, "cancelling the batch in flight")
        for task in self._tasks[1:]:
            task.cancel()
        await within(self.commit(), min(left(1 / 3), 3.0), "the last offset commit")
        await within(self.pipeline.snapshot_all(), left(1 / 2), "the shutdown snapshot")
        if self.consumer is not None:
            await within(self.consumer.stop(), left(), "closing the consumer")
