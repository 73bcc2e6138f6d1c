"""Where scores and samples go: Redis (serving), the ``vm.scores`` topic, Parquet history.

Each sink is a small class or function with one job; the worker owns the
transports (Kafka producer, Redis client, thread for blocking I/O).
"""

from streams.sinks.history import HistorySink
from streams.sinks.redis_sink import RedisSink, WriteResult, read_vm, top
from streams.sinks.scores_topic import score_records

__all__ = ["HistorySink", "RedisSink", "WriteResult", "read_vm", "score_records", "top"]
