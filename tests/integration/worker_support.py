"""Shared steps of the worker integration tests: plain producing, waiting on Redis, window checks.

The producer here knows only the message contract (JSON objects, key = VM id):
it is what a hypervisor agent would be, not the project's simulator.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from app.settings import Settings
from app.topics import produce_messages
from streams.recovery import SnapshotStore
from streams.schema import METRICS, decode_messages
from streams.window_store import WindowStore

DATA = Path(os.environ.get("ZHUGE_DATA_DIR", Path(__file__).resolve().parents[2].parent / "shared" / "data"))
BITBRAINS = DATA / "bitbrains-rnd-2013-08"
CONTRACT_FIELDS = ("host", *METRICS)


def isolated_worker_settings(unique_topics: Settings, tmp_path: Path, partitions: int, **overrides: object) -> Settings:
    """Settings for one test's workers: own topics (created), Redis prefix and snapshot dir."""
    from app.topics import ensure_topics

    settings = unique_topics.replace(
        topic_partitions=partitions,
        redis_prefix=f"t{unique_topics.consumer_group[-8:]}:",
        snapshot_dir=str(tmp_path / "snapshots"),
        **overrides,
    )
    topics = [settings.topic_metrics, settings.topic_dlq, settings.topic_scores, settings.topic_migrations]
    asyncio.run(ensure_topics(settings, topics, partitions=partitions))
    return settings


def bitbrains_messages(vms: str, last_rows: int) -> list[tuple[bytes, bytes]]:
    """The last ``last_rows`` samples of each selected Bitbrains VM as contract messages, in time order."""
    if not BITBRAINS.exists():
        pytest.skip(f"real traces not found at {BITBRAINS}")
    from sim.traces import iter_trace

    rows: list[tuple[float, bytes, bytes]] = []
    for vm, df in iter_trace("bitbrains", BITBRAINS, vms):
        tail = df.tail(last_rows)
        for rec in tail.to_dict("records"):
            msg = {"vm": vm, "ts": float(rec["ts"])}
            for f in CONTRACT_FIELDS:
                v = rec.get(f)
                if v is not None and v == v:  # NaN = field absent
                    msg[f] = v if f == "host" else float(v)
            rows.append((msg["ts"], vm.encode(), json.dumps(msg).encode()))
    rows.sort(key=lambda r: r[0])
    return [(k, v) for _, k, v in rows]


def newest_ts(messages: list[tuple[bytes, bytes]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for _, value in messages:
        m = json.loads(value)
        out[m["vm"]] = max(out.get(m["vm"], 0.0), m["ts"])
    return out


produce = produce_messages  # the tests' name for it


def wait_for_scores(settings: Settings, expected: dict[str, float], timeout_s: float = 60.0) -> dict[str, dict]:
    """Wait until every VM's Redis hash carries its newest sample as ``last_ts``; return the hashes."""
    client = settings.redis_client(asyncio=False)
    deadline = time.monotonic() + timeout_s
    hashes: dict[str, dict] = {}
    try:
        while True:
            pipe = client.pipeline(transaction=False)
            for vm in expected:
                pipe.hgetall(f"{settings.redis_prefix}vm:{vm}")
            hashes = {vm: {k.decode(): v.decode() for k, v in h.items()} for vm, h in zip(expected, pipe.execute())}
            behind = {vm: h.get("last_ts") for vm, h in hashes.items() if not h or float(h["last_ts"]) != expected[vm]}
            if not behind:
                return hashes
            if time.monotonic() > deadline:
                sample = dict(list(behind.items())[:5])
                raise AssertionError(f"{len(behind)} of {len(expected)} VMs not up to date after {timeout_s}s, e.g. {sample}")
            time.sleep(0.5)
    finally:
        client.close()


def wait_for_key(settings: Settings, key: str, timeout_s: float = 30.0, until: Callable[[dict], bool] | None = None) -> dict:
    """Wait for a JSON document at ``key`` in Redis (one for which ``until`` holds, when given:
    a document written in several steps) and return it parsed."""
    client = settings.redis_client(asyncio=False)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            raw = client.get(key)
            if raw is not None and (until is None or until(json.loads(raw))):
                return json.loads(raw)
            assert time.monotonic() < deadline, f"{key} not written (as awaited) within {timeout_s}s: {raw!r}"
            time.sleep(0.3)
    finally:
        client.close()


def assert_valid_score(h: dict) -> None:
    for field in ("best_start", "best_end", "best_downtime_ms", "now_downtime_ms", "p_ok", "model", "last_ts", "updated", "host"):
        assert field in h, f"missing {field} in {h}"
    assert float(h["best_end"]) >= float(h["best_start"]) > float(h["last_ts"])
    assert 0.0 <= float(h["p_ok"]) <= 1.0
    assert float(h["best_downtime_ms"]) >= 0.0


def reference_windows(settings: Settings, messages: list[tuple[bytes, bytes]]) -> dict[str, np.ndarray]:
    """Each VM's window when every message is applied exactly once, in order, with no worker."""
    store = WindowStore(settings.window_slots, settings.slot_s, settings.vm_ttl_s)
    decoded = decode_messages([v for _, v in messages], [k for k, _ in messages], now=time.time())
    store.update(decoded.vm, decoded.host, decoded.ts, decoded.values)
    return _windows_by_vm(store)


def snapshot_windows(settings: Settings) -> dict[str, np.ndarray]:
    """Each VM's window as the workers left it in their partition snapshots."""
    snaps = SnapshotStore(settings.snapshot_dir, settings.consumer_group, settings.topic_metrics)
    out: dict[str, np.ndarray] = {}
    for p in range(settings.topic_partitions):
        snap = snaps.load(p)
        if snap is not None:
            out.update(_windows_by_vm(WindowStore.restore(snap.arrays)))
    return out


def _windows_by_vm(store: WindowStore) -> dict[str, np.ndarray]:
    rows = store.active_rows()
    win, attrs = store.windows(rows)
    return {vm: np.asarray(win[i]) for i, vm in enumerate(attrs["vm"])}


def assert_same_windows(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert sorted(actual) == sorted(expected)
    for vm, want in expected.items():
        np.testing.assert_allclose(actual[vm], want, rtol=1e-5, equal_nan=True, err_msg=f"window of {vm} differs")
