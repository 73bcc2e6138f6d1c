"""``zhuge lab calibrate``: real migrations over a grid, each set against the downtime model's prediction.

For every grid point (guest memory, working set, dirty rate, link rate, downtime
limit) the lab boots a guest (one per memory size, reused), sets its load and its
host links, and then:

1. measures the inputs **as the hypervisor agent does** (``agent.qemu``: dirty rate
   by QMP, working set from a long dirty-rate window, non-zero resident memory),
   plus the guest's own page counter as a cross-check of the dirty rate;
2. live-migrates it (``lab.migrate``, abort after ``timeout_s``) and records QEMU's
   outcome: total time, the guest's pause, bytes, dirty syncs, the dirty rate QEMU
   saw while migrating;
3. predicts the same migration from the measured inputs with the downtime models
   (the classic round-based one zhuge shipped first, and the QEMU-faithful one).

The report gives, per model, the mean absolute percentage error of the total time,
the downtime error on converged runs (ms and relative) and how often convergence
was predicted right, next to the measurement error of the dirty rate.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.qemu import QemuGuestReader
from lab import lab as labmod
from lab import net, workload
from lab.migrate import MigrationPolicy, migrate
from lab.qemu import GuestSpec
from lab.state import lab_dir, load, updating

Progress = Callable[[int, int, dict[str, Any]], None]


@dataclass(frozen=True)
class GridPoint:
    mem_mb: int  # the workload's resident memory (the guest OS adds its own)
    wss_mb: int
    rate_mbps: float
    link_mbit: float
    limit_ms: float = 300.0
    ram_mb: int = 512


def full_grid() -> list[GridPoint]:
    """32 points: memory x working set x dirty rate (idle to above the link) x link x limit."""
    points = []
    for mem, wss, link in ((64, 32, 256), (192, 64, 256), (192, 160, 256), (320, 128, 384), (160, 96, 128)):
        link_mib = link * 1e6 / 8 / 2**20
        for share in (0.0, 0.3, 0.6, 0.85, 1.3):
            points.append(GridPoint(mem, wss, round(share * link_mib, 1), link, ram_mb=512 if mem < 256 else 768))
    points += [GridPoint(192, 160, 12.0, 256, limit_ms=100.0), GridPoint(192, 160, 12.0, 256, limit_ms=1000.0),
               GridPoint(64, 32, 20.0, 512, limit_ms=50.0), GridPoint(320, 256, 8.0, 384, ram_mb=768),
               GridPoint(64, 32, 40.0, 512), GridPoint(192, 32, 40.0, 256), GridPoint(320, 64, 20.0, 384, ram_mb=768)]  # fmt: skip
    return points


def quick_grid() -> list[GridPoint]:
    """6 points for CI: idle, converging fast and slowly, above the link, a small working set, a tight limit."""
    return [GridPoint(64, 32, 0.0, 256), GridPoint(64, 32, 10.0, 256), GridPoint(64, 48, 24.0, 256),
            GridPoint(64, 48, 40.0, 256), GridPoint(64, 8, 40.0, 256), GridPoint(64, 32, 12.0, 256, limit_ms=100.0)]  # fmt: skip


@dataclass
class Run:
    point: GridPoint
    measured: dict[str, Any]  # the agent's inputs + the guest's own rate
    outcome: dict[str, Any]  # lab.migrate.MigrationOutcome.as_dict()
    predictions: dict[str, dict[str, Any]] = field(default_factory=dict)  # model name -> prediction

    def as_dict(self) -> dict[str, Any]:
        return {"point": asdict(self.point), "measured": self.measured, "outcome": self.outcome,
                "predictions": self.predictions}  # fmt: skip


async def measure(state_dir: str, lab: str, vm: str, wss_calc_s: float) -> dict[str, Any]:
    """The migration's inputs as the agent would report them, and the guest's own rate."""
    st = load(lab_dir(state_dir, lab))
    assert st is not None
    process = st.guests[vm].process
    reader = QemuGuestReader(vm, process.qmp_path, process.pid, accel=st.accel)
    reading = await reader.read(calc_s=1.0, wss_calc_s=wss_calc_s)
    second = await reader.read(calc_s=1.0)
    own = await workload.measured_rate(process.ctl_path, seconds=1.0)
    return {"dirty_mbps": (reading.dirty_mbps + second.dirty_mbps) / 2, "wss_mb": reading.wss_mb,
            "mem_used_mb": reading.mem_used_mb, "mem_total_mb": reading.mem_total_mb,
            "cpu_pct": reading.cpu_pct, "guest_rate_mbps": own}  # fmt: skip


async def run_grid(state_dir: str, lab: str, points: list[GridPoint], *, timeout_s: float = 45.0,
                   wss_calc_s: float = 6.0, progress: Progress | None = None) -> list[Run]:  # fmt: skip
    """Run every point on a two-host lab ``lab`` (brought up here, taken down at the end)."""
    runs: list[Run] = []
    by_guest = sorted({(p.mem_mb, p.ram_mb) for p in points})
    specs = [GuestSpec(f"cal{m}r{r}", ram_mb=r, mem_mb=m, wss_mb=min(m, 32)) for m, r in by_guest]
    labmod.up(state_dir, lab, labmod.LabPlan(hosts=2, link_mbit=256, guests=specs), echo=lambda _: None)
    try:
        for i, point in enumerate(points):
            vm = f"cal{point.mem_mb}r{point.ram_mb}"
            folder = lab_dir(state_dir, lab)
            with updating(folder) as st:
                for name, host in list(st.hosts.items()):
                    st.hosts[name] = net.set_link(host, point.link_mbit)
                ctl = st.guests[vm].process.ctl_path
            await workload.send(ctl, wss=point.wss_mb, rate=point.rate_mbps)
            await asyncio.sleep(1.5)  # a round of the working set at the new rate before measuring
            measured = await measure(state_dir, lab, vm, wss_calc_s)
            policy = MigrationPolicy(downtime_limit_ms=point.limit_ms, timeout_s=timeout_s, on_timeout="abort")
            outcome = await migrate(state_dir, lab, vm, None, policy)
            run = Run(point, measured, outcome.as_dict())
            runs.append(run)
            if progress is not None:
                progress(i + 1, len(points), run.as_dict())
    finally:
        labmod.down(state_dir, lab, echo=lambda _: None)
    return runs


# ------------------------------------------------------------------------------ scoring


def predict_runs(runs: list[Run], models: dict[str, Callable[[dict[str, Any], GridPoint, float], dict[str, Any]]],
                 timeout_s: float) -> None:  # fmt: skip
    """Fill each run's ``predictions`` with every model's view of it."""
    for run in runs:
        for name, model in models.items():
            run.predictions[name] = model(run.measured, run.point, timeout_s)


def summary(runs: list[Run], model: str) -> dict[str, Any]:
    """The calibration figures of one model over the runs."""
    total_err, dt_abs, dt_rel, within, right = [], [], [], [], []
    for run in runs:
        o, p = run.outcome, run.predictions[model]
        converged = bool(o["converged"])
        right.append(bool(p["converged"]) == converged)
        if not converged:
            continue
        total_err.append(abs(p["total_s"] * 1000 - o["total_ms"]) / o["total_ms"])
        if p["converged"] and o["downtime_ms"] is not None:
            err = abs(p["downtime_ms"] - o["downtime_ms"])
            dt_abs.append(err)
            dt_rel.append(err / max(o["downtime_ms"], 1e-9))
            within.append(err <= 10.0 or err <= 0.2 * o["downtime_ms"])
    mean = lambda xs: float(np.mean(xs)) if xs else math.nan  # noqa: E731
    return {
        "runs": len(runs), "converged_runs": len(total_err), "mape_total_time": mean(total_err),
        "downtime_mae_ms": mean(dt_abs), "downtime_mape": mean(dt_rel), "downtime_within_20pct_or_10ms": mean(within),
        "convergence_accuracy": mean(right),
    }  # fmt: skip


def measurement_error(runs: list[Run]) -> dict[str, Any]:
    """How far the agent's dirty rate is from the guest's own counter and from what QEMU saw while migrating."""
    vs_guest = [abs(r.measured["dirty_mbps"] - r.measured["guest_rate_mbps"]) for r in runs]
    rel = [abs(r.measured["dirty_mbps"] - r.measured["guest_rate_mbps"]) / r.measured["guest_rate_mbps"]
           for r in runs if r.measured["guest_rate_mbps"] > 1]  # fmt: skip
    seen = [r.outcome["dirty_rate_seen_mbps"] / r.measured["dirty_mbps"] for r in runs
            if r.outcome.get("dirty_rate_seen_mbps") and r.measured["dirty_mbps"] > 1]  # fmt: skip
    return {"dirty_rate_abs_err_mbps": float(np.mean(vs_guest)) if vs_guest else math.nan,
            "dirty_rate_rel_err": float(np.mean(rel)) if rel else math.nan,
            "qemu_seen_over_agent_rate": float(np.median(seen)) if seen else math.nan}  # fmt: skip


def save(runs: list[Run], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "runs.jsonl"
    path.write_text("".join(json.dumps(r.as_dict()) + "\n" for r in runs))
    return path


def load_runs(path: Path) -> list[Run]:
    runs = []
    for line in path.read_text().splitlines():
        d = json.loads(line)
        runs.append(Run(GridPoint(**d["point"]), d["measured"], d["outcome"], d.get("predictions", {})))
    return runs

