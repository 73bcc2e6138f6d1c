"""A scored fleet behind a running ``zhuge api``: the worker, the simulator and the API as real processes.

``ApiFleet`` is what the API and web-page tests get: a base URL on loopback, a
VM with a curve, a host of 30 VMs, and Redis to compare every answer with.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.api_process import ApiProcess
from app.settings import Settings
from app.worker_process import WorkerProcess
from streams.sinks.redis_sink import decode_hash

FLEET_VMS, FLEET_HOSTS = 60, 2  # 30 VMs per host: the drain-plan tests want >= 20
DAY_STEPS, PERIOD_S = 288, 300.0


@dataclass
class ApiFleet:
    settings: Settings
    api: ApiProcess
    vm: str  # a scored VM with a curve
    host: str  # a host with FLEET_VMS / FLEET_HOSTS VMs
    vms: list[str]

    @property
    def url(self) -> str:
        return self.api.url

    @property
    def target_ms(self) -> float:
        return self.settings.downtime_target_ms

    def redis_hash(self, vm: str) -> dict[str, Any]:
        client = self.settings.redis_client(asyncio=False)
        try:
            return decode_hash(vm, client.hgetall(f"{self.settings.redis_prefix}vm:{vm}"))
        finally:
            client.close()


def simulate_day(settings: Settings) -> dict[str, float]:
    """One simulated day of the fleet into ``vm.metrics``, ending now; returns the newest ts per VM."""
    from sim.fleet import vm_ids
    from sim.produce import simulate

    end = time.time() - time.time() % PERIOD_S
    start = end - (DAY_STEPS - 1) * PERIOD_S
    asyncio.run(simulate(settings, n_vms=FLEET_VMS, n_hosts=FLEET_HOSTS, start_ts=start, n_steps=DAY_STEPS,
                         period_s=PERIOD_S, realtime=False, batched=True, seed=3, topic=settings.topic_metrics))  # fmt: skip
    return {str(vm): end for vm in vm_ids(FLEET_VMS)}


def start_api_fleet(settings: Settings, tmp: Path) -> tuple[WorkerProcess, ApiFleet]:
    """Worker first, then a day of samples, every VM scored at its newest sample, then the API."""
    from tests.integration.worker_support import wait_for_scores

    worker = WorkerProcess.start(settings, tmp / "worker.log", ready_timeout=120)
    try:
        newest = simulate_day(settings)
        hashes = wait_for_scores(settings, newest, timeout_s=120)
        api = ApiProcess.start(settings, tmp / "api.log")
    except BaseException:
        worker.stop()
        raise
    hosts: dict[str, list[str]] = {}
    for vm, h in hashes.items():
        hosts.setdefault(h["host"], []).append(vm)
    host = max(hosts, key=lambda name: len(hosts[name]))
    return worker, ApiFleet(settings, api, vm=sorted(hosts[host])[0], host=host, vms=sorted(newest))
