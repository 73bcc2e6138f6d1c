"""`zhuge bench snapshot`: what a partition snapshot costs the worker (event-loop stall, time, bytes, restore).

One ``WindowStore`` is filled directly (vectorised, no samples decoded) with N VMs
x ``window_slots`` slots of realistic slot sums and counts: a diurnal CPU load at
0.1 % resolution, a dirty rate, a network rate from integer kb/s, integer MB of
memory, 5 samples per slot (one a minute) with some missed, 2 % of the slots
empty (NaN gaps) and 10 % of the VMs without network figures; each VM's daily
profile is full (VMs held for over a day), its window's slot means perturbed by
up to 10 % (full-entropy float32, NaN where the slot was empty), and so is its
weekly profile (each hour its time of day's profile value, perturbed). The store goes
into a ``Pipeline`` as partition 0 and the snapshot is taken the way the worker
takes it:

- ``periodic``: what the end of a batch does every ``snapshot_every_s``
  (``_maybe_snapshot`` under the pipeline lock; the file is written in the
  background, deflated where it pays), until the file is written;
- ``shutdown``: ``snapshot_all()`` (SIGTERM, revocation: written without
  deflate, awaited), until the file is written.

Meanwhile a heartbeat task sleeps 5 ms in a loop and records how late it woke
up: the worst overshoot is the longest the event loop was blocked (Kafka
heartbeats, commits and the metrics endpoint all wait that long). The same
heartbeat is run alone first (``idle_stall_ms``: what the shared machine costs
without any snapshot). ``lock_held_s`` is how long a batch arriving meanwhile
waits for the pipeline lock; ``cpu_s`` the process's CPU time (all threads) until the file
is written, what capacity planning adds per snapshot. Then the file is loaded and restored as a
rebuilding worker does (``SnapshotStore.load`` + ``Pipeline._restore``) and
compared with the original, bit for bit.
"""

from __future__ import annotations

import asyncio
import os
import platform
import resource
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from app.settings import Settings
from bench.machine import cpu_model
from gpu_kernels.features import TARGETS, WINDOW_CHANNELS, slots_per_day
from streams.pipeline import PartitionState, Pipeline
from streams.recovery import SnapshotStore
from streams.testing import store_differences
from streams.window_store import WindowStore

VMS_PER_HOST = 20
HEARTBEAT_S = 0.005
_CH = {c: i for i, c in enumerate(WINDOW_CHANNELS)}


def fill_store(n_vms: int, n_slots: int = 288, slot_s: int = 300, ttl_s: float = 3600.0, seed: int = 0,
               now: float = 1_700_000_000.0, chunk: int = 8192) -> tuple[WindowStore, set[str]]:  # fmt: skip
    """A store holding ``n_vms`` VMs with full windows (see the module docstring), and the VMs pending a score."""
    cap = 64
    while cap < n_vms:
        cap *= 2
    store = WindowStore(n_slots, slot_s, ttl_s, capacity=cap)
    rng = np.random.default_rng(seed)
    vms = np.array([f"vm-{i:07d}" for i in range(n_vms)], dtype=object)
    rows = store._rows_for(vms)
    hosts = store._host_codes([f"host-{h:05d}" for h in range((n_vms + VMS_PER_HOST - 1) // VMS_PER_HOST)])
    last_slot = int(now // slot_s)
    S = n_slots
    pos_slot = np.arange(S)  # ring position p holds the newest slot s <= last_slot with s % S == p
    slot_of_pos = last_slot - ((last_slot - pos_slot) % S)
    day = (slot_of_pos * slot_s / 86400.0).astype(np.float32)
    vcpus = rng.choice(np.array([1, 2, 4, 8, 16], np.float32), n_vms)
    mem_total = vcpus * 4096
    for lo in range(0, n_vms, chunk):
        hi = min(n_vms, lo + chunk)
        k = hi - lo
        r = rows[lo:hi]
        phase = rng.uniform(0, 1, (k, 1)).astype(np.float32)
        base = rng.uniform(5, 60, (k, 1)).astype(np.float32)
        amp = rng.uniform(0, 35, (k, 1)).astype(np.float32)
        n = rng.binomial(5, 0.97, (k, S)).astype(np.int32)  # samples per slot: one a minute, some missed
        n[rng.uniform(0, 1, (k, S)) < 0.02] = 0  # gaps
        counts = np.repeat(n[:, :, None], len(WINDOW_CHANNELS), axis=2)
        counts[rng.uniform(0, 1, k) < 0.10, :, _CH["net_mbps"]] = 0  # VMs reporting no network figures
        nf = n.astype(np.float32)
        cpu = np.clip(base + amp * np.sin(2 * np.pi * (day[None, :] + phase)) + rng.normal(0, 3, (k, S)).astype(np.float32), 0, 100)
        cpu_sum = np.round(cpu * nf, 1)  # a sum of samples at 0.1 % resolution
        dirty_sum = cpu_sum / 100 * vcpus[lo:hi, None] * rng.uniform(5, 80, (k, 1)).astype(np.float32)
        net_sum = np.round(cpu * nf * rng.uniform(10, 1500, (k, 1)).astype(np.float32)) / 1024  # integer kb/s over 1024
        mem_used = np.round(mem_total[lo:hi, None] * rng.uniform(0.3, 0.9, (k, 1)).astype(np.float32) + rng.normal(0, 40, (k, S)))
        sums = np.stack([cpu_sum, dirty_sum, net_sum, mem_used * nf], axis=-1).astype(np.float32)
        sums[counts == 0] = 0
        store.sums[r] = sums
        store.counts[r] = counts
        P = slots_per_day(slot_s)
        if S >= P:  # the profile: the newest day of slot means (NaN where empty), perturbed
            tg = [_CH[t] for t in TARGETS]
            newest = np.argsort(slot_of_pos)[-P:]  # ring positions of the newest day
            c = counts[:, newest][:, :, tg]
            mean = np.where(c > 0, sums[:, newest][:, :, tg] / np.maximum(c, 1), np.nan)
            prof = np.empty((k, P, len(TARGETS)), np.float32)
            prof[:, slot_of_pos[newest] % P] = mean * rng.uniform(0.9, 1.1, mean.shape)
            store.profile[r] = prof
            # the weekly profile: full too, each hour of the week its time of day's value, perturbed
            tod = (np.arange(store.week_buckets) * store.week_bucket_slots) % P
            store.week[r] = prof[:, tod] * rng.uniform(0.9, 1.1, (k, tod.size, len(TARGETS))).astype(np.float32)
    store.last_slot[rows] = last_slot
    store.last_ts[rows] = last_slot * slot_s + rng.uniform(0, slot_s, n_vms)
    store.last_seen[rows] = now - rng.uniform(0, 120, n_vms)
    store.mem_total_mb[rows] = mem_total
    store.vcpus[rows] = vcpus
    store.latest_net[rows] = np.round(rng.uniform(0, 200, n_vms), 3)
    store.latest_mem[rows] = np.round(mem_total * rng.uniform(0.3, 0.9, n_vms))
    store.latest_wss[rows] = np.where(rng.uniform(0, 1, n_vms) < 0.5, np.nan, np.round(mem_total * 0.2))
    store.host_code[rows] = hosts[np.arange(n_vms) // VMS_PER_HOST]
    store.scored_at[rows] = now - rng.uniform(0, 300, n_vms)
    store.scored_slot[rows] = last_slot - (rng.uniform(0, 1, n_vms) < 0.1)
    store.dropped_old = 17
    pending = {str(v) for v in vms[rng.uniform(0, 1, n_vms) < 0.1]}
    return store, pending


class Heartbeat:
    """Sleeps ``HEARTBEAT_S`` in a loop; records how late each wake-up was (the event loop's stalls)."""

    def __init__(self) -> None:
        self.lags: list[float] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.perf_counter()
            await asyncio.sleep(HEARTBEAT_S)
            self.lags.append(time.perf_counter() - t0 - HEARTBEAT_S)

    def start(self) -> Heartbeat:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="heartbeat")
        return self

    async def stop(self) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task

    @property
    def worst_ms(self) -> float:
        return 1000 * max(self.lags, default=0.0)

    @property
    def p99_ms(self) -> float:
        return 1000 * float(np.quantile(self.lags, 0.99)) if self.lags else 0.0


@dataclass
class SnapshotRun:
    path: str  # periodic | shutdown
    stall_ms: float  # worst event-loop stall while the snapshot ran
    stall_p99_ms: float
    lock_held_s: float  # a batch arriving meanwhile waits this long
    wall_s: float  # until the file is written
    cpu_s: float  # CPU time of the process (all threads) until then: what a worker spends on it
    bytes: int
    load_s: float  # SnapshotStore.load (read + decode)
    restore_s: float  # WindowStore.restore (what a rebuilding worker adds)
    exact: bool


@dataclass
class SnapshotBench:
    vms: int
    slots: int
    store_bytes: int
    snapshot_version: int
    machine: str
    idle_stall_ms: float
    runs: list[SnapshotRun] = field(default_factory=list)
    peak_rss_mb: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["median"] = self.medians()
        return d

    def medians(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for path in sorted({r.path for r in self.runs}):
            runs = [asdict(r) for r in self.runs if r.path == path]
            out[path] = {k: statistics.median(r[k] for r in runs) for k in runs[0] if k not in ("path", "exact")}
            out[path]["worst_stall_ms"] = max(r["stall_ms"] for r in runs)
        return out


def _machine() -> str:
    return f"{cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}, NumPy {np.__version__}"


async def _one(p: Pipeline, store: WindowStore, path: str) -> SnapshotRun:
    state = p.partitions[0]
    file = p.snapshots._path(0)
    if os.path.exists(file):
        os.remove(file)
    await asyncio.sleep(0.05)
    hb = Heartbeat().start()
    await asyncio.sleep(0.02)
    t0, c0 = time.perf_counter(), time.process_time()
    if path == "periodic":  # the end of a batch (Pipeline._process_once), under the lock
        state.last_snapshot = time.monotonic() - p.settings.snapshot_every_s - 1
        state.next_offset += 1  # a batch went through since the last one
        async with p._lock:
            await p._maybe_snapshot()
        held = time.perf_counter() - t0
        await p.wait_snapshots()  # the file, written in the background
    else:
        await p.snapshot_all()
        held = time.perf_counter() - t0
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    await asyncio.sleep(0.02)
    await hb.stop()
    size = os.path.getsize(file)
    t1 = time.perf_counter()
    snap = await asyncio.to_thread(p.snapshots.load, 0)
    t2 = time.perf_counter()
    assert snap is not None and snap.next_offset == state.next_offset and snap.last_record_crc == state.last_crc
    back, pending = await asyncio.to_thread(p._restore, snap)
    t3 = time.perf_counter()
    exact = not store_differences(store, back) and pending == state.pending
    del snap, back
    return SnapshotRun(path, round(hb.worst_ms, 1), round(hb.p99_ms, 2), round(held, 3), round(wall, 3), round(cpu, 3), size,
                       round(t2 - t1, 3), round(t3 - t2, 3), exact)  # fmt: skip


async def _bench(settings: Settings, vms: int, repeats: int, paths: list[str], workdir: str) -> SnapshotBench:
    store, pending = fill_store(vms, settings.window_slots, settings.slot_s, settings.vm_ttl_s)
    snaps = SnapshotStore(workdir, settings.consumer_group, settings.topic_metrics)
    p = Pipeline(settings, scorer=None, producer=None, redis_sink=None, snapshots=snaps)  # type: ignore[arg-type]
    p.partitions[0] = PartitionState(store=store, next_offset=123_456_789, redeliver_from=0, pending=pending, last_crc=4242)
    idle = Heartbeat().start()
    await asyncio.sleep(1.0)
    await idle.stop()
    from streams import window_store

    result = SnapshotBench(vms, store.n_slots, store.nbytes, window_store.SNAPSHOT_VERSION, _machine(), round(idle.worst_ms, 1))
    for _ in range(repeats):
        for path in paths:
            result.runs.append(await _one(p, store, path))
    result.peak_rss_mb = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 0)
    return result


def run_snapshot_bench(settings: Settings, vms: int = 100_000, repeats: int = 3, paths: list[str] | None = None,
                       workdir: str | None = None) -> SnapshotBench:  # fmt: skip
    """Fill a store with ``vms`` VMs and time its snapshot ``repeats`` times per path (see the module docstring)."""
    own = workdir is None
    folder = workdir or tempfile.mkdtemp(prefix="zhuge-snapshot-bench-")
    try:
        return asyncio.run(_bench(settings, vms, repeats, paths or ["periodic", "shutdown"], folder))
    finally:
        if own:
            shutil.rmtree(folder, ignore_errors=True)


def format_snapshot_bench(r: SnapshotBench) -> str:
    lines = [
        f"snapshot bench: {r.vms:,} VMs x {r.slots} slots in one partition, store {r.store_bytes / 1e6:,.0f} MB, "
        f"snapshot format v{r.snapshot_version}",
        f"machine: {r.machine}; event loop alone: worst stall {r.idle_stall_ms:.1f} ms",
    ]
    for run in r.runs:
        lines.append(
            f"  {run.path:8s}: worst loop stall {run.stall_ms:8.1f} ms (p99 {run.stall_p99_ms:6.1f}), lock held "
            f"{run.lock_held_s:6.2f} s, written in {run.wall_s:6.2f} s (CPU {run.cpu_s:6.2f} s), {run.bytes / 1e6:7.1f} MB, load {run.load_s:5.2f} s "
            f"+ restore {run.restore_s:5.2f} s, {'exact' if run.exact else 'NOT EXACT'}"
        )
    for path, m in r.medians().items():
        lines.append(
            f"  median {path}: stall {m['stall_ms']:.1f} ms (worst {m['worst_stall_ms']:.1f}), lock {m['lock_held_s']:.2f} s, "
            f"wall {m['wall_s']:.2f} s, CPU {m['cpu_s']:.2f} s, {m['bytes'] / 1e6:.1f} MB, load+restore {m['load_s'] + m['restore_s']:.2f} s"
        )
    lines.append(f"  peak RSS {r.peak_rss_mb:,.0f} MB")
    return "\n".join(lines)
