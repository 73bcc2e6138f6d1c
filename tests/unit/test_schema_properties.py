"""Properties of the decoder: it never raises, and what it accepts is well-formed."""

from __future__ import annotations

import json

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streams.schema import METRICS, Limits, decode_messages, upper_bounds

NOW = 1_700_000_000.0
CONTROLS = "".join(map(chr, range(0x20))) + "\x7f"
id_text = st.text(st.characters(codec="utf-8", exclude_characters=CONTROLS), min_size=1, max_size=10)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
field_value = st.none() | st.booleans() | st.text(max_size=5) | st.integers(-10, 10**12) | st.floats(
    allow_nan=False, allow_infinity=False)
sample_like = st.fixed_dictionaries(
    {},
    optional={
        "vm": st.text(max_size=300) | st.integers(),
        "ts": st.floats(0, 4e9, allow_nan=False) | st.text(max_size=3),
        "host": st.text(max_size=5) | st.none(),
        **{m: field_value for m in METRICS},
        "zz": json_values,
    },
)


def check_batch(raws, batch):
    n = len(batch)
    assert batch.ts.shape == (n,) and batch.values.shape == (n, len(METRICS)) and batch.source.shape == (n,)
    assert len(batch.host) == n and batch.values.dtype == np.float32
    assert np.isfinite(batch.ts).all()
    assert (np.isnan(batch.values) | (batch.values >= 0)).all()
    assert (np.isnan(batch.values) | (batch.values <= upper_bounds(Limits()))).all()
    assert np.isfinite(np.nansum(batch.values, axis=1, dtype=np.float32)).all()  # no overflow downstream
    assert all(isinstance(v, str) and 1 <= len(v) <= 256 for v in batch.vm)
    assert not any(c in CONTROLS for s in batch.vm + batch.host for c in s)
    for r in batch.rejected:
        assert r.raw in raws and r.reason


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=200), max_size=5))
def test_never_raises_on_arbitrary_bytes(raws):
    batch = decode_messages(raws, now=NOW)
    check_batch(raws, batch)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(json_values | sample_like | st.lists(sample_like, max_size=4), max_size=5))
def test_never_raises_on_json_structures_and_accounts_for_every_message(docs):
    raws = [json.dumps(d).encode() for d in docs]
    batch = decode_messages(raws, now=NOW)
    check_batch(raws, batch)
    # each message either produced samples, or was rejected, or both (array with bad objects)
    produced = set(batch.source.tolist())
    rejected = {i for i, r in enumerate(raws) if any(x.raw is r for x in batch.rejected)}
    assert produced | rejected == set(range(len(raws)))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.fixed_dictionaries({
    "vm": id_text,
    "ts": st.floats(NOW - 1e8, NOW + 600, allow_nan=False),
    "cpu_pct": st.floats(0, 100, allow_nan=False),
    "dirty_mbps": st.floats(0, 1e6, allow_nan=False),
}), min_size=1, max_size=6))
def test_valid_samples_round_trip(objs):
    raw = json.dumps(objs).encode()
    b = decode_messages([raw], now=NOW)
    assert not b.rejected and b.vm == [o["vm"] for o in objs]
    assert np.array_equal(b.ts, [o["ts"] for o in objs])
    assert np.allclose(b.values[:, 0], [o["cpu_pct"] for o in objs], rtol=1e-6)


@settings(max_examples=200, deadline=None)
@given(id_text, st.integers(0, 10), st.sampled_from(CONTROLS), st.sampled_from(["vm", "host"]))
def test_a_control_character_anywhere_in_an_id_rejects_the_sample(text, at, control, name):
    bad = text[:at] + control + text[at:]
    objs = [{"vm": text, "ts": NOW}, {"vm": text, "ts": NOW, name: bad}]
    b = decode_messages([json.dumps(objs).encode()], now=NOW)
    assert b.vm == [text]
    assert b.rejected[0].reason == f"[1].{name}: must not contain control characters"
