"""The input contract: what is accepted, what is rejected and why."""

from __future__ import annotations

import json

import numpy as np
import pytest

from app.settings import Settings
from streams.schema import METRICS, Limits, decode_messages, has_control, limits_from_settings

NOW = 1_700_000_000.0


def msg(**fields) -> bytes:
    return json.dumps({"vm": "vm-1", "ts": NOW - 60, **fields}).encode()


def reason_of(raw: bytes, **kw) -> str:
    batch = decode_messages([raw], now=NOW, **kw)
    assert len(batch) == 0 and len(batch.rejected) == 1, batch
    assert batch.rejected[0].raw == raw
    return batch.rejected[0].reason


def test_full_sample_decodes_into_columns():
    fields = {m: float(i + 1) for i, m in enumerate(METRICS)}
    fields.update(cpu_pct=42.5, mem_total_mb=4096.0, mem_used_mb=1024.0)
    b = decode_messages([msg(host="h1", **fields)], now=NOW)
    assert b.vm == ["vm-1"] and b.host == ["h1"] and not b.rejected
    assert b.ts.dtype == np.float64 and b.ts[0] == NOW - 60
    assert b.values.dtype == np.float32 and b.values.shape == (1, len(METRICS))
    assert b.values[0].tolist() == [fields[m] for m in METRICS]
    assert b.source.dtype == np.int32 and b.source.tolist() == [0]


def test_missing_and_null_fields_are_nan_and_unknown_fields_ignored():
    b = decode_messages([msg(cpu_pct=5, net_rx_kbps=None, extra={"a": [1, 2]}, other="x")], now=NOW)
    assert not b.rejected and b.host == [""]
    row = dict(zip(METRICS, b.values[0].tolist()))
    assert row["cpu_pct"] == 5
    assert all(np.isnan(row[m]) for m in METRICS if m != "cpu_pct")


@pytest.mark.parametrize(
    "raw, expected",
    [
        (b"\x00garbage", "not JSON"),
        (b"", "not JSON"),
        (b"42", "expected a JSON object or array of objects"),
        (b"[]", "empty array"),
        (json.dumps({"ts": NOW}).encode(), "vm: required field missing"),
        (json.dumps({"vm": "a"}).encode(), "ts: required field missing"),
        (json.dumps({"vm": "", "ts": NOW}).encode(), "vm: length must be >= 1"),
        (json.dumps({"vm": "v" * 257, "ts": NOW}).encode(), "vm: length must be <= 256"),
        (json.dumps({"vm": 7, "ts": NOW}).encode(), "vm: expected str, got int"),
        (json.dumps({"vm": "a", "ts": "yesterday"}).encode(), "ts: expected number, got str"),
        (json.dumps({"vm": "a", "ts": True}).encode(), "ts: expected number, got bool"),
        (msg(cpu_pct=100.5), "cpu_pct: must be <= 100"),
        (msg(cpu_pct=-1), "cpu_pct: must be >= 0"),
        (msg(dirty_mbps=-0.5), "dirty_mbps: must be >= 0"),
        (msg(vcpus="4"), "vcpus: expected number"),
        (b'{"vm": "a", "ts": 1700000000, "cpu_pct": NaN}', "not JSON"),
        (b'{"vm": "a", "ts": 1700000000, "cpu_pct": Infinity}', "not JSON"),
        (b'{"vm": "a", "ts": 1700000000, "net_rx_kbps": 1e999}', "net_rx_kbps: must be a finite number"),
        (msg(net_tx_kbps=1e39), "net_tx_kbps: must be <= 1000000000"),
        (msg(mem_used_mb=3e38), "mem_used_mb: must be <= 16777216"),
        (msg(mem_total_mb=2.0**24 + 1), "mem_total_mb: must be <= 16777216"),
        (msg(dirty_mbps=1e6 + 1), "dirty_mbps: must be <= 1000000"),
        (msg(net_rx_kbps=1e300), "net_rx_kbps: must be <= 1000000000"),
        (msg(disk_read_kbps=2e9), "disk_read_kbps: must be <= 1000000000"),
        (msg(disk_write_kbps=1e38), "disk_write_kbps: must be <= 1000000000"),
        (msg(vcpus=4097), "vcpus: must be <= 4096"),
        (msg(vm="vm-1\u0000"), "vm: must not contain control characters"),
        (msg(vm="vm\u0001-1"), "vm: must not contain control characters"),
        (msg(vm="vm-1\n"), "vm: must not contain control characters"),
        (msg(vm="vm-1\u007f"), "vm: must not contain control characters"),
        (msg(host="h1\u001f"), "host: must not contain control characters"),
        (json.dumps({"vm": "a", "ts": 900_000_000}).encode(), "ts: 900000000 is before"),
        (json.dumps({"vm": "a", "ts": NOW + 2 * 86400}).encode(), "in the future"),
        (json.dumps({"vm": "a", "ts": NOW + 601}).encode(), "ts: 1700000601 is more than 600 s in the future"),
        (msg(mem_total_mb=1000, mem_used_mb=1100), "mem_used_mb: 1100 > mem_total_mb 1000"),
    ],
)
def test_each_invalid_kind_has_a_specific_reason(raw, expected):
    assert expected in reason_of(raw)


def test_oversized_message_rejected_before_parsing():
    raw = msg(pad="x" * 2000)
    assert "too large" in reason_of(raw, limits=Limits(max_bytes=1000))
    assert len(decode_messages([raw], now=NOW, limits=Limits(max_bytes=4000))) == 1


def test_future_limit_defaults_to_ten_minutes():
    assert Limits().max_future_s == 600.0
    assert len(decode_messages([json.dumps({"vm": "a", "ts": NOW + 600}).encode()], now=NOW)) == 1
    assert len(decode_messages([json.dumps({"vm": "a", "ts": NOW + 3600}).encode()], now=NOW)) == 0


def test_limits_from_settings_takes_the_workers_future_limit():
    assert limits_from_settings(Settings()) == Limits(max_future_s=Settings().max_future_s)
    limits = limits_from_settings(Settings(max_future_s=86400.0))
    assert limits.max_future_s == 86400.0 and limits.max_bytes == Limits().max_bytes
    raw = json.dumps({"vm": "a", "ts": NOW + 3600}).encode()
    assert len(decode_messages([raw], now=NOW, limits=limits)) == 1


def test_time_limits_are_parameters():
    raw = json.dumps({"vm": "a", "ts": NOW + 3 * 86400}).encode()
    assert len(decode_messages([raw], now=NOW, limits=Limits(max_future_s=4 * 86400))) == 1
    old = json.dumps({"vm": "a", "ts": 100.0}).encode()
    assert len(decode_messages([old], now=NOW, limits=Limits(min_ts=0))) == 1


def test_upper_bounds_are_inclusive_and_parameters():
    at_bounds = msg(mem_total_mb=2.0**24, mem_used_mb=2.0**24, dirty_mbps=1e6, net_rx_kbps=1e9, net_tx_kbps=1e9,
                    disk_read_kbps=1e9, disk_write_kbps=1e9, vcpus=4096)
    assert len(decode_messages([at_bounds], now=NOW)) == 1
    big = msg(dirty_mbps=5e6)
    assert len(decode_messages([big], now=NOW, limits=Limits(max_dirty_mbps=1e7))) == 1
    assert "net_rx_kbps: must be <= 10" in reason_of(msg(net_rx_kbps=11), limits=Limits(max_net_kbps=10))
    assert "disk_write_kbps: must be <= 10" in reason_of(msg(disk_write_kbps=11), limits=Limits(max_disk_kbps=10))
    assert "mem_total_mb: must be <= 10" in reason_of(msg(mem_total_mb=11), limits=Limits(max_mem_mb=10))
    assert "vcpus: must be <= 8" in reason_of(msg(vcpus=9), limits=Limits(max_vcpus=8))


def test_without_an_upper_bound_float32_still_caps_values():
    limits = Limits(max_net_kbps=float("inf"))
    assert "net_tx_kbps: too large for float32" in reason_of(msg(net_tx_kbps=1e39), limits=limits)
    b = decode_messages([msg(net_tx_kbps=1e38)], now=NOW, limits=limits)
    assert len(b) == 1 and np.isfinite(b.values[0, METRICS.index("net_tx_kbps")])


def test_values_that_would_overflow_float32_arithmetic_are_rejected():
    b = decode_messages([msg(**{m: 1e300 for m in METRICS if m != "cpu_pct"}), msg(mem_used_mb=3e38)], now=NOW)
    assert len(b) == 0 and len(b.rejected) == 2


def test_control_characters_in_an_array_name_the_index_and_keep_the_rest():
    objs = [{"vm": "vm-1", "ts": NOW}, {"vm": "vm-1\u0000", "ts": NOW}, {"vm": "vm-2", "host": "h\u007f", "ts": NOW}]
    raw = json.dumps(objs).encode()
    b = decode_messages([raw], now=NOW)
    assert b.vm == ["vm-1"]
    [rej] = b.rejected
    assert rej.reason == "[1].vm: must not contain control characters; [2].host: must not contain control characters"


def test_nul_terminated_id_never_merges_into_the_plain_one():
    b = decode_messages([msg(vm="vm-1"), msg(vm="vm-1\u0000")], now=NOW)
    assert b.vm == ["vm-1"] and b.source.tolist() == [0]


@pytest.mark.parametrize(
    ("strings", "expected"),
    [
        ([], []),
        (["a", "", "b"], [False, False, False]),
        (["ok", "x\x00", "\x1f", "fine", "\x7f", "é\x01", "\u2028", " \t"],
         [False, True, True, False, True, True, False, True]),
        (["é" * 300, "a\x00"], [False, True]),
    ],
)
def test_has_control_flags_exactly_the_strings_holding_one(strings, expected):
    assert has_control(strings).tolist() == expected


def test_memory_tolerance_lets_small_overshoot_through():
    ok = msg(mem_total_mb=1000, mem_used_mb=1010)
    assert len(decode_messages([ok], now=NOW)) == 1
    assert len(decode_messages([ok], now=NOW, limits=Limits(mem_over_tolerance=0.0))) == 0


def test_batch_with_one_bad_object_keeps_the_good_ones():
    objs = [{"vm": f"vm-{i}", "ts": NOW, "cpu_pct": 10 + i} for i in range(5)]
    objs[3]["cpu_pct"] = 150
    raw = json.dumps(objs).encode()
    b = decode_messages([msg(), raw], keys=[b"k0", b"k1"], now=NOW)
    assert b.vm == ["vm-1", "vm-0", "vm-1", "vm-2", "vm-4"]
    assert b.source.tolist() == [0, 1, 1, 1, 1]
    assert b.values[:, 0].tolist()[1:] == [10, 11, 12, 14]
    [rej] = b.rejected
    assert rej.raw == raw and rej.key == b"k1" and rej.reason == "[3].cpu_pct: must be <= 100" and rej.index == 1


def test_range_failure_inside_an_array_names_its_index():
    objs = [{"vm": "a", "ts": NOW}, {"vm": "b", "ts": NOW, "mem_total_mb": 10, "mem_used_mb": 20}]
    b = decode_messages([json.dumps(objs).encode()], now=NOW)
    assert b.vm == ["a"]
    assert b.rejected[0].reason.startswith("[1].mem_used_mb")


def test_several_bad_objects_one_rejection_naming_each():
    raw = json.dumps([{"vm": "a"}, 5, {"vm": "c", "ts": NOW}]).encode()
    b = decode_messages([raw], now=NOW)
    assert b.vm == ["c"]
    [rej] = b.rejected
    assert "[0].ts: required field missing" in rej.reason and "[1]: expected object" in rej.reason


def test_non_bytes_values_are_rejected_not_raised():
    b = decode_messages([None, msg()], now=NOW)  # type: ignore[list-item]
    assert b.vm == ["vm-1"] and b.source.tolist() == [1]
    assert b.rejected[0].raw == b"" and "no value" in b.rejected[0].reason


def test_empty_input_gives_empty_columns():
    b = decode_messages([], now=NOW)
    assert len(b) == 0 and b.values.shape == (0, len(METRICS)) and b.ts.shape == (0,) and b.source.shape == (0,)
