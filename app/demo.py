"""`zhuge demo`: the whole loop on one machine, with a live terminal view.

Starts local Kafka and Redis when nothing answers at the configured addresses,
backfills a day of a simulated fleet, keeps the simulator running in real time,
runs a worker and ``zhuge api`` (the web page, on ZHUGE_API_PORT when free), and
shows throughput, lag, model version and the best migration candidates until
Ctrl-C (or ``--duration``), then stops everything it started.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table

from app import services
from app.settings import Settings
from app.api_process import ApiProcess
from app.worker_process import WorkerProcess, settings_env

ZHUGE = [sys.executable, "-m", "app.cli"]


LAG = ("zhuge_end_to_end_lag_seconds_sum", "zhuge_end_to_end_lag_seconds_count")


def recent_mean(before: dict[str, float], after: dict[str, float], names: tuple[str, str] = LAG) -> float | None:
    """Mean of what a Prometheus summary (``names``: its sum and count) observed between two
    scrapes; None when nothing arrived. Why not sum / count: after the demo's day-long backfill
    the all-time mean stays near half a day while the live samples arrive within a second."""
    n = after.get(names[1], 0.0) - before.get(names[1], 0.0)
    return (after.get(names[0], 0.0) - before.get(names[0], 0.0)) / n if n > 0 else None


def _view(
    settings: Settings, metrics: dict[str, float], model: str, rate: float, lag: float | None, top: list[dict], n_vms: int
) -> Group:
    stats = Table.grid(padding=(0, 2))
    stats.add_row("samples in", f"{metrics.get('zhuge_samples_in_total', 0):,.0f}", "rate", f"{rate:,.0f}/s")
    stats.add_row("invalid (DLQ)", f"{metrics.get('zhuge_samples_invalid_total', 0):,.0f}", "VMs scored", f"{metrics.get('zhuge_vms_scored_total', 0):,.0f}")
    stats.add_row("consumer lag", f"{metrics.get('zhuge_consumer_lag', 0):,.0f} msgs",
                  "e2e lag, newest samples", "-" if lag is None else f"{lag:.1f} s")  # fmt: skip
    stats.add_row("model", model, "VMs in Redis", f"{n_vms:,}")
    table = Table(title="best candidates to migrate now", expand=True)
    for col in ("vm", "host", "now ms", "recommended window (UTC)", "window ms", "p_ok", "rule"):
        table.add_column(col)
    for r in top:
        start, end = _hhmm(r.get("best_start")), _hhmm(r.get("best_end"))
        table.add_row(
            str(r.get("vm")),
            str(r.get("host", "")),
            f"{float(r.get('now_downtime_ms', 0)):.0f}",
            f"{start}-{end}",
            f"{float(r.get('best_downtime_ms', 0)):.0f}",
            f"{float(r.get('p_ok', 0)):.2f}",
            str(r.get("window_rule", "-")),
        )
    return Group(Panel(stats, title=f"zhuge demo - Kafka {settings.kafka_bootstrap}, Redis {settings.redis_address}"), table)


def _hhmm(ts: object) -> str:
    """UTC hh:mm of an epoch time; "-" for a missing or non-finite one (no forecast, no convergence)."""
    try:
        return time.strftime("%H:%M", time.gmtime(float(ts)))  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError, OSError):
        return "-"


async def _poll_redis(settings: Settings) -> tuple[list[dict], int]:
    from streams.sinks.redis_sink import top as redis_top

    client = settings.redis_client()
    try:
        rows = await redis_top(client, settings.redis_prefix, 10)
        n = await client.zcard(settings.redis_keys().rank_now)
        return rows, int(n)
    finally:
        await client.aclose()


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def run_demo(settings: Settings, *, vms: int, hosts: int, duration: float | None, console: Console) -> int:
    """Run the demo; returns the number of VMs with scores in Redis at the end."""
    env = settings_env(settings)
    logs = Path(settings.state_dir)
    logs.mkdir(parents=True, exist_ok=True)
    started_services: list[str] = []
    simulator: subprocess.Popen | None = None
    worker: WorkerProcess | None = None
    api: ApiProcess | None = None
    n_vms = 0
    try:
        missing = services.not_answering(settings)
        if not missing:
            console.print("using the Kafka and Redis already answering at the configured addresses")
        else:
            console.print(f"[bold]starting local {' and '.join(missing)}[/bold] ...")
            started_services = missing  # before `up`: a start that fails half way is stopped too
            services.up(settings, echo=console.print, only=missing)
        console.print(f"backfilling one day of a simulated fleet: {vms} VMs on {hosts} hosts ...")
        common = ["--vms", str(vms), "--hosts", str(hosts), "--seed", "7", "--batched"]
        subprocess.run([*ZHUGE, "simulate", *common, "--fast", "--duration", "1d"], env=env, check=True)
        with open(logs / "demo-simulate.log", "ab") as log:
            simulator = subprocess.Popen(
                [*ZHUGE, "simulate", *common, "--realtime", "--period", "10"],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        console.print("starting a worker (a bootstrap model is trained when the store is empty) ...")
        worker = WorkerProcess.start(settings, logs / "demo-worker.log", ready_timeout=180)
        console.print(f"worker logs: {worker.log_path}; metrics: http://127.0.0.1:{worker.metrics_port}/metrics")
        port = settings.api_port if _port_free(settings.api_port) else None
        api = ApiProcess.start(settings.replace(api_host="127.0.0.1"), logs / "demo-api.log", port=port)
        console.print(f"[bold]web page and API: {api.url}/[/bold] (OpenAPI at {api.url}/docs)")
        started = time.monotonic()
        scraped_at, scraped = time.monotonic(), {}  # the previous scrape: rate and lag are taken since it
        lag: float | None = None
        with Live(console=console, refresh_per_second=2) as live:
            while duration is None or time.monotonic() - started < duration:
                time.sleep(2)
                if worker.proc.poll() is not None or simulator.poll() is not None:
                    console.print("[red]a demo process exited; see the logs in[/red]", logs)
                    break
                try:
                    m, model = worker.metric_sums(), worker.model_version()
                except OSError:  # between two scrapes of a busy worker: keep the view alive
                    continue
                now, samples = time.monotonic(), "zhuge_samples_in_total"
                rate = (m.get(samples, 0.0) - scraped.get(samples, 0.0)) / max(1e-6, now - scraped_at)
                recent = recent_mean(scraped, m) if scraped else None  # not from 0: the backfill's lag
                lag, scraped, scraped_at = (lag if recent is None else recent), m, now
                try:
                    top, n_vms = asyncio.run(_poll_redis(settings))
                except Exception:  # Redis briefly unavailable: keep the view alive
                    top = []
                live.update(_view(settings, m, model, rate, lag, top, n_vms))
    except KeyboardInterrupt:
        console.print("stopping ...")
    finally:
        if simulator is not None and simulator.poll() is None:
            os.killpg(simulator.pid, signal.SIGINT)
            try:
                simulator.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(simulator.pid, signal.SIGKILL)
        if api is not None:
            api.stop()
        if worker is not None:
            worker.stop()
        if started_services:  # only what the demo started; a service that was already running stays
            services.down(settings, echo=console.print, only=started_services)
    return n_vms
