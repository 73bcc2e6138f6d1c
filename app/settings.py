"""One settings object for every zhuge process.

Values come from, in increasing priority: the defaults below, environment
variables ``ZHUGE_<FIELD>`` (upper-case field name), then explicit overrides
(CLI flags). The object is frozen: pass it down, never mutate a global.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal

Device = Literal["auto", "cpu", "gpu"]

ENV_PREFIX = "ZHUGE_"


def _doc(text: str, **kw: Any) -> Any:
    """A dataclass field carrying its README description in metadata."""
    default = kw.pop("default")
    return field(default=default, metadata={"doc": text}, **kw)


@dataclass(frozen=True)
class Settings:
    # --- Kafka -------------------------------------------------------------
    kafka_bootstrap: str = _doc("Kafka bootstrap servers (host:port[,host:port])", default="127.0.0.1:9092")
    kafka_security_protocol: str = _doc("PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL", default="PLAINTEXT")
    kafka_sasl_mechanism: str = _doc("PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (with SASL_*)", default="")
    kafka_sasl_username: str = _doc("SASL user name", default="")
    kafka_sasl_password: str = _doc("SASL password", default="", repr=False)
    kafka_ssl_cafile: str = _doc("CA bundle for the broker's certificate (SSL, SASL_SSL)", default="")
    kafka_ssl_certfile: str = _doc("client certificate for mutual TLS", default="")
    kafka_ssl_keyfile: str = _doc("client private key for mutual TLS", default="")
    topic_metrics: str = _doc("input topic of VM samples", default="vm.metrics")
    topic_dlq: str = _doc("dead-letter topic: original bytes plus a `reason` header", default="vm.metrics.dlq")
    topic_scores: str = _doc("output topic of migration-window scores", default="vm.scores")
    topic_migrations: str = _doc("observed migrations, used to correct the downtime model", default="vm.migrations")
    topic_partitions: int = _doc("partitions created for the topics when missing", default=8)
    consumer_group: str = _doc("Faust application id / consumer group of the workers", default="zhuge")
    # --- Redis -------------------------------------------------------------
    redis_url: str = _doc("Redis URL; rediss:// for TLS, redis://:password@host for AUTH", default="redis://127.0.0.1:6379/0")
    redis_prefix: str = _doc("prefix of every Redis key zhuge writes", default="zhuge:")
    # --- compute -----------------------------------------------------------
    device: Device = _doc("auto (GPU when CuPy sees one), cpu or gpu", default="auto")
    # --- windows and scoring -----------------------------------------------
    slot_s: int = _doc("slot length in seconds: samples are averaged into slots", default=300)
    window_span_s: int = _doc("sliding-window span kept per VM, in seconds (>= 24 h)", default=86400)
    horizon_s: int = _doc("forecast horizon in seconds", default=86400)
    vm_ttl_s: int = _doc("a VM silent this long is evicted from the window store", default=6 * 3600)
    batch_max: int = _doc("largest micro-batch of Kafka messages the worker takes", default=5000)
    batch_within_s: float = _doc("longest wait to fill a micro-batch, seconds", default=0.25)
    rescore_s: int = _doc(
        "least seconds between two scores of a VM in the same slot (0: every batch bringing it samples); "
        "the forecaster itself runs once per VM per slot",
        default=0,
    )
    # --- migration / downtime model ----------------------------------------
    link_mbps: float = _doc("migration link bandwidth, MB/s (10 GbE ~ 1250)", default=1250.0)
    downtime_target_ms: float = _doc("downtime target: stop pre-copy once the remainder fits it (QEMU default 300)", default=300.0)
    max_rounds: int = _doc("maximum pre-copy rounds before forcing the stop-and-copy", default=30)
    resume_ms: float = _doc("fixed cost of pausing and resuming the guest, ms", default=20.0)
    # --- models, storage, ops -----------------------------------------------
    model_store: str = _doc("fsspec URL of the model store (local dir or s3://bucket/prefix)", default=".zhuge/models")
    history_url: str = _doc("fsspec URL of the Parquet history archive", default=".zhuge/history")
    snapshot_dir: str = _doc("where workers keep per-partition window snapshots", default=".zhuge/snapshots")
    snapshot_every_s: float = _doc("seconds between window snapshots of a partition", default=30.0)
    model_check_s: float = _doc("seconds between model-store checks (besides Redis pub/sub)", default=30.0)
    metrics_port: int = _doc("port of the worker's Prometheus /metrics (0 = none)", default=9464)
    state_dir: str = _doc("local state of services (Kafka data, logs, pid files)", default=".zhuge")
    kafka_home: str = _doc("where `zhuge services` caches the Kafka broker jars (empty: ~/.cache/zhuge/kafka-<version>)", default="")
    log_level: str = _doc("log level", default="INFO")

    # ------------------------------------------------------------------
    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults, then ``ZHUGE_*`` environment variables, then ``overrides`` (None ignored)."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is not None and raw != "":
                values[f.name] = _coerce(f, raw)
        for name, value in overrides.items():
            if value is None:
                continue
            if name not in {f.name for f in fields(cls)}:
                raise TypeError(f"unknown setting {name!r}")
            values[name] = value
        settings = cls(**values)
        settings.validate()
        return settings

    def replace(self, **changes: Any) -> Settings:
        new = dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})
        new.validate()
        return new

    def validate(self) -> None:
        if self.device not in ("auto", "cpu", "gpu"):
            raise ValueError(f"ZHUGE_DEVICE must be auto, cpu or gpu, not {self.device!r}")
        if self.slot_s <= 0:
            raise ValueError("slot_s must be positive")
        if self.window_span_s < self.slot_s * 2:
            raise ValueError("window_span_s must hold at least two slots")
        if self.horizon_s < self.slot_s:
            raise ValueError("horizon_s must be at least one slot")
        if self.kafka_security_protocol not in ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"):
            raise ValueError(f"unknown Kafka security protocol {self.kafka_security_protocol!r}")
        if self.link_mbps <= 0 or self.downtime_target_ms <= 0 or self.max_rounds < 1:
            raise ValueError("link_mbps, downtime_target_ms and max_rounds must be positive")

    # --- derived values ------------------------------------------------------
    @property
    def window_slots(self) -> int:
        return self.window_span_s // self.slot_s

    @property
    def horizon_slots(self) -> int:
        return self.horizon_s // self.slot_s

    @property
    def kafka_host_port(self) -> tuple[str, int]:
        """The first bootstrap address, split (used by `zhuge services`)."""
        first = self.kafka_bootstrap.split(",")[0].strip()
        host, _, port = first.rpartition(":")
        return host or "127.0.0.1", int(port)

    def aiokafka_kwargs(self) -> dict[str, Any]:
        """Connection and security keyword arguments for aiokafka clients."""
        kw: dict[str, Any] = {
            "bootstrap_servers": self.kafka_bootstrap,
            "security_protocol": self.kafka_security_protocol,
        }
        if self.kafka_security_protocol in ("SSL", "SASL_SSL"):
            from aiokafka.helpers import create_ssl_context

            kw["ssl_context"] = create_ssl_context(
                cafile=self.kafka_ssl_cafile or None,
                certfile=self.kafka_ssl_certfile or None,
                keyfile=self.kafka_ssl_keyfile or None,
            )
        if self.kafka_security_protocol.startswith("SASL"):
            kw["sasl_mechanism"] = self.kafka_sasl_mechanism or "PLAIN"
            kw["sasl_plain_username"] = self.kafka_sasl_username
            kw["sasl_plain_password"] = self.kafka_sasl_password
        return kw

    def redis_client(self, *, asyncio: bool = True) -> Any:
        """A Redis client for ``redis_url`` (rediss:// and passwords handled by redis-py)."""
        if asyncio:
            import redis.asyncio as aioredis

            return aioredis.from_url(self.redis_url, decode_responses=False)
        import redis

        return redis.from_url(self.redis_url, decode_responses=False)


def _coerce(f: dataclasses.Field[Any], raw: str) -> Any:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError as exc:
        raise ValueError(f"{ENV_PREFIX}{f.name.upper()}={raw!r}: expected {kind}") from exc
    return raw


def settings_table() -> str:
    """The README's settings table, generated from the dataclass (one source of truth)."""
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for f in fields(Settings):
        default = "" if f.name == "kafka_sasl_password" else f.default
        rows.append(f"| `{ENV_PREFIX}{f.name.upper()}` | `{default}` | {f.metadata.get('doc', '')} |")
    return "\n".join(rows)
