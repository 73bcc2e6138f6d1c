"""Every Grafana panel query returns data from a real Prometheus scraping a real worker.

A dashboard whose PromQL names a metric the worker never exports, or aggregates
a histogram wrongly, renders "No data" silently; this test makes that a failure.
A worker gets valid samples over a few slots plus invalid messages (so DLQ and
invalid rates have data) after Prometheus has scraped its zero state, in two
halves scored one after the other (so forecasts made on the first half are
realised by the second: the live-accuracy panels have data), then each
``targets[].expr`` of each panel is evaluated through ``/api/v1/query``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.prometheus import PrometheusProcess, PromQLError, find_prometheus, has_finite, sample_values
from app.settings import Settings
from app.worker_process import WorkerProcess
from tests.integration.worker_support import isolated_worker_settings, produce

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

DASHBOARD = Path(__file__).resolve().parents[2] / "ops" / "grafana" / "dashboards" / "zhuge.json"
IN_CI = bool(os.environ.get("CI"))
PROMETHEUS = find_prometheus()
if PROMETHEUS is None and not IN_CI:
    pytest.skip("prometheus binary not on PATH (apt-get install prometheus; .ci/run installs it)", allow_module_level=True)

RANGE = "1m"  # what Grafana's interval variables become here: >= 2 scrapes at 1 s
INTERVAL_VARS = {
    "__rate_interval": RANGE, "__interval": RANGE, "__auto_interval": RANGE, "__range": RANGE,
    "__interval_ms": "60000", "__range_s": "60", "__range_ms": "60000",
}  # fmt: skip
METRIC_NAME = re.compile(r"\bzhuge_[A-Za-z0-9_]+")
VMS = 6
SLOTS = 6


# --------------------------------------------------------------------- dashboard
def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """All panels, including those nested in collapsed rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panels(panel)


def substitute(expr: str, dashboard: dict[str, Any]) -> str:
    """Grafana variables -> concrete PromQL: interval builtins to ``1m``, template variables to ``.*``."""
    names = [*INTERVAL_VARS, *(v["name"] for v in dashboard.get("templating", {}).get("list", []))]
    for name in sorted(names, key=len, reverse=True):  # $__range_s before $__range
        value = INTERVAL_VARS.get(name, ".*")
        n = re.escape(name)
        expr = re.sub(rf"\$\{{{n}(:[^}}]*)?\}}|\[\[{n}\]\]|\${n}\b", value, expr)  # ${x}, ${x:fmt}, [[x]], $x
    return expr


def dashboard_queries() -> list[tuple[str, str]]:
    """``(panel title, PromQL)`` for every target of every panel, variables substituted."""
    dashboard = json.loads(DASHBOARD.read_text())
    out: list[tuple[str, str]] = []
    for panel in panels(dashboard):
        if panel.get("type") in ("row", "text"):
            continue
        targets = [t for t in panel.get("targets", []) if not t.get("hide")]
        assert targets, f"panel {panel.get('title')!r} has no query"
        for t in targets:
            assert t.get("expr"), f"panel {panel.get('title')!r} target {t.get('refId')} has no expr"
            expr = substitute(t["expr"], dashboard)
            assert "$" not in expr and "[[" not in expr, f"panel {panel.get('title')!r}: unknown variable left in {expr!r}"
            out.append((panel.get("title", "(untitled)"), expr))
    return out


def test_substitute_replaces_interval_and_template_variables() -> None:
    dash = {"templating": {"list": [{"name": "instance"}]}}
    assert substitute('rate(x{instance=~"$instance"}[$__rate_interval])', dash) == 'rate(x{instance=~".*"}[1m])'
    assert substitute("increase(x[${__range}]) / $__range_s", dash) == "increase(x[1m]) / 60"


# --------------------------------------------------------------------- traffic
def contract_messages(now: float) -> tuple[list[tuple[bytes, bytes]], list[tuple[bytes, bytes]]]:
    """(valid, invalid): VMS VMs x SLOTS samples, one per 5-minute slot ending now; two rejects."""
    valid: list[tuple[bytes, bytes]] = []
    for s in range(SLOTS):
        ts = now - (SLOTS - 1 - s) * 300.0
        for i in range(VMS):
            msg = {
                "vm": f"vm-{i}", "ts": ts, "host": f"h{i % 2}", "cpu_pct": 10.0 + 5 * i + s,
                "mem_total_mb": 8192.0, "mem_used_mb": 2048.0 + 100 * s, "net_rx_kbps": 500.0, "net_tx_kbps": 300.0,
                "vcpus": 4.0,
            }  # fmt: skip
            valid.append((msg["vm"].encode(), json.dumps(msg).encode()))
    invalid = [
        (b"vm-0", b"{not json"),
        (b"vm-1", json.dumps({"vm": "vm-1", "ts": now, "cpu_pct": 250.0}).encode()),  # cpu over 100 %
    ]
    return valid, invalid


# --------------------------------------------------------------------- the test
@pytest.fixture
def worker_settings(unique_topics: Settings, tmp_path: Path) -> Settings:
    return isolated_worker_settings(unique_topics, tmp_path, partitions=2, batch_within_s=0.2, accuracy_sample=1.0)


def _total(prom: PrometheusProcess, metric: str) -> float:
    return sum(sample_values(prom.query(f"sum({metric})")))


def test_every_dashboard_query_returns_data_from_a_scraped_worker(worker_settings: Settings, tmp_path: Path) -> None:
    if PROMETHEUS is None:
        pytest.fail("prometheus binary not on PATH under CI (.ci/run should install it)", pytrace=False)
    queries = dashboard_queries()
    assert queries, f"no queries found in {DASHBOARD}"

    worker = WorkerProcess.start(worker_settings, tmp_path / "worker.log", ready_timeout=60)
    prom: PrometheusProcess | None = None
    try:
        prom = PrometheusProcess.start([f"127.0.0.1:{worker.metrics_port}"], tmp_path / "prometheus", binary=PROMETHEUS)
        # The zero state must be scraped first, or rate()/histogram_quantile() have no increase to show.
        prom.wait_for("zhuge_samples_in_total", lambda d: d["result"], timeout=15, what="first scrape of the worker")

        valid, invalid = contract_messages(time.time())
        asyncio.run(produce(worker_settings, valid[: len(valid) // 2] + invalid[:1]))
        deadline = time.monotonic() + 60  # (includes training the session's bootstrap model when this test runs first)
        while worker.counter("zhuge_vms_scored_total") < VMS:  # the first half's forecasts are made...
            assert time.monotonic() < deadline, f"first half not scored:\n{worker.tail()}"
            time.sleep(0.2)
        asyncio.run(produce(worker_settings, valid[len(valid) // 2 :] + invalid[1:]))  # ...and realised here

        # Processing includes training the session's bootstrap model when this test runs first.
        deadline = time.monotonic() + 60
        while not (
            _total(prom, "zhuge_samples_in_total") >= len(valid)
            and _total(prom, "zhuge_dlq_total") >= len(invalid)
            and _total(prom, "zhuge_vms_scored_total") >= VMS
            and _total(prom, "zhuge_forecast_abs_error_count") > 0
            and prom.query("count(zhuge_consumer_lag)")["result"]  # refreshed every 5 s (app.ingest.LAG_EVERY_S)
        ):
            assert time.monotonic() < deadline, f"worker traffic not visible in Prometheus:\n{worker.tail()}"
            assert worker.proc.poll() is None, f"worker died:\n{worker.tail()}"
            time.sleep(0.5)
        time.sleep(2.5)  # two more scrapes: every rate() window ends on the settled counters

        failures: list[str] = []
        for title, expr in queries:
            # ``x or vector(0)`` always answers: the metric itself must exist too.
            for metric in sorted(set(METRIC_NAME.findall(expr))):
                if not prom.query(f'count({{__name__="{metric}"}})')["result"]:
                    failures.append(f"panel {title!r}: query {expr!r} names {metric}, which the worker does not export")
            try:
                data = prom.query(expr)
            except PromQLError as exc:
                failures.append(f"panel {title!r}: query {expr!r} failed: {exc}")
                continue
            if not sample_values(data):
                failures.append(f"panel {title!r}: query {expr!r} returned no series")
            elif not has_finite(data):
                failures.append(f"panel {title!r}: query {expr!r} returned only NaN/Inf: {data['result']}")
        assert not failures, "dashboard queries without data:\n" + "\n".join(failures)
    finally:
        if prom is not None:
            prom.stop()
        assert worker.stop() == 0, worker.tail()
