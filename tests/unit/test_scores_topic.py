"""vm.scores records: key = VM id, value = the contract's JSON, decodable back to the batch."""

from __future__ import annotations

import json

import numpy as np

from streams.scores import SCORE_FIELDS, ScoreBatch
from streams.sinks.scores_topic import score_records


def make_batch(n: int, *, seed: int = 0) -> ScoreBatch:
    rng = np.random.default_rng(seed)
    start = 1.7e9 + rng.integers(0, 288, n) * 300.0
    later = start + rng.integers(0, 288, n) * 300.0
    return ScoreBatch(
        vm=[f"vm-{i}" if i % 3 else f"vm-ünï\n{i}" for i in range(n)],  # non-ASCII and newline in ids survive
        host=[f"h{i % 7}" for i in range(n)],
        best_start=start,
        best_end=start + 300.0,
        best_downtime_ms=rng.uniform(20, 300, n).astype(np.float32),
        p_ok=rng.uniform(0, 1, n).astype(np.float32),
        window_rule=np.asarray(["now", "fits", "minimum"])[rng.integers(0, 3, n)],
        min_start=later,
        min_end=later + 600.0,
        min_downtime_ms=rng.uniform(20, 300, n).astype(np.float32),
        min_p_ok=rng.uniform(0, 1, n).astype(np.float32),
        now_downtime_ms=rng.uniform(20, 3000, n).astype(np.float32),
        now_p_ok=rng.uniform(0, 1, n).astype(np.float32),
        now_total_s=rng.uniform(5, 500, n).astype(np.float32),
        downtime_factor=rng.choice([1.0, 1.25], n).astype(np.float32),
        last_ts=1.7e9 - rng.uniform(0, 600, n),
        model="m-20260101-abc",
        updated=1.7e9 + 1.5,
    )


def test_records_roundtrip_to_the_batch_fields():
    batch = make_batch(50)
    out = score_records(batch)
    assert len(out) == len(batch)
    for (key, value), rec in zip(out, batch.records()):
        decoded = json.loads(value)
        assert key.decode("utf-8") == rec["vm"] == decoded["vm"]
        assert list(decoded) == list(SCORE_FIELDS)
        assert decoded == rec
    rec = batch.records()[4]
    assert rec["window_rule"] == batch.window_rule[4] and isinstance(rec["window_rule"], str)
    assert (rec["min_start"], rec["min_end"]) == (batch.min_start[4], batch.min_end[4])
    assert rec["min_downtime_ms"] == round(float(batch.min_downtime_ms[4]), 3)
    assert rec["min_p_ok"] == round(float(batch.min_p_ok[4]), 4) and rec["now_p_ok"] == round(float(batch.now_p_ok[4]), 4)
    assert rec["now_total_s"] == round(float(batch.now_total_s[4]), 3)
    assert rec["downtime_factor"] == round(float(batch.downtime_factor[4]), 4)


def test_non_finite_downtime_becomes_json_null():
    batch = make_batch(3)
    batch.now_downtime_ms[1] = np.inf  # pre-copy that never converges
    batch.best_downtime_ms[2] = np.nan
    batch.min_downtime_ms[1] = np.inf
    batch.now_total_s[2] = np.nan
    values = [json.loads(v) for _, v in score_records(batch)]
    assert values[1]["now_downtime_ms"] is None and values[1]["min_downtime_ms"] is None
    assert values[2]["best_downtime_ms"] is None and values[2]["now_total_s"] is None
    assert values[0]["now_downtime_ms"] == round(float(batch.now_downtime_ms[0]), 3)


def test_empty_batch_gives_no_records():
    assert score_records(make_batch(0)) == []
