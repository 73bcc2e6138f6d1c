"""`zhuge api` against a real worker's Redis: every answer is what Redis holds, errors say why, drains respect
their limits and beat what count-limited tools do."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from api.plans import build_problem
from app.worker_process import settings_env
from drain.planner import check_plan
from streams.curve import decode_curve
from app.api_process import ApiProcess
from tests.integration.api_support import ApiFleet

pytestmark = pytest.mark.integration


def _same(api_value: object, redis_value: object) -> bool:
    """Non-finite numbers are null in the API."""
    if isinstance(redis_value, float) and not math.isfinite(redis_value):
        return api_value is None
    return api_value == redis_value


def test_a_vm_reads_as_its_redis_hash_and_curve(api_fleet: ApiFleet) -> None:
    status, body = api_fleet.api.get(f"/v1/vms/{api_fleet.vm}")
    assert status == 200
    stored = api_fleet.redis_hash(api_fleet.vm)
    for field, value in body["score"].items():
        assert _same(value, stored.get(field)), (field, value, stored.get(field))
    client = api_fleet.settings.redis_client(asyncio=False)
    curve = decode_curve(client.get(f"{api_fleet.settings.redis_prefix}curve:{api_fleet.vm}"))
    client.close()
    assert body["curve"] == json.loads(json.dumps(curve.to_json()))
    slots = api_fleet.settings.horizon_slots
    assert len(body["curve"]["downtime_ms"]) == slots and len(body["curve"]["ts"]) == slots
    # the curve starts where the recommended window's grid starts, and the window's start is on it
    assert body["score"]["best_start"] in body["curve"]["ts"]


def test_hosts_candidates_and_fleet_counts_match_redis(api_fleet: ApiFleet) -> None:
    client = api_fleet.settings.redis_client(asyncio=False)
    prefix = api_fleet.settings.redis_prefix
    members = sorted(m.decode() for m in client.smembers(f"{prefix}host:{api_fleet.host}"))
    ranked = [m.decode() for m in client.zrange(f"{prefix}rank:now", 0, 9)]
    total = client.zcard(f"{prefix}rank:now")
    now_ok = client.zcount(f"{prefix}rank:now", "-inf", api_fleet.target_ms)
    client.close()

    status, host = api_fleet.api.get(f"/v1/hosts/{api_fleet.host}")
    assert status == 200 and sorted(v["vm"] for v in host["vms"]) == members and len(members) >= 20
    downtimes = [v["now_downtime_ms"] if v["now_downtime_ms"] is not None else math.inf for v in host["vms"]]
    assert downtimes == sorted(downtimes)  # best to migrate now first
    status, hosts = api_fleet.api.get("/v1/hosts")
    assert status == 200 and {h["host"]: h["vms"] for h in hosts["hosts"]}[api_fleet.host] == len(members)

    status, cands = api_fleet.api.get("/v1/candidates?n=10")
    assert status == 200 and [c["vm"] for c in cands["candidates"]] == ranked
    status, on_host = api_fleet.api.get(f"/v1/candidates?n=5&host={api_fleet.host}")
    assert status == 200 and [c["vm"] for c in on_host["candidates"]] == [v["vm"] for v in host["vms"][:5]]

    status, fleet = api_fleet.api.get("/v1/fleet")
    assert status == 200
    assert fleet["vms"] == total == len(api_fleet.vms) and fleet["now_within_target"] == now_ok
    assert fleet["now_within_target"] + fleet["window_within_target"] + fleet["not_at_all"] == fleet["vms"]


def test_unknown_things_and_bad_parameters_get_a_json_reason(api_fleet: ApiFleet) -> None:
    status, body = api_fleet.api.get("/v1/vms/no-such-vm")
    assert status == 404 and body["error"] == "not_found" and "no-such-vm" in body["reason"]
    status, body = api_fleet.api.get("/v1/hosts/no-such-host")
    assert status == 404 and "no-such-host" in body["reason"]
    status, body = api_fleet.api.get("/v1/candidates?n=0")
    assert status == 422 and body["error"] == "bad_request" and "n" in body["reason"]
    status, body = api_fleet.api.request("POST", "/v1/drain", {"host": api_fleet.host, "deadline_s": -5})
    assert status == 422 and "deadline_s" in body["reason"]
    status, body = api_fleet.api.request("POST", "/v1/drain", {"host": "no-such-host"})
    assert status == 404 and "no-such-host" in body["reason"]


def test_the_drain_plan_respects_deadline_k_and_link_and_beats_both_baselines(api_fleet: ApiFleet) -> None:
    status, plan = api_fleet.api.request("POST", "/v1/drain", {"host": api_fleet.host, "deadline_s": 6 * 3600,
                                                               "max_concurrent": 3})  # fmt: skip
    assert status == 200, plan
    client = api_fleet.settings.redis_client(asyncio=False)
    prefix = api_fleet.settings.redis_prefix
    curves = {vm: decode_curve(client.get(f"{prefix}curve:{vm}")) for vm in
              (m.decode() for m in client.smembers(f"{prefix}host:{api_fleet.host}"))}  # fmt: skip
    stored = json.loads(client.get(f"{prefix}drain:{api_fleet.host}"))
    client.close()
    problem = build_problem(api_fleet.host, curves, api_fleet.settings, plan["t0"], plan["deadline"] - plan["t0"], 3)
    assert check_plan(problem, plan) == []
    assert len(plan["vms"]) + len(plan["unplaced"]) == len(curves) >= 20
    assert plan["max_concurrent"] == 3 and all(row["end"] <= plan["deadline"] for row in plan["vms"])
    base = plan["baselines"]
    print(f"\ndrain of {api_fleet.host} ({len(curves)} VMs, K=3, 6 h): plan {plan['total_downtime_ms']:.1f} ms "
          f"({len(plan['vms'])} placed); " + "; ".join(
              f"{name} {b['total_downtime_ms']:.1f} ms ({b['not_converged']} not converging, {b['late']} late)"
              for name, b in base.items()) + f"; solver {plan['solver']}")  # fmt: skip
    for name, b in base.items():  # lexicographic: more VMs moved first, then less downtime
        moved = len(curves) - b["not_converged"] - b["late"]
        assert len(plan["vms"]) >= moved, name
        if len(plan["vms"]) == moved:
            assert plan["total_downtime_ms"] <= b["total_downtime_ms"] + 1e-6, name
    assert stored == plan and stored["created"] <= stored["t0"] + 60
    status, host = api_fleet.api.get(f"/v1/hosts/{api_fleet.host}")
    assert host["drain"] == plan


def test_zhuge_drain_prints_the_same_plan_shape(api_fleet: ApiFleet) -> None:
    out = subprocess.run([sys.executable, "-m", "app.cli", "drain", api_fleet.host, "--deadline", "3h", "-k", "2",
                          "--time-limit", "5", "--json"], env=settings_env(api_fleet.settings), capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert {"host", "deadline", "max_concurrent", "vms", "unplaced", "total_downtime_ms", "baselines"} <= set(plan)
    assert plan["max_concurrent"] == 2 and plan["deadline"] - plan["t0"] == pytest.approx(3 * 3600)
    assert {"vm", "start", "end", "downtime_ms", "bw_mbps"} <= set(plan["vms"][0])


def test_metrics_openapi_and_the_page_are_served(api_fleet: ApiFleet) -> None:
    api_fleet.api.get(f"/v1/vms/{api_fleet.vm}")
    status, text = api_fleet.api.get("/metrics")
    assert status == 200 and 'zhuge_api_requests_total{method="GET",route="/v1/vms/{vm}",status="200"}' in text
    assert "zhuge_api_request_seconds_bucket" in text
    status, schema = api_fleet.api.get("/openapi.json")
    assert status == 200
    assert {"/v1/vms/{vm}", "/v1/hosts/{host}", "/v1/candidates", "/v1/drain", "/v1/fleet"} <= set(schema["paths"])
    status, page = api_fleet.api.get("/")
    assert status == 200 and "<html" in page.lower()


def test_a_token_is_required_when_set_and_beyond_loopback(api_fleet: ApiFleet, tmp_path) -> None:  # type: ignore[no-untyped-def]
    secured = ApiProcess.start(api_fleet.settings.replace(api_token="s3cret-token"), tmp_path / "api.log")
    try:
        assert secured.get(f"/v1/vms/{api_fleet.vm}")[0] == 401
        status, body = secured.get(f"/v1/vms/{api_fleet.vm}", token="wrong")
        assert status == 401 and body["error"] == "unauthorized"
        assert secured.get(f"/v1/vms/{api_fleet.vm}", token="s3cret-token")[0] == 200
        assert secured.get("/healthz")[0] == 200 and secured.get("/readyz")[0] == 200  # probes stay open
    finally:
        secured.stop()
    assert "s3cret-token" not in (tmp_path / "api.log").read_text()
    out = subprocess.run([sys.executable, "-m", "app.cli", "api", "--host", "0.0.0.0"],
                         env=settings_env(api_fleet.settings), capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 1 and "ZHUGE_API_TOKEN" in out.stderr
