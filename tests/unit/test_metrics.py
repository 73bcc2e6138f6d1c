"""WorkerMetrics: every series exported from the start, served over HTTP, bulk observations exact."""

from __future__ import annotations

import math
import time
import urllib.request

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.parser import text_string_to_metric_families

from app.metrics import LAG_BUCKETS, WorkerMetrics, observe_many, start_http_server

EXPECTED = {
    "zhuge_samples_in": "counter",
    "zhuge_samples_invalid": "counter",
    "zhuge_dlq": "counter",
    "zhuge_vms_scored": "counter",
    "zhuge_model_rejected": "counter",
    "zhuge_samples_late_dropped": "counter",
    "zhuge_redis_errors": "counter",
    "zhuge_batch_size": "histogram",
    "zhuge_batch_latency_seconds": "histogram",
    "zhuge_end_to_end_lag_seconds": "histogram",
    "zhuge_redis_write_seconds": "histogram",
    "zhuge_consumer_lag": "gauge",
    "zhuge_model_version_info": "gauge",
    "zhuge_model_age_seconds": "gauge",
    "zhuge_window_store_vms": "gauge",
    "zhuge_window_store_bytes": "gauge",
    "zhuge_device_info": "gauge",
}


def scrape(port: int) -> dict[str, object]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


@pytest.fixture
def served():
    m = WorkerMetrics()
    server = start_http_server(0, m.registry, addr="127.0.0.1")
    yield m, server
    server.close()


def test_served_metrics_have_every_family_before_any_event(served):
    m, server = served
    assert server.port > 0
    families = scrape(server.port)
    for name, kind in EXPECTED.items():
        assert name in families, f"{name} missing from /metrics"
        assert families[name].type == kind
    # dashboard panels need a sample per referenced series even before the first event
    for name in ("zhuge_samples_in", "zhuge_batch_latency_seconds", "zhuge_model_version_info", "zhuge_device_info"):
        assert families[name].samples, name
    version = [s for s in families["zhuge_model_version_info"].samples]
    assert [(s.labels, s.value) for s in version] == [({"version": "none"}, 1.0)]
    assert math.isnan(families["zhuge_model_age_seconds"].samples[0].value)


def test_recorded_values_show_up_in_the_scrape(served):
    m, server = served
    m.samples_in.inc(120)
    m.batch_size.observe(120)
    m.set_model("v7", created_ts=1_000.0)
    m.set_model("v8", created_ts=None)
    m.set_model("v9", created_ts=time.time() - 60)
    m.set_device("gpu", "nvforest")
    m.set_consumer_lag({0: 5, 3: 9})
    m.set_consumer_lag({3: 2})
    f = scrape(server.port)
    assert f["zhuge_samples_in"].samples[0].value == 120
    assert [s.labels["version"] for s in f["zhuge_model_version_info"].samples] == ["v9"]
    assert 59 <= f["zhuge_model_age_seconds"].samples[0].value < 120
    assert [s.labels for s in f["zhuge_device_info"].samples] == [{"device": "gpu", "engine": "nvforest"}]
    assert [(s.labels["partition"], s.value) for s in f["zhuge_consumer_lag"].samples] == [("3", 2.0)]
    count = [s for s in f["zhuge_batch_size"].samples if s.name == "zhuge_batch_size_count"]
    assert count[0].value == 1


def test_own_registries_do_not_collide():
    a, b = WorkerMetrics(), WorkerMetrics(CollectorRegistry())
    a.vms_scored.inc(3)
    assert b.registry.get_sample_value("zhuge_vms_scored_total") == 0
    assert a.registry.get_sample_value("zhuge_vms_scored_total") == 3


def test_observe_many_matches_one_observe_per_value():
    rng = np.random.default_rng(1)
    lags = np.concatenate([rng.exponential(30.0, 5000), LAG_BUCKETS[:5], [np.nan, np.inf, 1e6]])
    bulk_reg, loop_reg = CollectorRegistry(), CollectorRegistry()
    bulk = Histogram("h", "h", buckets=LAG_BUCKETS, registry=bulk_reg)
    loop = Histogram("h", "h", buckets=LAG_BUCKETS, registry=loop_reg)
    observe_many(bulk, lags)
    for v in lags[np.isfinite(lags)]:
        loop.observe(float(v))
    for le in [*map(str, LAG_BUCKETS), "+Inf"]:
        assert bulk_reg.get_sample_value("h_bucket", {"le": le}) == loop_reg.get_sample_value("h_bucket", {"le": le}), le
    assert bulk_reg.get_sample_value("h_sum") == pytest.approx(loop_reg.get_sample_value("h_sum"))
    assert bulk_reg.get_sample_value("h_count") == np.isfinite(lags).sum()


def test_every_dashboard_query_references_exported_series():
    """Each panel expr only names series a fresh WorkerMetrics already exports (so it returns data)."""
    import json
    import re
    from pathlib import Path

    dashboard = json.loads((Path(__file__).resolve().parents[2] / "ops/grafana/dashboards/zhuge.json").read_text())
    exported = {s.name for fam in WorkerMetrics().registry.collect() for s in fam.samples}
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 12
    for expr in exprs:
        names = set(re.findall(r"\bzhuge_[a-z0-9_]+", expr))
        assert names, expr
        if not expr.endswith(" or vector(0)"):  # the fallback is how a series absent until partitions are assigned still returns data
            assert names <= exported, f"{expr}: {names - exported} not exported"
        for window in re.findall(r"\[(\d+)([smh])\]", expr):
            assert int(window[0]) * {"s": 1, "m": 60, "h": 3600}[window[1]] >= 60, expr


def test_model_weight_says_where_the_naive_forecast_is_served(served):
    from dataclasses import replace
    from types import SimpleNamespace

    from gpu_kernels.features import TARGETS
    from training.blend import Blend
    from training.model import default_horizons

    m, server = served
    h = tuple(int(x) for x in default_horizons(288))
    far = [1.0 if x * 300 <= 6 * 3600 else 0.0 for x in h]  # the naive forecast alone beyond 6 h
    partner = tuple("mean" if x * 300 > 12 * 3600 else "last" for x in h)  # the day's mean from 12 h on
    blend = Blend(h, {t: tuple(far) for t in TARGETS}, {t: partner for t in TARGETS}, {t: (1.0,) * 3 for t in TARGETS})
    m.set_blend(SimpleNamespace(blend=replace(blend, window_quantile=0.5), slot_s=300))
    assert scrape(server.port)["zhuge_model_window_quantile"].samples[0].value == 0.5
    got = {(s.labels["target"], s.labels["bucket"]): s.value for s in scrape(server.port)["zhuge_model_weight"].samples}
    assert got[("cpu_pct", "1h")] == 1.0 and got[("cpu_pct", "6h")] == 1.0 and got[("net_mbps", "24h")] == 0.0
    share = {(s.labels["target"], s.labels["bucket"], s.labels["naive"]): s.value
             for s in scrape(server.port)["zhuge_model_partner"].samples}  # fmt: skip
    at_24h = [x for x in h if 6 * 3600 < x * 300 <= 24 * 3600]  # 8 h .. 24 h: 96 .. 288 slots
    assert share[("cpu_pct", "1h", "last")] == 1.0 and share[("cpu_pct", "1h", "mean")] == 0.0
    assert share[("dirty_mbps", "24h", "mean")] == pytest.approx(sum(x * 300 > 12 * 3600 for x in at_24h) / len(at_24h))
    m.set_blend(SimpleNamespace(blend=None, slot_s=300))  # boosters alone
    assert all(s.value == 1.0 for s in scrape(server.port)["zhuge_model_weight"].samples)
    assert scrape(server.port)["zhuge_model_window_quantile"].samples[0].value == 0.9
    assert "zhuge_model_partner" not in scrape(server.port) or not scrape(server.port)["zhuge_model_partner"].samples
