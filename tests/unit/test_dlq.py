"""DLQ records keep the original bytes and say why and when."""

from __future__ import annotations

from streams.dlq import dlq_records
from streams.schema import Rejected, decode_messages


def test_records_carry_original_bytes_key_and_reason_headers():
    raw = b'[{"vm": "a", "ts": 1700000000}, {"vm": "b", "ts": "x"}]'
    batch = decode_messages([raw, b"junk"], keys=[b"a", None], now=1_700_000_000)
    recs = dlq_records(batch.rejected, now=1_700_000_123.5)
    assert [(k, v) for k, v, _ in recs] == [(b"a", raw), (None, b"junk")]
    headers = dict(recs[0][2])
    assert headers["reason"] == b"[1].ts: expected number, got str"
    assert float(headers["zhuge-error-at"]) == 1_700_000_123.5


def test_long_reasons_are_cut_and_non_ascii_encoded():
    [(_, _, headers)] = dlq_records([Rejected(raw=b"x", key=None, reason="é" * 10_000)])
    reason = dict(headers)["reason"]
    assert 0 < len(reason) <= 4096
    assert dict(headers)["zhuge-error-at"]


def test_no_rejections_no_records():
    assert dlq_records([]) == []
