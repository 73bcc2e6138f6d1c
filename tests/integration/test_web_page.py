"""The web page served by `zhuge api`, in headless Chromium, against a real API, worker, Kafka and Redis.

The ``api_fleet`` fixture (tests/integration/conftest.py) gives a running API on loopback
(``.url``), a scored VM with a curve (``.vm``), a host with >= 20 VMs (``.host``), the VM's
Redis hash (``.redis_hash(vm)``) and ``.target_ms``; an optional ``.token`` is the bearer
token when the API requires one. Each view is checked against the API's own JSON and
against Redis, its charts must have pixels, it must log no console error and load
nothing from another origin. Screenshots go to ``$ZHUGE_SCREENSHOT_DIR``
(default artifacts/screenshots): fleet.png, vm.png, host.png.
"""

from __future__ import annotations

import json
import math
import os
import re
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote

import pytest

from tests import browser

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

_MISSING = browser.missing_browser()
if _MISSING is not None and os.environ.get("ZHUGE_REQUIRE_BROWSER") != "1":
    # Before any fixture: no API fleet is started for tests that cannot run.
    pytest.skip(f"browser tests: {_MISSING}", allow_module_level=True)

CANDIDATES_N = 20  # what the fleet view asks for (app.js CANDIDATES_N)
MIN_INK = 0.01  # fraction of a chart canvas's pixels that must be painted


@pytest.fixture(scope="module")
def driver() -> Iterator[Any]:
    d = browser.start_browser()
    try:
        yield d
    finally:
        d.quit()


# ------------------------------------------------------------------ helpers
def token_of(fleet: Any) -> str | None:
    return getattr(fleet, "token", None)


def get_json(fleet: Any, path: str) -> Any:
    """GET the API's JSON the way the page does (with the bearer token when there is one)."""
    request = urllib.request.Request(fleet.url.rstrip("/") + path, headers={"Accept": "application/json"})
    if token_of(fleet):
        request.add_header("Authorization", f"Bearer {token_of(fleet)}")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def open_view(driver: Any, fleet: Any, route: str) -> None:
    """Loads the page afresh at ``#route`` (about:blank first: a fragment-only change would not reload)."""
    driver.get("about:blank")
    browser.console_entries(driver)  # drop what earlier pages logged
    fragment = route + (f"?token={quote(token_of(fleet))}" if token_of(fleet) else "")
    driver.get(f"{fleet.url.rstrip('/')}/#{fragment}")


def text(driver: Any, selector: str) -> str:
    return driver.find_element("css selector", selector).text.strip()


def ms_value(s: str) -> float:
    """A downtime the page shows as a bare number of ms, or "never" (does not converge)."""
    return math.inf if s.strip() == "never" else float(s.replace(",", "").replace("ms", "").strip())


def finite_float(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def utc_minute(ts: float) -> str:
    """The page's UTC format, truncated to the minute like the page: "2026-12-01 14:05Z"."""
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d %H:%MZ")


def assert_chart_drawn(driver: Any, selector: str) -> dict[str, Any]:
    ink = browser.canvas_ink(driver, selector)
    assert ink is not None, f"{selector} is not on the page"
    assert ink["width"] > 0 and ink["height"] > 0, f"{selector} has no size: {ink}"
    assert ink["fraction"] >= MIN_INK, f"{selector} is (nearly) blank: {ink}"
    return ink


def chart_dataset_lengths(driver: Any, selector: str) -> dict[str, int]:
    """Chart.js's own view of the chart on a canvas: dataset label -> number of points."""
    return driver.execute_script(
        "const c = Chart.getChart(document.querySelector(arguments[0]));"
        "return c ? Object.fromEntries(c.data.datasets.map(d => [d.label, d.data.length])) : null;",
        selector,
    )


def assert_console_clean(driver: Any, allow: tuple[str, ...] = ()) -> None:
    errors = browser.console_errors(driver, allow=allow)
    assert not errors, "SEVERE errors in the browser console:\n" + "\n".join(errors)


# ------------------------------------------------------------------ tests
def test_fleet_view_counts_and_candidates(driver: Any, api_fleet: Any) -> None:
    open_view(driver, api_fleet, "/")
    browser.wait_ready(driver, "fleet")
    fleet = get_json(api_fleet, "/v1/fleet")
    candidates = get_json(api_fleet, f"/v1/candidates?n={CANDIDATES_N}")["candidates"]

    shown = {k: int(text(driver, f"#fleet-{k}")) for k in ("vms", "now", "window", "never")}
    assert shown["now"] + shown["window"] + shown["never"] == shown["vms"], shown
    assert shown == {
        "vms": fleet["vms"], "now": fleet["now_within_target"],
        "window": fleet["window_within_target"], "never": fleet["not_at_all"],
    }, (shown, fleet)  # fmt: skip

    rows = driver.find_elements("css selector", "table#candidates tbody tr")
    assert len(rows) == min(CANDIDATES_N, fleet["vms"]) == len(candidates), (len(rows), fleet["vms"], len(candidates))
    first_cells = [r.find_element("css selector", "td").text.strip() for r in rows]
    assert first_cells == [c["vm"] for c in candidates]
    downtimes = [finite_float(r.get_attribute("data-now-downtime-ms")) for r in rows]
    ordered = [math.inf if d is None else d for d in downtimes]
    assert ordered == sorted(ordered), f"candidates not best first: {ordered}"

    hosts = [h.text.strip() for h in driver.find_elements("css selector", "table#hosts tbody tr td:first-child")]
    assert api_fleet.host in hosts, hosts
    browser.screenshot(driver, "fleet.png")
    assert_console_clean(driver)


def test_vm_view_charts_and_window(driver: Any, api_fleet: Any) -> None:
    vm = api_fleet.vm
    open_view(driver, api_fleet, f"/vm/{quote(vm, safe='')}")
    browser.wait_ready(driver, "vm")
    assert text(driver, "#vm-name") == vm

    # The recommended window is the one in Redis, not a stale or recomputed one.
    stored = api_fleet.redis_hash(vm)
    best_start = finite_float(stored.get("best_start"))
    window = driver.find_element("css selector", "#recommended-window")
    if best_start is None:
        assert window.text.strip() == "none", window.text
    else:
        assert utc_minute(best_start) in window.text, (window.text, best_start)
        assert float(window.get_attribute("data-start")) == pytest.approx(best_start, abs=1e-3)
        assert utc_minute(best_start) in text(driver, "#vm-best-start")

    now_ms = finite_float(stored.get("now_downtime_ms"))
    shown_now = text(driver, "#vm-now-downtime")
    if now_ms is None:
        assert shown_now == "never", shown_now
    else:
        assert ms_value(shown_now) == pytest.approx(now_ms, abs=0.51), (shown_now, now_ms)

    # The downtime chart has one point per curve slot of the next 24 h, and pixels.
    curve = get_json(api_fleet, f"/v1/vms/{quote(vm, safe='')}")["curve"]
    assert curve is not None, f"api_fleet.vm {vm} has no curve"
    in_day = sum(1 for t in curve["ts"] if curve["t0"] <= t < curve["t0"] + 86400)
    lengths = chart_dataset_lengths(driver, "canvas#downtime-chart")
    assert lengths and lengths.get("predicted downtime (ms)") == in_day, (lengths, in_day)
    if best_start is not None:
        assert lengths.get("recommended window") == 2, lengths  # the shaded band is drawn
    assert any(label.startswith("target") for label in lengths), lengths
    assert_chart_drawn(driver, "canvas#downtime-chart")
    assert_chart_drawn(driver, "canvas#forecast-chart")

    browser.screenshot(driver, "vm.png")
    assert_console_clean(driver)


def test_host_view_and_drain_plan(driver: Any, api_fleet: Any) -> None:
    host = api_fleet.host
    open_view(driver, api_fleet, f"/host/{quote(host, safe='')}")
    browser.wait_ready(driver, "host")
    assert text(driver, "#host-name") == host
    listed = get_json(api_fleet, f"/v1/hosts/{quote(host, safe='')}")
    rows = driver.find_elements("css selector", "table#host-vms tbody tr")
    assert len(rows) == len(listed["vms"]) >= 20, (len(rows), len(listed["vms"]))
    assert {r.get_attribute("data-vm") for r in rows} == {v["vm"] for v in listed["vms"]}

    before = driver.execute_script("return window.zhuge.lastPlan && window.zhuge.lastPlan.created")
    for selector, value in (("#drain-deadline-h", "6"), ("#drain-k", "2")):
        field = driver.find_element("css selector", selector)
        field.clear()
        field.send_keys(value)
    driver.find_element("css selector", "form#drain-form button[type=submit]").click()
    browser.wait_until(
        driver,
        "const p = window.zhuge.lastPlan, v = document.querySelector('#view').dataset.ready;"
        "return v === 'error' || (v === '1' && p && p.created !== arguments[0]);",
        "the drain plan",
        before,
        timeout=120,
    )
    browser.wait_ready(driver, "host")  # fails with #error when the POST failed
    plan = driver.execute_script("return window.zhuge.lastPlan")
    assert plan["host"] == host and plan["max_concurrent"] == 2, {k: plan[k] for k in ("host", "max_concurrent")}

    drain_rows = driver.find_elements("css selector", "table#drain-vms tbody tr")
    assert len(drain_rows) == len(plan["vms"]) > 0, (len(drain_rows), len(plan["vms"]))
    assert {r.get_attribute("data-vm") for r in drain_rows} == {v["vm"] for v in plan["vms"]}
    unplaced = driver.find_elements("css selector", "#drain-unplaced li")
    assert len(unplaced) == len(plan["unplaced"]), (len(unplaced), plan["unplaced"])

    total = ms_value(text(driver, "#drain-total"))
    assert total == pytest.approx(plan["total_downtime_ms"], abs=0.051)
    # A baseline's total counts its converging VMs only, so it is comparable with the plan's
    # only when the baseline is a valid drain (all converge, none late); the planner promises
    # to beat each valid one (placed VMs first, then total), and the page flags the others.
    for selector, name in (("#drain-baseline-all-now", "all_now"), ("#drain-baseline-sequential", "sequential")):
        base = plan["baselines"][name]
        node = driver.find_element("css selector", selector)
        shown = ms_value(node.text)
        assert shown == pytest.approx(base["total_downtime_ms"], abs=0.051), (name, shown, base)
        valid = base["not_converged"] == 0 and base["late"] == 0
        assert node.get_attribute("data-feasible") == ("1" if valid else "0"), (name, base)
        if valid:
            assert not plan["unplaced"] and total <= shown, (name, total, shown, plan["unplaced"])

    timeline = driver.execute_script(
        "return Chart.getChart(document.querySelector('canvas#drain-timeline')).data.labels"
    )
    assert sorted(timeline) == sorted(v["vm"] for v in plan["vms"])
    assert_chart_drawn(driver, "canvas#drain-timeline")
    browser.screenshot(driver, "host.png")
    assert_console_clean(driver)

    # A plan the API keeps for the host is shown as soon as the host view opens.
    stored = get_json(api_fleet, f"/v1/hosts/{quote(host, safe='')}").get("drain")
    if stored:
        open_view(driver, api_fleet, f"/host/{quote(host, safe='')}")
        browser.wait_ready(driver, "host")
        shown = driver.find_elements("css selector", "table#drain-vms tbody tr")
        assert len(shown) == len(stored["vms"]), (len(shown), len(stored["vms"]))
        assert_chart_drawn(driver, "canvas#drain-timeline")
        assert_console_clean(driver)


def test_unknown_vm_shows_error(driver: Any, api_fleet: Any) -> None:
    vm = "no-such-vm-3f9c2a"
    open_view(driver, api_fleet, f"/vm/{vm}")
    browser.wait_view(driver, "vm", "error")
    error = driver.find_element("css selector", "#error")
    assert error.is_displayed()
    assert vm in error.text and "404" in error.text, error.text
    # The 404 itself is logged by Chromium as a failed resource load; anything else is a bug.
    assert_console_clean(driver, allow=(f"/v1/vms/{vm} - Failed to load resource",))


def test_all_resources_same_origin(driver: Any, api_fleet: Any) -> None:
    open_view(driver, api_fleet, "/")
    browser.wait_ready(driver, "fleet")
    # Hash routes keep the document, so the timing entries gather every view's loads.
    routes = ((f"/vm/{quote(api_fleet.vm, safe='')}", "vm"), (f"/host/{quote(api_fleet.host, safe='')}", "host"))
    for route, view in routes:
        driver.execute_script("location.hash = arguments[0]", route)
        browser.wait_ready(driver, view)
    urls = browser.loaded_urls(driver)
    assert any(re.search(r"/static/vendor/chart\.umd\.min\.js$", u) for u in urls), urls
    assert any("/v1/hosts/" in u for u in urls), urls
    assert browser.same_origin_only(driver, api_fleet.url) == []
    assert_console_clean(driver)
