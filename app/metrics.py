"""Prometheus metrics of one worker process, on its own registry.

Why an own registry: no hidden global state, several workers (or tests) in one
process never collide, and ``/metrics`` shows exactly zhuge's series. Every
series the Grafana dashboard queries exists from construction on (counters at
0, info-style gauges initialised), so panels show data before the first event.

Buckets span ~1 ms to tens of seconds for latencies, and seconds to an hour
for end-to-end lag (agents batch, brokers lag, replays run behind).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import SummaryMetricFamily

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LAG_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
SINKS = ("redis", "kafka", "history", "snapshots")  # the labels of zhuge_sink_up
OUTPUTS = ("scores", "dlq")  # the labels of zhuge_kafka_send_errors_total
BATCH_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10_000, 25_000, 50_000, 100_000)


class WorkerMetrics:
    """All metrics a worker exports; pass one instance down to whoever records."""

    def __init__(self, registry: CollectorRegistry | None = None, *, device: str = "cpu", engine: str = "numpy") -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.samples_in = Counter("zhuge_samples_in_total", "Samples decoded from vm.metrics", registry=r)
        self.samples_invalid = Counter("zhuge_samples_invalid_total", "Samples or messages rejected by validation", registry=r)
        self.dlq = Counter("zhuge_dlq_total", "Records sent to the dead-letter topic", registry=r)
        self.vms_scored = Counter("zhuge_vms_scored_total", "VM scores computed", registry=r)
        self.model_rejected = Counter("zhuge_model_rejected_total", "Published models refused at load (checksum, spec mismatch)", registry=r)
        self.samples_late_dropped = Counter("zhuge_samples_late_dropped_total", "Samples older than the window, dropped", registry=r)
        self.recovery_replayed = Counter("zhuge_recovery_replayed_records_total", "Kafka records replayed into windows after a restart or rebalance", registry=r)
        self.recovery_skipped = Counter("zhuge_recovery_skipped_records_total", "Re-delivered records skipped because the windows already held them", registry=r)
        self.redis_errors = Counter("zhuge_redis_errors_total", "Failed Redis writes (retried)", registry=r)
        self.kafka_send_errors = Counter("zhuge_kafka_send_errors_total", "Records whose produce failed and was sent again", ["output"], registry=r)
        self.rebalances = Counter("zhuge_rebalances_total", "Times this worker's vm.metrics partitions were reassigned", registry=r)
        self.commit_errors = Counter("zhuge_commit_errors_total", "Offset commits that failed (retried with the next batch)", registry=r)
        self.snapshot_errors = Counter("zhuge_snapshot_errors_total", "Window snapshots that could not be written", registry=r)
        self.batch_errors = Counter("zhuge_batch_errors_total", "Micro-batches whose processing raised (retried, then dead-lettered)", registry=r)
        self.vms_evicted = Counter("zhuge_vms_evicted_total", "VMs evicted after ZHUGE_VM_TTL_S without a sample (and removed from Redis)", registry=r)
        self.recovery_gap = Counter("zhuge_recovery_gap_records_total", "Records a recovery could not replay (gone from Kafka by retention)", registry=r)
        self.history_dropped = Counter("zhuge_history_dropped_rows_total", "History rows dropped because the archive stayed unwritable", registry=r)

        self.batch_size = Histogram("zhuge_batch_size", "Samples per micro-batch", buckets=BATCH_BUCKETS, registry=r)
        self.batch_latency = Histogram("zhuge_batch_latency_seconds", "Micro-batch processing time, decode to sinks", buckets=LATENCY_BUCKETS, registry=r)
        self.end_to_end_lag = Histogram("zhuge_end_to_end_lag_seconds", "Score time minus sample ts", buckets=LAG_BUCKETS, registry=r)
        self.redis_write = Histogram("zhuge_redis_write_seconds", "Time of one Redis sink write", buckets=LATENCY_BUCKETS, registry=r)

        self.consumer_lag = Gauge("zhuge_consumer_lag", "Messages behind the partition end", ["partition"], registry=r)
        self.model_version = Gauge("zhuge_model_version_info", "Model version in use (value 1)", ["version"], registry=r)
        self.model_age = Gauge("zhuge_model_age_seconds", "Seconds since the model in use was trained (NaN before one is loaded)", registry=r)
        self.window_store_vms = Gauge("zhuge_window_store_vms", "VMs held in the window stores", registry=r)
        self.window_store_bytes = Gauge("zhuge_window_store_bytes", "Bytes of the window stores' arrays", registry=r)
        self.device = Gauge("zhuge_device_info", "Compute device and engine in use (value 1)", ["device", "engine"], registry=r)
        self.sink_up = Gauge("zhuge_sink_up", "1 while the sink's last write succeeded, 0 while it is failing", ["sink"], registry=r)
        self.ready = Gauge("zhuge_ready", "1 once the worker has a model and has joined its consumer group (readiness)", registry=r)
        self.partitions_assigned = Gauge("zhuge_partitions_assigned", "vm.metrics partitions this worker owns", registry=r)
        self.history_buffered = Gauge("zhuge_history_buffered_rows", "History rows waiting for the next Parquet flush", registry=r)
        self.batch_stalled = Gauge("zhuge_batch_stalled_seconds", "Age of the micro-batch in flight (0 when idle): grows while a sink is down", registry=r)
        self.last_commit_age = Gauge("zhuge_last_commit_age_seconds", "Seconds since offsets were last committed (NaN before the first commit)", registry=r)
        self.forecast_errors = ForecastErrors(r)
        self.model_weight = Gauge(
            "zhuge_model_weight",
            "Weight of the boosters in the served median, mean over the bucket's grid horizons "
            "(1: the model alone; 0: the naive forecast alone, the model lost to it on validation)",
            ["target", "bucket"], registry=r,
        )  # fmt: skip
        self.model_partner = Gauge(
            "zhuge_model_partner",
            "Share of the bucket's grid horizons whose served median is combined with this naive forecast "
            "(training.blend.NAIVE: last, yday, prof, week, mean); no series without a blend",
            ["target", "bucket", "naive"], registry=r,
        )  # fmt: skip
        self.window_quantile = Gauge(
            "zhuge_model_window_quantile",
            "Dirty-rate quantile the migration-window search reads (0.9 or 0.5, chosen on validation window regret)",
            registry=r,
        )  # fmt: skip

        self._lock = threading.Lock()
        self._model_created: float | None = None
        self._batch_started: float | None = None  # monotonic start of the batch in flight
        self._last_commit: float | None = None  # monotonic time of the last successful commit
        self.model_age.set_function(self._age)
        self.batch_stalled.set_function(self._stalled)
        self.last_commit_age.set_function(self._commit_age)
        for sink in SINKS:
            self.sink_up.labels(sink=sink).set(1)
        for output in OUTPUTS:
            self.kafka_send_errors.labels(output=output)
        self.set_model("none", None)
        self.set_device(device, engine)

    # --- setters that keep info-style gauges to one series -----------------
    def set_model(self, version: str, created_ts: float | None) -> None:
        """Record the model now in use; ``created_ts`` (epoch s) drives ``zhuge_model_age_seconds``."""
        with self._lock:
            self.model_version.clear()
            self.model_version.labels(version=version).set(1)
            self._model_created = created_ts

    def set_blend(self, model: Any) -> None:
        """Publish the served model's blend (``training.blend``) as ``zhuge_model_weight`` (1 without
        one), ``zhuge_model_partner`` (which naive forecast it leans on) and
        ``zhuge_model_window_quantile``."""
        from gpu_kernels.accuracy import BUCKET_NAMES, bucket_index
        from gpu_kernels.features import TARGETS
        from training.blend import NAIVE, WINDOW_QUANTILES

        blend = getattr(model, "blend", None)
        self.window_quantile.set(blend.window_quantile if blend is not None else WINDOW_QUANTILES[0])
        bucket = None if blend is None else bucket_index(np.asarray(blend.horizons) * model.slot_s)
        self.model_partner.clear()
        for target in TARGETS:
            for i, name in enumerate(BUCKET_NAMES):
                if blend is None:
                    self.model_weight.labels(target=target, bucket=name).set(1.0)
                    continue
                w = np.asarray(blend.weight[target])[bucket == i]
                self.model_weight.labels(target=target, bucket=name).set(float(np.mean(w)) if w.size else float("nan"))
                partners = np.asarray(blend.naive[target])[bucket == i]
                for naive in NAIVE if partners.size else ():
                    self.model_partner.labels(target=target, bucket=name, naive=naive).set(float(np.mean(partners == naive)))

    def _age(self) -> float:
        created = self._model_created
        return math.nan if created is None else max(0.0, time.time() - created)

    def batch_begins(self) -> None:
        self._batch_started = time.monotonic()

    def batch_ends(self) -> None:
        self._batch_started = None

    def _stalled(self) -> float:
        started = self._batch_started
        return 0.0 if started is None else time.monotonic() - started

    def committed(self) -> None:
        self._last_commit = time.monotonic()

    def _commit_age(self) -> float:
        last = self._last_commit
        return math.nan if last is None else time.monotonic() - last

    def set_sink_up(self, sink: str, up: bool) -> None:
        self.sink_up.labels(sink=sink).set(1 if up else 0)

    def set_device(self, device: str, engine: str) -> None:
        with self._lock:
            self.device.clear()
            self.device.labels(device=device, engine=engine).set(1)

    def set_consumer_lag(self, lags: dict[int, int]) -> None:
        """Replace the per-partition lag (partitions no longer assigned disappear)."""
        with self._lock:
            self.consumer_lag.clear()
            for partition, lag in lags.items():
                self.consumer_lag.labels(partition=str(partition)).set(lag)

    def observe_lags(self, lag_s: np.ndarray | Iterable[float]) -> None:
        """Observe many end-to-end lags at once (vectorised; no per-sample Python loop)."""
        observe_many(self.end_to_end_lag, lag_s)


class ForecastErrors:
    """Live accuracy (``streams.accuracy``) as ``zhuge_forecast_abs_error{target,bucket,method}``, a summary.

    ``_sum`` = absolute errors of the realised forecasts, ``_count`` = pairs (the same for every
    method of a target and bucket: pairs where any method is NaN are skipped for all), so
    ``increase(_sum[1h]) / increase(_count[1h])`` is the MAE over the last hour. Kept as NumPy
    arrays and rendered at scrape time (one bulk add per forecast run, no per-pair calls);
    every series exists from start-up at 0. ``zhuge_forecast_tracked_vms``: VMs sampled.
    """

    NAME = "zhuge_forecast_abs_error"

    def __init__(self, registry: CollectorRegistry) -> None:
        from gpu_kernels.accuracy import ErrorTally

        self.tally = ErrorTally()
        self._lock = threading.Lock()
        self.tracked = Gauge("zhuge_forecast_tracked_vms", "VMs whose served forecasts are tracked for live accuracy", registry=registry)
        registry.register(self)

    def add(self, sums: np.ndarray, counts: np.ndarray) -> None:
        """Add ``gpu_kernels.accuracy.error_sums`` output: sums ``(T, B, M)``, counts ``(T, B)``."""
        with self._lock:
            self.tally.add(sums, counts)

    def set_tracked(self, n: int) -> None:
        self.tracked.set(n)

    def describe(self) -> list[Any]:
        return [SummaryMetricFamily(self.NAME, "", labels=("target", "bucket", "method"))]

    def collect(self) -> Iterable[Any]:
        fam = SummaryMetricFamily(
            self.NAME,
            "Absolute error of realised forecasts (served q50 and naive baselines) per target, horizon bucket, method",
            labels=("target", "bucket", "method"),
        )
        tally = self.tally
        with self._lock:
            sums, counts = tally.sums.copy(), tally.counts.copy()
        for i, t in enumerate(tally.targets):
            for j, b in enumerate(tally.buckets):
                for k, m in enumerate(tally.methods):
                    fam.add_metric((t, b, m), count_value=int(counts[i, j]), sum_value=float(sums[i, j, k]))
        yield fam


def observe_many(histogram: Histogram, values: np.ndarray | Iterable[float]) -> None:
    """Add many observations to an unlabelled histogram in O(buckets) Python calls.

    Uses the client's bucket counters directly (stable since 0.x); falls back to
    one ``observe`` per value if that layout ever changes.
    """
    arr = np.asarray(values if isinstance(values, np.ndarray) else list(values), dtype=np.float64).ravel()
    arr = arr[np.isfinite(arr)]
    if arr.size == 0:
        return
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for v in arr.tolist():
            histogram.observe(v)
        return
    # bucket i holds values with bounds[i-1] < v <= bounds[i] (non-cumulative, like observe()).
    idx = np.searchsorted(np.asarray(bounds, dtype=np.float64), arr, side="left")
    counts = np.bincount(idx, minlength=len(bounds))
    for i in np.flatnonzero(counts).tolist():
        buckets[i].inc(int(counts[i]))
    total.inc(float(arr.sum()))


@dataclass
class MetricsServer:
    """A running ``/metrics`` HTTP server (daemon thread)."""

    server: Any
    thread: threading.Thread
    port: int

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def start_http_server(port: int, registry: CollectorRegistry, addr: str = "0.0.0.0") -> MetricsServer:
    """Serve ``registry`` at ``/metrics`` on ``port`` (0 = a free port; the actual one is in ``.port``).

    The worker skips calling this when ``settings.metrics_port`` is 0 (metrics off).
    """
    from prometheus_client import start_http_server as _start

    server, thread = _start(port, addr=addr, registry=registry)
    return MetricsServer(server=server, thread=thread, port=int(server.server_address[1]))
