"""One settings object for every zhuge process.

Values come from, in increasing priority: the defaults below, environment
variables ``ZHUGE_<FIELD>`` (upper-case field name), then explicit overrides
(CLI flags). The object is frozen: pass it down, never mutate a global.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal

Device = Literal["auto", "cpu", "gpu"]

ENV_PREFIX = "ZHUGE_"
# ZHUGE_* variables read by tools, scripts and tests rather than by Settings: not reported as unknown
TOOL_ENV = frozenset({"ZHUGE_LAB_TRACES", "ZHUGE_DATA_DIR", "ZHUGE_SAN", "ZHUGE_KEY_PASS", "ZHUGE_CHROMIUM",
                      "ZHUGE_CHROMEDRIVER", "ZHUGE_REQUIRE_BROWSER", "ZHUGE_SCREENSHOT_DIR"})  # fmt: skip
TOOL_ENV_PREFIXES = ("ZHUGE_TEST_", "ZHUGE_GPU_")


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
    topic_replication: int = _doc("replication factor of the topics a worker creates (1 on a local broker, 3 on a cluster)", default=1)
    consumer_group: str = _doc(
        "consumer group of the workers on `vm.metrics`; Faust's agents (`vm.migrations`) use `<group>-app`", default="zhuge"
    )
    worker_id: str = _doc(
        "stable id of this worker in the group (Kafka static membership: a restarted worker takes its partitions back "
        "at once); empty: `<hostname>-<n>`, n the lowest slot free on this machine",
        default="",
    )
    kafka_session_timeout_s: float = _doc("a worker not heard from this long loses its partitions to the others", default=10.0)
    kafka_heartbeat_s: float = _doc(
        "seconds between group heartbeats (at most half the session timeout; also how soon a rebalance is noticed)",
        default=1.0,
    )
    kafka_request_timeout_s: float = _doc(
        "a produce or commit not acknowledged within this is failed and sent again (back-pressure, never dropped)", default=30.0
    )
    # --- Redis -------------------------------------------------------------
    redis_url: str = _doc(
        "Redis URL; rediss:// for TLS, redis://:password@host for AUTH", default="redis://127.0.0.1:6379/0", repr=False
    )
    redis_cluster: bool = _doc(
        "true: ZHUGE_REDIS_URL is a seed node of a Redis Cluster (cluster client, hash-tagged key names, see "
        "\"Redis keys and queries\"); false: one Redis (or a managed one without cluster mode)",
        default=False,
    )
    redis_password: str = _doc("Redis password (AUTH), instead of one in the URL", default="", repr=False)
    redis_ssl_cafile: str = _doc("CA bundle for the Redis server's certificate (rediss://)", default="")
    redis_ssl_certfile: str = _doc("client certificate for Redis mutual TLS", default="")
    redis_ssl_keyfile: str = _doc("client private key for Redis mutual TLS", default="")
    redis_prefix: str = _doc("prefix of every Redis key zhuge writes", default="zhuge:")
    redis_ttl_s: int = _doc(
        "expiry of a VM's score hash, refreshed at every write (longer than ZHUGE_VM_TTL_S: a safety net "
        "for VMs no worker evicts)",
        default=7 * 3600,
    )
    # --- compute -----------------------------------------------------------
    device: Device = _doc("auto (GPU when CuPy sees one), cpu or gpu", default="auto")
    predict_threads: int = _doc(
        "CPU threads one worker's forecasts use (XGBoost nthread; 0 = one per core, XGBoost's default). "
        "Several workers on one host: cores / workers, or they stall each other (README sizing guide)",
        default=0,
    )
    # --- windows and scoring -----------------------------------------------
    slot_s: int = _doc("slot length in seconds: samples are averaged into slots", default=300)
    window_span_s: int = _doc("sliding-window span kept per VM, in seconds (>= 24 h)", default=86400)
    horizon_s: int = _doc("forecast horizon in seconds", default=86400)
    vm_ttl_s: int = _doc(
        "a VM from which nothing arrived for this long (wall clock) is evicted from the window store and Redis",
        default=6 * 3600,
    )
    max_future_s: float = _doc("samples stamped further ahead of the worker's clock than this go to the DLQ", default=600.0)
    batch_max: int = _doc("largest micro-batch of Kafka messages the worker takes", default=5000)
    batch_within_s: float = _doc("longest wait to fill a micro-batch, seconds", default=0.25)
    rescore_s: int = _doc(
        "least seconds between two scores of a VM in the same slot (0: every batch bringing it samples); "
        "the forecaster itself runs once per VM per slot",
        default=0,
    )
    window_tolerance_ms: float = _doc(
        "recommended window: a start counts as nearly minimal when its predicted downtime is within "
        "max(this, ZHUGE_WINDOW_TOLERANCE_REL x minimum) ms of the VM's minimum; the earliest such start that "
        "fits the target is published (waiting hours to save a few ms is no saving)",
        default=10.0,
    )
    window_tolerance_rel: float = _doc(
        "recommended window: the tolerance above the minimum as a fraction of it (0.1 = 10%), the larger of this "
        "and ZHUGE_WINDOW_TOLERANCE_MS applies",
        default=0.1,
    )
    window_min_p_ok: float = _doc(
        "recommended window: the least p_ok (probability the pause stays under the target) a start needs to fit; "
        "when no nearly-minimal start fits, the earliest nearly-minimal one is published (window_rule minimum)",
        default=0.9,
    )
    # --- migration / downtime model ----------------------------------------
    link_mbps: float = _doc("migration link bandwidth, MB/s (10 GbE ~ 1250)", default=1250.0)
    downtime_target_ms: float = _doc(
        "downtime target, QEMU's downtime-limit: pre-copy stops once the pending bytes fit it (QEMU default 300)",
        default=300.0,
    )
    downtime_model: str = _doc(
        "qemu (pre-copy as QEMU runs it, checked in the lab) or classic (round-based, max_rounds)", default="qemu"
    )
    link_efficiency: float = _doc("qemu model: share of the link rate that carries migration payload", default=0.96)
    precopy_gap_ms: float = _doc(
        "qemu model: how far below the downtime limit QEMU's last pass leaves the pending bytes, ms (lab: 57)", default=50.0
    )
    migration_timeout_s: float = _doc(
        "the management layer's completion timeout: a migration not converged by then is aborted (or forced)", default=300.0
    )
    migration_on_timeout: str = _doc("abort (the guest stays where it is) or force (pause it and copy the rest)", default="abort")
    max_rounds: int = _doc("classic model: maximum pre-copy rounds before forcing the stop-and-copy", default=30)
    resume_ms: float = _doc("fixed cost of the pause beyond the copy (device state, resume, data in flight), ms", default=20.0)
    # --- web service (zhuge api) and drain plans ------------------------------
    api_host: str = _doc("address `zhuge api` listens on (not loopback: ZHUGE_API_TOKEN is required)", default="127.0.0.1")
    api_port: int = _doc("port of `zhuge api`", default=8000)
    api_token: str = _doc(
        "bearer token `zhuge api` requires on /v1/* (empty: none, allowed on loopback only)", default="", repr=False
    )
    drain_slot_s: int = _doc("time grid of drain plans, seconds (a migration occupies whole slots)", default=60)
    drain_max_concurrent: int = _doc("default number of migrations a drain plan runs at once on a host", default=2)
    drain_time_limit_s: float = _doc("longest the drain planner's solver searches, seconds", default=10.0)
    # --- models, storage, ops -----------------------------------------------
    model_store: str = _doc("fsspec URL of the model store (local dir or s3://bucket/prefix)", default=".zhuge/models")
    history_url: str = _doc("fsspec URL of the Parquet history archive", default=".zhuge/history")
    snapshot_dir: str = _doc("where workers keep per-partition window snapshots", default=".zhuge/snapshots")
    snapshot_every_s: float = _doc("seconds between window snapshots of a partition", default=30.0)
    shutdown_timeout_s: float = _doc(
        "longest a worker takes to stop on SIGTERM/SIGINT, whatever Kafka and Redis are doing (snapshots first)",
        default=15.0,
    )
    history_flush_rows: int = _doc("buffered history rows that trigger a Parquet flush", default=200_000)
    history_flush_s: float = _doc("age of the oldest buffered history row that triggers a flush, seconds", default=60.0)
    history_buffer_rows: int = _doc(
        "most history rows held while the archive is unwritable (oldest dropped and counted beyond)", default=2_000_000
    )
    model_check_s: float = _doc("seconds between model-store checks (besides Redis pub/sub)", default=30.0)
    metrics_port: int = _doc("port of the worker's Prometheus /metrics (0 = none)", default=9464)
    accuracy_sample: float = _doc(
        "live accuracy: share of VMs (chosen by a hash of the VM id, the same in every worker) whose served "
        "forecasts are kept and scored against the samples that arrive later (0 = off)",
        default=0.0625,
    )
    accuracy_max_vms: int = _doc(
        "live accuracy: most VMs one worker tracks (about 48 KB each with a 24 h horizon)", default=512
    )
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

    @classmethod
    def unknown_env(cls, env: Mapping[str, str] | None = None) -> list[str]:
        """One line per ``ZHUGE_*`` variable that names no setting, with the nearest one.

        Why: a mistyped name (``ZHUGE_KAFKA`` for ``ZHUGE_KAFKA_BOOTSTRAP``) otherwise
        leaves the default in force without a word, and the process talks to the wrong broker.
        """
        env = os.environ if env is None else env
        known = [ENV_PREFIX + f.name.upper() for f in fields(cls)]
        out = []
        for name in sorted(env):
            if not name.startswith(ENV_PREFIX) or name in known or name in TOOL_ENV or name.startswith(TOOL_ENV_PREFIXES):
                continue
            tail = name[len(ENV_PREFIX) :]  # the shared prefix would make every name look close
            near = [k for k in known if k.startswith(name + "_")][:1] or [
                ENV_PREFIX + m for m in difflib.get_close_matches(tail, [k[len(ENV_PREFIX) :] for k in known], n=1)]
            out.append(f"{name} is not a zhuge setting and is ignored" + (f" (did you mean {near[0]}?)" if near else ""))
        return out

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
        if self.window_tolerance_ms < 0 or self.window_tolerance_rel < 0 or not 0 <= self.window_min_p_ok <= 1:
            raise ValueError("window_tolerance_ms and window_tolerance_rel must be >= 0, window_min_p_ok in [0, 1]")
        if self.downtime_model not in ("qemu", "classic") or self.migration_on_timeout not in ("abort", "force"):
            raise ValueError("downtime_model must be qemu or classic, migration_on_timeout abort or force")
        if not 0 < self.link_efficiency <= 1 or self.precopy_gap_ms < 0 or self.migration_timeout_s <= 0:
            raise ValueError("link_efficiency in (0, 1], precopy_gap_ms >= 0, migration_timeout_s > 0")
        if self.link_mbps <= 0 or self.downtime_target_ms <= 0 or self.max_rounds < 1:
            raise ValueError("link_mbps, downtime_target_ms and max_rounds must be positive")
        if self.topic_partitions < 1 or self.topic_replication < 1:
            raise ValueError("topic_partitions and topic_replication must be >= 1")
        if not 0 < self.kafka_heartbeat_s * 2 <= self.kafka_session_timeout_s:
            raise ValueError("kafka_heartbeat_s must be positive and at most half of kafka_session_timeout_s")
        if self.kafka_request_timeout_s <= 0 or self.shutdown_timeout_s <= 0 or self.max_future_s < 0:
            raise ValueError("kafka_request_timeout_s and shutdown_timeout_s must be positive, max_future_s >= 0")
        if self.redis_ttl_s <= self.vm_ttl_s:
            raise ValueError(f"redis_ttl_s ({self.redis_ttl_s}) must exceed vm_ttl_s ({self.vm_ttl_s})")
        if self.history_flush_rows < 1 or self.history_flush_s <= 0 or self.history_buffer_rows < self.history_flush_rows:
            raise ValueError("history_flush_rows >= 1, history_flush_s > 0 and history_buffer_rows >= history_flush_rows")
        if not 0 < self.api_port < 65536 or self.drain_slot_s <= 0 or self.drain_max_concurrent < 1:
            raise ValueError("api_port must be 1..65535, drain_slot_s > 0 and drain_max_concurrent >= 1")
        if self.drain_time_limit_s <= 0:
            raise ValueError("drain_time_limit_s must be positive")
        if self.predict_threads < 0:
            raise ValueError("predict_threads must be >= 0 (0 = one thread per core)")
        if not 0 <= self.accuracy_sample <= 1 or self.accuracy_max_vms < 0:
            raise ValueError("accuracy_sample must lie in [0, 1] and accuracy_max_vms be >= 0")
        tls_files = (self.redis_ssl_cafile, self.redis_ssl_certfile, self.redis_ssl_keyfile)
        if any(tls_files) and not self.redis_url.startswith("rediss://"):
            raise ValueError("ZHUGE_REDIS_SSL_* need a rediss:// URL (TLS)")
        if self.redis_cluster:
            from urllib.parse import urlsplit

            if urlsplit(self.redis_url).path not in ("", "/", "/0"):
                raise ValueError("ZHUGE_REDIS_CLUSTER: a Redis Cluster has database 0 only (ZHUGE_REDIS_URL ends in /0)")
            if "{" in self.redis_prefix or "}" in self.redis_prefix:
                raise ValueError("ZHUGE_REDIS_CLUSTER: ZHUGE_REDIS_PREFIX must not contain braces (hash tags)")

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

    def redis_kwargs(self) -> dict[str, Any]:
        """Keyword arguments that complete ``redis_url``: password, TLS files, socket timeouts.

        The timeouts turn a Redis that stops answering into an error the sinks retry,
        never a coroutine waiting forever.
        """
        kw: dict[str, Any] = {"decode_responses": False, "socket_connect_timeout": 5.0, "socket_timeout": 10.0}
        if self.redis_password:
            kw["password"] = self.redis_password
        for name, value in (("ssl_ca_certs", self.redis_ssl_cafile), ("ssl_certfile", self.redis_ssl_certfile),
                            ("ssl_keyfile", self.redis_ssl_keyfile)):
            if value:
                kw[name] = value
        return kw

    def redis_client(self, *, asyncio: bool = True) -> Any:
        """A Redis client for ``redis_url`` and ``redis_kwargs()`` (rediss:// and AUTH handled by redis-py).

        With ``redis_cluster`` a ``RedisCluster`` (same TLS, AUTH and timeouts), which discovers the
        other nodes from the URL's; readers and the sink pick the key layout from the client's type.
        """
        if self.redis_cluster:
            if asyncio:
                from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

                return AsyncRedisCluster.from_url(self.redis_url, **self.redis_kwargs())
            from redis.cluster import RedisCluster

            return RedisCluster.from_url(self.redis_url, **self.redis_kwargs())
        if asyncio:
            import redis.asyncio as aioredis

            return aioredis.from_url(self.redis_url, **self.redis_kwargs())
        import redis

        return redis.from_url(self.redis_url, **self.redis_kwargs())

    def redis_keys(self) -> Any:
        """The key names (``streams.redis_keys.RedisKeys``) of ``redis_prefix`` in this layout."""
        from streams.redis_keys import RedisKeys

        return RedisKeys(self.redis_prefix, cluster=self.redis_cluster)

    @property
    def redis_address(self) -> str:
        """``redis_url`` without its password: what logs, errors and titles may show."""
        return redact_url(self.redis_url)

    def __repr__(self) -> str:
        """Every setting, secrets masked (passwords never reach logs through a repr)."""
        shown = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in SECRET_FIELDS:
                value = "***" if value else ""
            elif f.name == "redis_url":
                value = redact_url(value)
            shown.append(f"{f.name}={value!r}")
        return f"Settings({', '.join(shown)})"


SECRET_FIELDS = frozenset({"kafka_sasl_password", "redis_password", "api_token"})


def redact_url(url: str) -> str:
    """``url`` with the password of its user-info part replaced by ``***``."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


_BOOLS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}


def _coerce(f: dataclasses.Field[Any], raw: str) -> Any:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "bool":
            return _BOOLS[raw.strip().lower()]
    except KeyError as exc:
        raise ValueError(f"{ENV_PREFIX}{f.name.upper()}={raw!r}: expected true or false") from exc
    except ValueError as exc:
        raise ValueError(f"{ENV_PREFIX}{f.name.upper()}={raw!r}: expected {kind}") from exc
    return raw


def settings_table() -> str:
    """The README's settings table, generated from the dataclass (one source of truth)."""
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for f in fields(Settings):
        default = "" if f.name in SECRET_FIELDS else str(f.default).lower() if isinstance(f.default, bool) else f.default
        rows.append(f"| `{ENV_PREFIX}{f.name.upper()}` | `{default}` | {f.metadata.get('doc', '')} |")
    return "\n".join(rows)
