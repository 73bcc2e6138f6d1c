"""`zhuge bench score`: the full scoring step for a synthetic fleet, timed per device.

What is timed is exactly the worker's scoring kernel (``streams.scorer.score_windows``):
window tensor -> features -> forecast model at every grid horizon -> interpolation
to every slot -> bandwidth -> pre-copy downtime per slot -> best window -> p_ok.
The window tensor is built directly on the device (a diurnal load with noise and
NaN gaps) and is not part of the timing; host traffic comes from a fixed number
of VMs per host. The model is the real bootstrap forecaster (``training.bootstrap``,
fitted on the simulated fleet at start-up, untimed).
"""

from __future__ import annotations

import platform
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from gpu_kernels.downtime import PrecopyParams
from gpu_kernels.features import TARGETS, WINDOW_CHANNELS, slots_per_day, week_bucket_slots, week_buckets
from gpu_kernels.inference import engine_name
from gpu_kernels.xp import get_xp, resolve_device, to_numpy

VMS_PER_HOST = 20


@dataclass
class DeviceTiming:
    device: str
    engine: str
    vms: int
    wall_s: float
    vms_per_s: float
    slot_predictions_per_s: float  # VM x forecast-slot downtime predictions per second
    model_rows_per_s: float  # feature rows through the model (VM x grid horizon) per second
    extrapolated_from: int | None = None  # timed on this many VMs, scaled linearly


@dataclass
class ScoreBench:
    vms: int
    slots: int
    horizon_slots: int
    grid_horizons: int
    model: str
    chunk_vms: int
    machine: str
    runs: list[DeviceTiming] = field(default_factory=list)
    gpu_over_cpu: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def synthetic_windows(n: int, slots: int, slot_s: int, xp: Any, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """A fleet's window tensor ``(n, slots, C)`` on ``xp``'s device: diurnal load, noise, 2% gaps;
    ``attrs["profile"]`` is each VM's daily profile (its noiseless diurnal curve), as a store that
    has held the VM for over a day has it, and ``attrs["week"]`` its weekly profile (the same curve
    at the start of each hour of the week, as after a week)."""
    rs = xp.random.RandomState(seed)
    f32 = xp.float32
    last_slot = 1_700_006_400 // slot_s + 288
    t = (xp.arange(slots, dtype=f32) + (last_slot - slots + 1)) * (slot_s / 86400.0)
    phase = rs.uniform(0, 1, (n, 1)).astype(f32)
    base = rs.uniform(5, 60, (n, 1)).astype(f32)
    amp = rs.uniform(0, 35, (n, 1)).astype(f32)
    cpu = xp.clip(base + amp * xp.sin(2 * np.pi * (t[None, :] + phase)) + rs.normal(0, 3, (n, slots)).astype(f32), 0, 100)
    vcpus = rs.choice(xp.asarray([1, 2, 4, 8, 16]), n).astype(f32)
    mem_total = vcpus * 4096
    mem_used = mem_total[:, None] * rs.uniform(0.3, 0.9, (n, 1)).astype(f32) * xp.ones((1, slots), f32)
    dirty = cpu / 100 * vcpus[:, None] * rs.uniform(5, 80, (n, 1)).astype(f32)
    net = cpu / 100 * rs.uniform(1, 150, (n, 1)).astype(f32)
    chans = {"cpu_pct": cpu, "dirty_mbps": dirty, "net_mbps": net, "mem_used_mb": mem_used}
    win = xp.stack([chans[c].astype(f32) for c in WINDOW_CHANNELS], axis=-1)
    win[rs.uniform(0, 1, (n, slots)) < 0.02] = np.nan
    P = slots_per_day(slot_s)
    tod = xp.arange(P, dtype=f32) * (slot_s / 86400.0)  # profile index j = absolute slot % P
    cpu_p = xp.clip(base + amp * xp.sin(2 * np.pi * (tod[None, :] + phase)), 0, 100)
    ratio = {"cpu_pct": 1, "dirty_mbps": dirty[:, :1] / xp.maximum(cpu[:, :1], 1e-3), "net_mbps": net[:, :1] / xp.maximum(cpu[:, :1], 1e-3)}
    profile = xp.stack([(cpu_p * ratio[t]).astype(f32) for t in TARGETS], axis=-1)
    attrs = {
        "last_slot": xp.full(n, last_slot, dtype=xp.int64),
        "mem_total_mb": mem_total,
        "vcpus": vcpus,
        "profile": profile,
        "week": profile[:, (xp.arange(week_buckets(slot_s)) * week_bucket_slots(slot_s)) % P],
    }
    return win, attrs


def _others_net(win: Any, xp: Any) -> Any:
    """Neighbours' latest network per VM: hosts of ``VMS_PER_HOST`` consecutive VMs."""
    n = win.shape[0]
    net = xp.nan_to_num(win[:, -1, WINDOW_CHANNELS.index("net_mbps")])
    host = xp.arange(n) // VMS_PER_HOST
    per_host = xp.bincount(host, weights=net)
    return (per_host[host] - net).astype(xp.float32)


def time_scoring(win: Any, attrs: dict[str, Any], model: Any, settings: Any, device: str, chunk_vms: int) -> float:
    """Wall seconds of the scoring step over all VMs of ``win`` (chunked like the worker)."""
    from streams.scorer import score_windows

    xp = get_xp(device)
    params = PrecopyParams.from_settings(settings)
    others = _others_net(win, xp)
    n = win.shape[0]

    def run(lo: int, hi: int) -> None:
        part = {k: v[lo:hi] for k, v in attrs.items()}
        out = score_windows(win[lo:hi], part, others[lo:hi], model, params, settings.horizon_slots, settings.slot_s, xp, device)
        to_numpy(out["best_start"])  # results on the host, as the sinks need them

    run(0, min(n, 256))  # warm-up: kernel compilation, tree-engine load
    _sync(xp)
    tic = time.perf_counter()
    for lo in range(0, n, chunk_vms):
        run(lo, min(n, lo + chunk_vms))
    _sync(xp)
    return time.perf_counter() - tic


def _sync(xp: Any) -> None:
    if xp is not np:
        xp.cuda.Stream.null.synchronize()


def run_bench(
    settings: Any,
    vms: int,
    slots: int = 288,
    device: str = "auto",
    compare_cpu: bool = False,
    cpu_sample: int | None = None,
    chunk_vms: int | None = None,
    model: Any = None,
) -> ScoreBench:
    """Build the fleet, time the scoring step on ``device`` (and on CPU with ``compare_cpu``)."""
    dev = resolve_device(device)
    if model is None:
        from training.bootstrap import bootstrap_model

        model = bootstrap_model(settings)
    settings = settings.replace(window_span_s=slots * settings.slot_s)
    chunk = int(chunk_vms or (131072 if dev == "gpu" else 8192))
    H = len(model.horizons)
    result = ScoreBench(
        vms=vms, slots=slots, horizon_slots=settings.horizon_slots, grid_horizons=H, model=str(model.version),
        chunk_vms=chunk, machine=f"{platform.node()} ({platform.processor() or platform.machine()})",
    )  # fmt: skip
    plan = [dev] + (["cpu"] if compare_cpu and dev != "cpu" else [])
    for d in plan:
        n_timed = vms
        if d == "cpu" and cpu_sample and cpu_sample < vms:
            n_timed = int(cpu_sample)
        xp = get_xp(d)
        win, attrs = synthetic_windows(n_timed, slots, settings.slot_s, xp)
        wall = time_scoring(win, attrs, model, settings, d, chunk if d == dev else min(chunk, 8192))
        del win, attrs
        scale = vms / n_timed
        wall_full = wall * scale
        vms_per_s = vms / wall_full
        result.runs.append(
            DeviceTiming(
                device=d,
                engine=engine_name(d),
                vms=vms,
                wall_s=wall_full,
                vms_per_s=vms_per_s,
                slot_predictions_per_s=vms_per_s * settings.horizon_slots,  # derived: one rounding, as reported
                model_rows_per_s=vms_per_s * H,
                extrapolated_from=n_timed if n_timed != vms else None,
            )
        )
    if len(result.runs) == 2:
        result.gpu_over_cpu = result.runs[1].wall_s / result.runs[0].wall_s
    return result


def format_bench(r: ScoreBench) -> str:
    lines = [
        f"score bench: {r.vms:,} VMs x {r.slots} window slots -> {r.horizon_slots} forecast slots "
        f"({r.grid_horizons} model horizons), model {r.model}, chunk {r.chunk_vms:,}",
        f"machine: {r.machine}",
    ]
    for t in r.runs:
        note = f"  [EXTRAPOLATED linearly from {t.extrapolated_from:,} VMs]" if t.extrapolated_from else ""
        lines.append(
            f"  {t.device:3s} ({t.engine}): wall {t.wall_s:.3f} s, {t.vms_per_s:,.0f} VMs/s, "
            f"{t.slot_predictions_per_s:,.0f} slot predictions/s, {t.model_rows_per_s:,.0f} model rows/s{note}"
        )
    if r.gpu_over_cpu is not None:
        lines.append(f"  speed-up {r.runs[0].device} over cpu: {r.gpu_over_cpu:.1f}x")
    return "\n".join(lines)
