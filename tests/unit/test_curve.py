"""The per-VM curve blob: what the worker writes is what the API and the drain planner read."""

from __future__ import annotations

import json

import numpy as np
import pytest

from streams.curve import decode_curve, encode_curves
from streams.scorer import interp_weights

HORIZONS = np.array([1, 2, 4, 8, 12], dtype=np.int64)


def _curves(k: int = 3, n_slots: int = 12) -> tuple[list[bytes], dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    inputs = {
        "t0": 1_700_000_000.0 + 300.0 * np.arange(k),
        "downtime_ms": rng.uniform(20, 300, (k, n_slots)).astype(np.float32),
        "forecast": rng.uniform(0, 100, (k, len(HORIZONS), 3, 2)).astype(np.float32),
        "mem_mb": np.array([1024.0, 2048.0, 512.0])[:k],
        "wss_mb": np.array([256.0, np.nan, 64.0])[:k],
    }
    inputs["downtime_ms"][1, 5] = np.inf  # does not converge there
    blobs = encode_curves(inputs["t0"], 300, inputs["downtime_ms"], HORIZONS, inputs["forecast"],
                          inputs["mem_mb"], inputs["wss_mb"], np.array([1.0, 1.5, 0.8])[:k])  # fmt: skip
    return blobs, inputs


def test_a_curve_round_trips_at_float16_precision() -> None:
    blobs, inputs = _curves()
    curve = decode_curve(blobs[1])
    assert curve.t0 == inputs["t0"][1] and curve.slot_s == 300 and curve.factor == pytest.approx(1.5)
    assert curve.mem_mb == 2048.0 and np.isnan(curve.wss_mb)
    np.testing.assert_array_equal(curve.horizons, HORIZONS)
    finite = np.isfinite(inputs["downtime_ms"][1])
    np.testing.assert_allclose(curve.downtime_ms[finite], inputs["downtime_ms"][1][finite], rtol=1e-3)
    assert np.isinf(curve.downtime_ms[5])
    np.testing.assert_allclose(curve.forecast, inputs["forecast"][1], rtol=1e-3, atol=0.05)


def test_a_curve_stays_under_a_kilobyte_at_the_default_grid() -> None:
    blob = encode_curves(np.zeros(1), 300, np.zeros((1, 288)), np.arange(1, 18), np.zeros((1, 17, 3, 2)),
                         np.ones(1))[0]  # fmt: skip
    assert len(blob) == 846


def test_its_json_has_one_downtime_per_slot_and_null_for_never() -> None:
    curve = decode_curve(_curves()[0][1])
    doc = json.loads(json.dumps(curve.to_json(), allow_nan=False))
    assert len(doc["ts"]) == len(doc["downtime_ms"]) == 12
    assert doc["ts"][1] - doc["ts"][0] == 300 and doc["downtime_ms"][5] is None
    assert set(doc["forecast"]) == {"ts", "cpu_pct", "dirty_mbps", "net_mbps"}
    assert len(doc["forecast"]["dirty_mbps"]["q90"]) == len(HORIZONS)
    assert doc["forecast"]["ts"][0] == doc["t0"]  # horizon 1 is the first slot


def test_per_slot_interpolates_as_the_scorer_does() -> None:
    blobs, inputs = _curves()
    curve = decode_curve(blobs[0])
    lo, hi, w = interp_weights(HORIZONS, 12)
    q50, q90 = curve.forecast[:, 1, 0], curve.forecast[:, 1, 1]
    np.testing.assert_allclose(curve.per_slot("dirty_mbps", 0.5), q50[lo] * (1 - w) + q50[hi] * w)
    # the upper quantile between grid points is the larger neighbour (streams.scorer.per_slot_quantiles)
    np.testing.assert_allclose(curve.per_slot("dirty_mbps", 0.9), np.maximum(q90[lo], q90[hi]))


def test_anything_else_is_refused() -> None:
    blob = _curves()[0][0]
    with pytest.raises(ValueError, match="not a zhuge curve"):
        decode_curve(b"garbage")
    with pytest.raises(ValueError, match="header says"):
        decode_curve(blob[:-2])
