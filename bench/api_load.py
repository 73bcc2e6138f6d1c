"""``zhuge bench api``: latency and throughput of ``GET /v1/vms/{vm}`` under load from ``wrk``.

Everything is real and local: a worker scores a simulated fleet into Redis, a
``zhuge api`` process serves it on loopback, and ``wrk`` (Debian's, one thread)
requests VMs round-robin over their ids. Two phases, same run, same machine:

- **paced**: each of ``connections`` connections waits ``delay`` between
  requests so the offered rate is about ``rate`` requests/s (wrk's Lua
  ``delay()``; the rate actually reached is reported, never assumed);
- **saturated**: no delay, ``connections`` at once: the most the service gives.

wrk's latency percentiles are per request from send to the last byte; wrk is
closed-loop, so under saturation they understate what an open-loop client
would see (coordinated omission); the paced phase is the one to read for p99.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def wrk_script(vms: list[str], delay_ms: float) -> str:
    """A wrk Lua script: GET /v1/vms/<id> round-robin over ``vms``, ``delay_ms`` between requests."""
    ids = ", ".join('"' + vm.replace("\\", "\\\\").replace('"', '\\"') + '"' for vm in vms)
    return f"""
local vms = {{{ids}}}
local i = 0
request = function()
  i = i + 1
  return wrk.format("GET", "/v1/vms/" .. vms[(i % #vms) + 1])
end
{"delay = function() return " + repr(float(delay_ms)) + " end" if delay_ms > 0 else ""}
"""


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        raise ValueError(f"unparsable wrk latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(text: str) -> dict[str, Any]:
    """Requests/s, percentiles (ms), request count and errors from ``wrk --latency`` output."""
    out: dict[str, Any] = {}
    rate = re.search(r"Requests/sec:\s+([\d.]+)", text)
    total = re.search(r"(\d+) requests in ([\d.]+)(\w+)", text)
    if not rate or not total:
        raise ValueError(f"wrk printed no summary:\n{text}")
    out["requests_per_s"] = float(rate.group(1))
    out["requests"] = int(total.group(1))
    for pct, value in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)", text, flags=re.M):
        out[f"p{pct}_ms"] = _ms(value)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    out["non_2xx"] = int(non_2xx.group(1)) if non_2xx else 0
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    out["socket_errors"] = sum(int(g) for g in errors.groups()) if errors else 0
    return out


def run_wrk(url: str, vms: list[str], connections: int, duration_s: float, delay_ms: float = 0.0) -> dict[str, Any]:
    """One wrk run against ``url``; its parsed summary plus the settings it ran with."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise RuntimeError("wrk not found: apt-get install wrk (make install does)")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(wrk_script(vms, delay_ms))
    try:
        proc = subprocess.run([wrk, "-t1", f"-c{connections}", f"-d{duration_s:g}s", "--latency", "-s", f.name, url],
                              capture_output=True, text=True, timeout=duration_s + 60)  # fmt: skip
    finally:
        Path(f.name).unlink(missing_ok=True)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr or proc.stdout}")
    return {"connections": connections, "delay_ms": delay_ms, "duration_s": duration_s, **parse_wrk(proc.stdout)}


def pacing_delay(url: str, vms: list[str], connections: int, rate: float, probe_s: float = 3.0) -> float:
    """The per-connection delay that offers about ``rate`` requests/s, from one short probe.

    Each connection does one request per ``delay + latency``; the probe measures
    the latency part at a first guess (``connections / rate``) and the delay is
    corrected by it.
    """
    first = connections * 1000.0 / rate
    probe = run_wrk(url, vms, connections, probe_s, first)
    latency_ms = max(connections * 1000.0 / max(probe["requests_per_s"], 1e-9) - first, 0.0)
    return max(first - latency_ms, 0.0)


def run_api_bench(
    settings: Any, vms: int, hosts: int, rate: float, duration_s: float, connections: int, workdir: str | None,
    api_workers: int = 1,
) -> dict[str, Any]:
    """Worker + a simulated day of ``vms`` VMs + ``zhuge api``, then the paced and the saturated wrk phases."""
    import asyncio
    import platform
    import time

    from app.api_process import ApiProcess
    from app.topics import ensure_topics
    from app.worker_process import WorkerProcess
    from sim.fleet import vm_ids
    from sim.produce import simulate

    tmp = Path(workdir or tempfile.mkdtemp(prefix="zhuge-bench-api-"))
    tmp.mkdir(parents=True, exist_ok=True)
    tag = f"bench-api-{int(time.time())}"
    settings = settings.replace(topic_metrics=f"{settings.topic_metrics}.{tag}", topic_dlq=f"{settings.topic_dlq}.{tag}",
                                topic_scores=f"{settings.topic_scores}.{tag}", consumer_group=f"{tag}",
                                redis_prefix=f"{tag}:", snapshot_dir=str(tmp / "snapshots"),
                                model_store=str(tmp / "models"), history_url=str(tmp / "history"))  # fmt: skip
    asyncio.run(ensure_topics(settings, [settings.topic_metrics, settings.topic_dlq, settings.topic_scores,
                                         settings.topic_migrations]))  # fmt: skip
    worker = WorkerProcess.start(settings, tmp / "worker.log", ready_timeout=180)
    api = None
    try:
        period = 300.0
        end = time.time() - time.time() % period
        asyncio.run(simulate(settings, n_vms=vms, n_hosts=hosts, start_ts=end - 287 * period, n_steps=288,
                             period_s=period, realtime=False, batched=True, seed=0, topic=settings.topic_metrics))  # fmt: skip
        ids = [str(v) for v in vm_ids(vms)]
        _wait_scored(settings, ids, timeout_s=300)
        api = ApiProcess.start(settings, tmp / "api.log", workers=api_workers)
        run_wrk(api.url, ids, connections, 2.0)  # warm-up: connections, first decodes
        delay_ms = pacing_delay(api.url, ids, connections, rate)
        paced = run_wrk(api.url, ids, connections, duration_s, delay_ms)
        saturated = run_wrk(api.url, ids, connections, duration_s)
    finally:
        if api is not None:
            api.stop()
        worker.stop()
        _drop_keys(settings)
    return {
        "machine": f"{platform.node()} ({platform.machine()}, {_cores()} cores)",
        "tool": "wrk -t1 (Debian), loopback",
        "vms": vms,
        "api_workers": api_workers,
        "target_rate": rate,
        "paced": paced,
        "saturated": saturated,
    }


def _wait_scored(settings: Any, vms: list[str], timeout_s: float) -> None:
    import time

    client = settings.redis_client(asyncio=False)
    try:
        deadline = time.monotonic() + timeout_s
        rank_now = settings.redis_keys().rank_now
        while client.zcard(rank_now) < len(vms):
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {client.zcard(rank_now)} of {len(vms)} VMs scored "
                                   f"after {timeout_s:.0f} s")  # fmt: skip
            time.sleep(0.5)
    finally:
        client.close()


def _drop_keys(settings: Any) -> None:
    """Remove the bench's own keys (its prefix) from Redis."""
    client = settings.redis_client(asyncio=False)
    try:
        batch = []
        for key in client.scan_iter(match=f"{settings.redis_prefix}*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                client.delete(*batch)
                batch = []
        if batch:
            client.delete(*batch)
    finally:
        client.close()


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0))


def format_api_bench(result: dict[str, Any]) -> str:
    lines = [f"GET /v1/vms/{{vm}} over {result['vms']:,} VMs, {result['api_workers']} API process(es), {result['tool']}, "
             f"{result['machine']}"]
    for phase in ("paced", "saturated"):
        r = result[phase]
        lines.append(
            f"{phase:9s} {r['requests_per_s']:>8,.0f} req/s  p50 {r.get('p50_ms', float('nan')):.2f} ms  "
            f"p90 {r.get('p90_ms', float('nan')):.2f} ms  p99 {r.get('p99_ms', float('nan')):.2f} ms  "
            f"({r['connections']} connections, delay {r['delay_ms']:.1f} ms, {r['requests']:,} requests, "
            f"{r['non_2xx']} non-2xx, {r['socket_errors']} socket errors)"
        )
    return "\n".join(lines)
