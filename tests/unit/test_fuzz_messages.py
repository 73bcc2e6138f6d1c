"""The decoder against 10,000 seeded fuzz messages: every bad one rejected once, every good sample kept."""

from __future__ import annotations

import numpy as np
import pytest

from streams.schema import Limits, decode_messages
from tests.fuzz_messages import (
    BAD_KINDS, GOOD_KINDS, OBJECT_KINDS, VMS_PER_HOST, FuzzMessage, fuzz_messages, newest_per_vm,
)

NOW = 1_700_000_000.0
GOOD_VMS = [f"vm-{i:04d}" for i in range(200)]

# what the reason of each bad kind must say (any of these, in its first named failure)
REASONS = {
    "garbage": ("not JSON",), "truncated_json": ("not JSON",), "bad_json": ("not JSON",),
    "nan_literal": ("not JSON",), "top_level_scalar": ("expected a JSON object or array of objects",),
    "empty_array": ("empty array",), "oversized": ("message too large",), "mixed_array": ("[",),
    "wrong_type": ("expected",), "out_of_range": ("must be >= 0", "must be <= 100"),
    "huge_value": ("must be <=", "must be a finite number", "in the future"),
    "far_future": ("s in the future",), "far_past": ("is before 946684800",),
    "control_id": ("must not contain control characters",), "long_id": ("length must be <= 256",),
    "empty_id": ("vm: length must be >= 1",), "missing_field": ("required field missing",),
    "mem_over_total": ("> mem_total_mb",),
}


@pytest.fixture(scope="module")
def messages() -> list[FuzzMessage]:
    return fuzz_messages(10_000, seed=7, now=NOW, good_vms=GOOD_VMS)


@pytest.fixture(scope="module")
def decoded(messages):
    return decode_messages([m.value for m in messages], [m.key for m in messages], now=NOW, limits=Limits())


def test_every_bad_message_yields_exactly_one_rejection_with_its_bytes_and_key(messages, decoded):
    bad = [i for i, m in enumerate(messages) if m.bad]
    assert [r.index for r in decoded.rejected] == bad  # one each, in message order, none for good ones
    assert [r.raw for r in decoded.rejected] == [messages[i].value for i in bad]
    assert [r.key for r in decoded.rejected] == [messages[i].key for i in bad]
    assert all(r.reason for r in decoded.rejected)


def test_each_bad_kind_is_rejected_for_its_own_reason(messages, decoded):
    reasons = iter(decoded.rejected)
    for m in messages:
        if m.bad:
            first = next(reasons).reason.split("; ")[0]
            assert any(want in first for want in REASONS[m.kind]), (m.kind, first, m.value[:300])


def test_every_good_sample_comes_out_in_order(messages, decoded):
    expected = [(i, vm, ts) for i, m in enumerate(messages) for vm, ts in m.samples]
    assert list(zip(decoded.source.tolist(), decoded.vm, decoded.ts.tolist(), strict=True)) == expected
    assert np.isfinite(np.nansum(decoded.values, axis=1, dtype=np.float32)).all()
    mixed = [m for m in messages if m.kind == "mixed_array"]
    assert mixed and all(m.bad and m.samples for m in mixed)  # good objects of a bad array are good samples


def test_the_newest_good_sample_of_each_vm_is_known(messages, decoded):
    newest = newest_per_vm(messages)
    assert set(newest) == set(decoded.vm) <= set(GOOD_VMS)
    for vm, ts in zip(decoded.vm, decoded.ts.tolist(), strict=True):
        assert ts <= newest[vm]


def test_each_kind_occurs_and_about_the_share_asked_is_good(messages):
    kinds = {m.kind for m in messages}
    assert kinds == set(GOOD_KINDS) | set(BAD_KINDS) and set(OBJECT_KINDS) < set(BAD_KINDS)
    assert sum(not m.bad for m in messages) == 2000
    assert all(m.kind in GOOD_KINDS for m in messages if not m.bad)
    assert all(not m.samples for m in messages if m.bad and m.kind != "mixed_array")


def test_good_messages_look_like_an_agents(messages):
    for m in messages:
        if not m.bad:
            host = {f"fuzz-host-{GOOD_VMS.index(vm) // VMS_PER_HOST}".encode() for vm in m.vms}
            assert m.samples and set(m.vms) <= set(GOOD_VMS)
            assert host == {m.key}, "a message's VMs share one host and it is the key: one partition per VM"
            assert all(NOW - 3600 <= ts <= NOW + 300 for _, ts in m.samples)
    assert any(b"fuzz-host-" in m.value for m in messages if not m.bad)


def test_the_same_seed_gives_the_same_messages_and_another_seed_others():
    a = fuzz_messages(300, seed=3, now=NOW, good_vms=GOOD_VMS)
    assert a == fuzz_messages(300, seed=3, now=NOW, good_vms=GOOD_VMS)
    assert a != fuzz_messages(300, seed=4, now=NOW, good_vms=GOOD_VMS)


def test_good_share_is_a_parameter_and_every_kind_fits_in_a_small_run():
    msgs = fuzz_messages(100, seed=1, now=NOW, good_vms=["only"], good_share=0.5)
    assert sum(not m.bad for m in msgs) == 50
    assert {m.kind for m in msgs} == set(GOOD_KINDS) | set(BAD_KINDS)
    b = decode_messages([m.value for m in msgs], [m.key for m in msgs], now=NOW)
    assert len(b.rejected) == sum(m.bad for m in msgs) and len(b) == sum(len(m.samples) for m in msgs)
    with pytest.raises(ValueError):
        fuzz_messages(10, seed=1, now=NOW, good_vms=[])
