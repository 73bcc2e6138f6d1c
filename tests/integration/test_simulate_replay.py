"""`zhuge simulate` and `zhuge replay` against a real broker, read back with a plain consumer."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from app.cli import cli
from streams.schema import decode_messages

pytestmark = pytest.mark.integration

DATA = Path(os.environ.get("ZHUGE_DATA_DIR", Path(__file__).resolve().parents[2].parent / "shared" / "data"))


async def read_back(settings, topic: str, want_samples: int, timeout_s: float = 20.0, settle_s: float = 1.0):
    """Every message of ``topic`` from the start, until ``want_samples`` decoded plus ``settle_s`` of quiet."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(topic, group_id=None, auto_offset_reset="earliest", **settings.aiokafka_kwargs())
    await consumer.start()
    values, keys = [], []
    n = 0
    deadline = time.monotonic() + timeout_s
    settle_until = None
    try:
        while time.monotonic() < deadline:
            got = await consumer.getmany(timeout_ms=300, max_records=10_000)
            for recs in got.values():
                values += [r.value for r in recs]
                keys += [r.key for r in recs]
                n += len(decode_messages([r.value for r in recs], now=time.time() + 1e12))
            if n >= want_samples:
                settle_until = settle_until or time.monotonic() + settle_s
                if time.monotonic() >= settle_until:
                    break
    finally:
        await consumer.stop()
    return values, keys


def run_cli(settings, *args: str):
    res = CliRunner().invoke(cli, ["--kafka", settings.kafka_bootstrap, *args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res.output


@pytest.mark.parametrize("shape", ["--batched", "--per-vm"])
def test_simulate_produces_decodable_samples(unique_topics, shape):
    s = unique_topics
    out = run_cli(s, "simulate", "--vms", "1000", "--hosts", "40", "--steps", "2", "--fast", shape,
                  "--topic", s.topic_metrics)
    assert "2,000 samples" in out
    values, keys = asyncio.run(read_back(s, s.topic_metrics, 2000))
    batch = decode_messages(values)
    assert not batch.rejected
    assert len(batch) == 2000 and len(set(batch.vm)) == 1000 and len(set(batch.ts.tolist())) == 2
    assert len(values) == (80 if shape == "--batched" else 2000)
    assert all(k.decode().startswith("vm-") for k in keys)
    if shape == "--per-vm":
        assert [k.decode() for k in keys[:1]] == [batch.vm[0]]


def bitbrains_rows(file: Path) -> tuple[int, int]:
    """(data rows, duplicated timestamps) read independently with pandas."""
    df = pd.read_csv(file, sep=";\t", engine="python")
    return len(df), int(df.iloc[:, 0].duplicated().sum())


def test_replay_bitbrains_sends_every_row_once(unique_topics):
    bb = DATA / "bitbrains-rnd-2013-08"
    if not bb.exists():
        pytest.skip(f"{bb} absent")
    s = unique_topics
    counts = {f"bb-{n:04d}": bitbrains_rows(bb / f"{n}.csv.gz") for n in range(1, 6)}
    expected = sum(rows - dups for rows, dups in counts.values())
    out = run_cli(s, "replay", "--format", "bitbrains", str(bb), "--vms", "1-5", "--fast", "--topic", s.topic_metrics)
    assert f"{expected:,} of" in out
    values, _ = asyncio.run(read_back(s, s.topic_metrics, expected, timeout_s=30))
    batch = decode_messages(values, now=time.time())
    assert not batch.rejected
    assert len(batch) == expected
    got = pd.DataFrame({"vm": batch.vm, "ts": batch.ts})
    assert not got.duplicated().any()  # exactly once
    per_vm = got.groupby("vm").size().to_dict()
    assert per_vm == {vm: rows - dups for vm, (rows, dups) in counts.items()}
    assert got.groupby("vm")["ts"].apply(lambda t: t.is_monotonic_increasing).all()  # per-VM order kept
