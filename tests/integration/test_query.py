"""`zhuge score` and `zhuge top` through the CLI against a real Redis."""

from __future__ import annotations

import asyncio
import json
import uuid

import numpy as np
import pytest
from typer.testing import CliRunner

from app.cli import cli
from app.settings import Settings
from streams.scores import ScoreBatch
from streams.sinks.redis_sink import RedisSink

pytestmark = pytest.mark.integration

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z


def write_scores(settings: Settings, vms, hosts, now_ms) -> None:
    n = len(vms)
    start = T0 + np.arange(n) * 300.0
    batch = ScoreBatch(
        vm=vms, host=hosts, best_start=start, best_end=start + 900.0,
        best_downtime_ms=np.full(n, 42.0, np.float32), p_ok=np.full(n, 0.9, np.float32),
        window_rule=np.full(n, "now"), min_start=start + 7200.0, min_end=start + 8100.0,
        min_downtime_ms=np.full(n, 40.5, np.float32), min_p_ok=np.full(n, 0.95, np.float32),
        now_downtime_ms=np.asarray(now_ms, np.float32), now_p_ok=np.full(n, 0.9, np.float32),
        now_total_s=np.full(n, 880.0, np.float32), downtime_factor=np.ones(n, np.float32), last_ts=np.full(n, T0 - 60.0), model="m-test", updated=T0,
    )

    async def go() -> None:
        client = settings.redis_client()
        try:
            await RedisSink(settings, client).write(batch)
        finally:
            await client.aclose()

    asyncio.run(go())


@pytest.fixture
def redis_env(services: Settings):
    settings = services.replace(redis_prefix=f"zq-{uuid.uuid4().hex[:8]}:")
    write_scores(settings, ["web-1", "db-1", "cache-1", "batch-1"], ["h1", "h1", "h2", "h1"], [300.0, 25.0, 10.0, np.inf])
    env = {"ZHUGE_REDIS_URL": settings.redis_url, "ZHUGE_REDIS_PREFIX": settings.redis_prefix}
    yield settings, env
    client = settings.redis_client(asyncio=False)
    keys = list(client.scan_iter(match=f"{settings.redis_prefix}*"))
    if keys:
        client.delete(*keys)
    client.close()


def test_score_json_shows_the_hash(redis_env):
    _, env = redis_env
    result = CliRunner().invoke(cli, ["score", "db-1", "--json"], env=env)
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)
    assert row["vm"] == "db-1" and row["host"] == "h1" and row["model"] == "m-test"
    assert row["now_downtime_ms"] == 25.0 and row["best_start"] == T0 + 300.0 and row["best_end"] == T0 + 1200.0
    assert row["window_rule"] == "now" and row["min_start"] == T0 + 7500.0 and row["min_downtime_ms"] == 40.5
    assert row["min_p_ok"] == 0.95 and row["now_p_ok"] == 0.9 and row["now_total_s"] == 880.0


def test_score_table_is_readable(redis_env):
    _, env = redis_env
    result = CliRunner().invoke(cli, ["score", "web-1"], env=env)
    assert result.exit_code == 0, result.output
    assert "2026-01-01 00:00:00Z" in result.stdout  # best_start as UTC
    assert "300.0" in result.stdout and "m-test" in result.stdout
    assert "window_rule" in result.stdout and "now" in result.stdout
    assert "2026-01-01 02:00:00Z" in result.stdout and "40.5" in result.stdout  # the strict minimum
    assert "880.0" in result.stdout  # now_total_s


def test_unknown_vm_exits_1_with_a_clear_message(redis_env):
    _, env = redis_env
    result = CliRunner().invoke(cli, ["score", "ghost"], env=env)
    assert result.exit_code == 1
    assert "no score for VM 'ghost'" in result.output


def test_top_orders_by_downtime_now_and_filters_by_host(redis_env):
    _, env = redis_env
    result = CliRunner().invoke(cli, ["top", "--json"], env=env)
    assert result.exit_code == 0, result.output
    assert [r["vm"] for r in json.loads(result.stdout)] == ["cache-1", "db-1", "web-1", "batch-1"]
    result = CliRunner().invoke(cli, ["top", "--host", "h1", "-n", "2", "--json"], env=env)
    rows = json.loads(result.stdout)
    assert [r["vm"] for r in rows] == ["db-1", "web-1"]
    everything = json.loads(CliRunner().invoke(cli, ["top", "--json", "--host", "h1"], env=env).stdout)
    assert everything[-1]["vm"] == "batch-1" and everything[-1]["now_downtime_ms"] is None  # never converges


def test_top_table_lists_vms_with_utc_windows(redis_env):
    _, env = redis_env
    result = CliRunner().invoke(cli, ["top", "-n", "2"], env={**env, "COLUMNS": "200"})  # rich sizes tables from COLUMNS
    assert result.exit_code == 0, result.output
    assert "cache-1" in result.stdout and "db-1" in result.stdout and "web-1" not in result.stdout
    assert "2026-01-01 00:10:00Z" in result.stdout  # cache-1's best_start (third VM: T0 + 600 s)
    assert "2026-01-01 02:10:00Z" in result.stdout and "40.5" in result.stdout  # cache-1's strict minimum
    assert "rule" in result.stdout and "now" in result.stdout


def test_unreachable_redis_is_a_clear_error(services: Settings):
    env = {"ZHUGE_REDIS_URL": "redis://127.0.0.1:1/0"}
    result = CliRunner().invoke(cli, ["top"], env=env)
    assert result.exit_code == 1
    assert "redis://127.0.0.1:1/0" in result.output
