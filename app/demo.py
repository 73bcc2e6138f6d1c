"""`zhuge demo`: the whole loop on one machine, with a live terminal view.

Starts local Kafka and Redis when nothing answers at the configured addresses,
backfills a day of a simulated fleet, keeps the simulator running in real time,
runs a worker, and shows throughput, lag, model version and the best migration
candidates until Ctrl-C (or ``--duration``), then stops everything it started.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from urllib.parse import urlparse

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table

from app.settings import Settings

ZHUGE = [sys.executable, "-m", "app.cli"]


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _redis_host_port(url: str) -> tuple[str, int]:
    u = urlparse(url)
    return u.hostname or "127.0.0.1", u.port or 6379


@dataclass
class DemoProcesses:
    started_services: bool = False
    children: list[subprocess.Popen] = field(default_factory=list)

    def spawn(self, args: list[str], env: dict[str, str], log_path: str) -> subprocess.Popen:
        log = open(log_path, "ab")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.children.append(proc)
        return proc

    def stop(self, env: dict[str, str]) -> None:
        for proc in reversed(self.children):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)
        deadline = time.monotonic() + 20
        for proc in self.children:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        if self.started_services:
            subprocess.run([*ZHUGE, "services", "down"], env=env, check=False)


def _metric_values(port: int) -> dict[str, float]:
    """Sum each metric family from the worker's /metrics (labels folded)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1).read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name] = out.get(sample.name, 0.0) + float(sample.value)
            if sample.name == "zhuge_model_version_info" and sample.value == 1:
                out["model:" + sample.labels.get("version", "?")] = 1.0
    return out


def _view(settings: Settings, metrics: dict[str, float], rate: float, top: list[dict], n_vms: int) -> Group:
    model = next((k[6:] for k in metrics if k.startswith("model:")), "?")
    stats = Table.grid(padding=(0, 2))
    stats.add_row("samples in", f"{metrics.get('zhuge_samples_in_total', 0):,.0f}", "rate", f"{rate:,.0f}/s")
    stats.add_row("invalid (DLQ)", f"{metrics.get('zhuge_samples_invalid_total', 0):,.0f}", "VMs scored", f"{metrics.get('zhuge_vms_scored_total', 0):,.0f}")
    lag_n = metrics.get("zhuge_end_to_end_lag_seconds_count", 0)
    lag = metrics.get("zhuge_end_to_end_lag_seconds_sum", 0) / lag_n if lag_n else 0.0
    stats.add_row("consumer lag", f"{metrics.get('zhuge_consumer_lag', 0):,.0f} msgs", "mean e2e lag", f"{lag:.1f} s")
    stats.add_row("model", model, "VMs in Redis", f"{n_vms:,}")
    table = Table(title="best candidates to migrate now", expand=True)
    for col in ("vm", "host", "now ms", "best window (UTC)", "best ms", "p_ok"):
        table.add_column(col)
    for r in top:
        start = time.strftime("%H:%M", time.gmtime(float(r.get("best_start", 0))))
        end = time.strftime("%H:%M", time.gmtime(float(r.get("best_end", 0))))
        table.add_row(
            str(r.get("vm")),
            str(r.get("host", "")),
            f"{float(r.get('now_downtime_ms', 0)):.0f}",
            f"{start}-{end}",
            f"{float(r.get('best_downtime_ms', 0)):.0f}",
            f"{float(r.get('p_ok', 0)):.2f}",
        )
    return Group(Panel(stats, title=f"zhuge demo - Kafka {settings.kafka_bootstrap}, Redis {settings.redis_url}"), table)


async def _poll_redis(settings: Settings) -> tuple[list[dict], int]:
    from streams.sinks.redis_sink import top as redis_top

    client = settings.redis_client()
    try:
        rows = await redis_top(client, settings.redis_prefix, 10)
        n = await client.zcard(f"{settings.redis_prefix}rank:now")
        return rows, int(n)
    finally:
        await client.aclose()


def run_demo(settings: Settings, *, vms: int, hosts: int, duration: float | None, console: Console) -> int:
    """Run the demo; returns the number of VMs with scores in Redis at the end."""
    env = dict(os.environ)
    env.update(
        ZHUGE_KAFKA_BOOTSTRAP=settings.kafka_bootstrap,
        ZHUGE_REDIS_URL=settings.redis_url,
        ZHUGE_RESCORE_S=env.get("ZHUGE_RESCORE_S", "15"),
    )
    procs = DemoProcesses()
    os.makedirs(settings.state_dir, exist_ok=True)
    logs = settings.state_dir
    n_vms = 0
    try:
        kafka_up = _answers(*settings.kafka_host_port)
        redis_up = _answers(*_redis_host_port(settings.redis_url))
        if not (kafka_up and redis_up):
            console.print("[bold]starting local Kafka (KRaft) and Redis[/bold] ...")
            subprocess.run([*ZHUGE, "services", "up"], env=env, check=True)
            procs.started_services = True
        else:
            console.print("using the Kafka and Redis already answering at the configured addresses")
        console.print(f"backfilling one day of a simulated fleet: {vms} VMs on {hosts} hosts ...")
        common = ["--vms", str(vms), "--hosts", str(hosts), "--seed", "7", "--batched"]
        subprocess.run([*ZHUGE, "simulate", *common, "--fast", "--duration", "1d"], env=env, check=True)
        procs.spawn([*ZHUGE, "simulate", *common, "--realtime", "--period", "10"], env, f"{logs}/demo-simulate.log")
        metrics_port = _free_port()
        procs.spawn([*ZHUGE, "worker", "--metrics-port", str(metrics_port)], env, f"{logs}/demo-worker.log")
        console.print(f"worker logs: {logs}/demo-worker.log; Prometheus metrics: http://127.0.0.1:{metrics_port}/metrics")
        started = time.monotonic()
        last = (time.monotonic(), 0.0)
        with Live(console=console, refresh_per_second=2) as live:
            while duration is None or time.monotonic() - started < duration:
                time.sleep(2)
                m = _metric_values(metrics_port)
                now, total = time.monotonic(), m.get("zhuge_samples_in_total", 0.0)
                rate = (total - last[1]) / max(1e-6, now - last[0])
                last = (now, total)
                try:
                    top, n_vms = asyncio.run(_poll_redis(settings))
                except Exception:  # Redis briefly unavailable: keep the view alive
                    top = []
                live.update(_view(settings, m, rate, top, n_vms))
                if any(p.poll() is not None for p in procs.children):
                    console.print("[red]a demo process exited; see the logs in[/red]", logs)
                    break
    except KeyboardInterrupt:
        console.print("stopping ...")
    finally:
        procs.stop(env)
    return n_vms


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
