"""A vectorised, seeded synthetic fleet: realistic enough to exercise the pipeline.

Each VM has a type (vCPUs, memory), a base CPU level, a diurnal cycle with its own
phase and amplitude, a weekly cycle (quieter weekends), noise, random bursts and
rare level shifts. Memory used, disk and network follow the load and the VM's size.

Memory writes, what live migration cares about:

- every VM has a writable working set ``wss_mb``, a fixed fraction of the memory it
  uses: a few % (lognormal around 8 %, 2-40 %) for the mostly-read majority, 35-90 %
  for the write-heavy minority;
- the write-heavy minority (databases, caches, big-heap JVMs, in-memory analytics:
  ``WRITE_HEAVY_SHARE`` per type, about 19 % of the fleet, half of the xlarge VMs,
  5 % of the small ones) dirties memory at ``heavy_peak_dirty`` (lognormal, median
  1.8 GB/s, 0.3-3.5 GB/s) at its nominal weekday peak load, scaled by
  ``(load / peak load) ** 2`` (so at its nightly trough it is far lower, and a
  burst or level shift saturates at 1.25 x the peak load);
- the others dirty ``dirty_per_gib`` x GiB x ``load ** 1.3``: a few to tens of MB/s;
- a dirty rate (distinct pages per second) never exceeds the working set per second
  (``WSS_CALC_S``) nor ``DIRTY_MAX_MBPS``; the working set never exceeds memory used.

With the default settings and the qemu downtime model, this makes about 13 % of a
fleet unmigratable at its daily peak but fine at night, about 2 % never migratable
and the rest fine all day (``tests/unit/test_fleet.py`` measures it; README
"Simulator and replay"). The working set and the write-heavy draws come from their
own random stream: a seed's CPU, memory, disk and network are what they were before
those existed. Everything is NumPy over all VMs at once; one ``sample`` call is one
period.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# name, vCPUs, memory (MiB), share of the fleet
VM_TYPES: tuple[tuple[str, int, int, float], ...] = (
    ("small", 2, 4 * 1024, 0.40),
    ("medium", 4, 16 * 1024, 0.30),
    ("large", 8, 32 * 1024, 0.20),
    ("xlarge", 16, 64 * 1024, 0.10),
)
FIELDS: tuple[str, ...] = (
    "cpu_pct", "mem_total_mb", "mem_used_mb", "dirty_mbps", "net_rx_kbps", "net_tx_kbps",
    "disk_read_kbps", "disk_write_kbps", "vcpus", "wss_mb",
)
DAY_S = 86400.0
WEEK_S = 7 * DAY_S
BURST_RATE_PER_S = 1.0 / (2 * DAY_S)  # about one burst per VM every two days
BURST_MEAN_S = 900.0
SHIFT_RATE_PER_S = 1.0 / (5 * DAY_S)  # about one level shift per VM every five days
# Write-heavy VMs (databases, caches, big-heap JVMs, in-memory analytics): their share per
# type, in VM_TYPES order (about 19 % of the fleet; the large types more often).
WRITE_HEAVY_SHARE: tuple[float, ...] = (0.05, 0.18, 0.32, 0.50)
HEAVY_PEAK_DIRTY_MEDIAN = 1800.0  # MB/s at the nominal weekday peak load, lognormal
HEAVY_PEAK_DIRTY_SIGMA = 0.35
HEAVY_PEAK_DIRTY_RANGE = (300.0, 3500.0)
HEAVY_LOAD_EXPONENT = 2.0  # dirty rate ~ load**2: write traffic grows faster than CPU
HEAVY_BURST_MAX = 1.25  # above its nominal peak load (bursts, level shifts) the write rate saturates
DIRTY_MAX_MBPS = 4000.0  # what a guest can dirty in distinct pages per second, whatever its load
WSS_CALC_S = 1.0  # a dirty-rate window: the distinct pages dirtied in it fit the working set


def vm_ids(n: int) -> np.ndarray:
    return np.array([f"vm-{i:06d}" for i in range(1, n + 1)], dtype=object)


def host_ids(n: int) -> np.ndarray:
    return np.array([f"host-{i:04d}" for i in range(1, n + 1)], dtype=object)


@dataclass
class FleetSample:
    """One period for all VMs: columnar arrays, float64 ``(n_vms,)`` per field in FIELDS."""

    ts: float
    vm: np.ndarray  # object array of str
    host: np.ndarray  # object array of str, the host of each VM
    cpu_pct: np.ndarray
    mem_total_mb: np.ndarray
    mem_used_mb: np.ndarray
    dirty_mbps: np.ndarray
    net_rx_kbps: np.ndarray
    net_tx_kbps: np.ndarray
    disk_read_kbps: np.ndarray
    disk_write_kbps: np.ndarray
    vcpus: np.ndarray
    wss_mb: np.ndarray

    def host_net_kbps(self, host_index: np.ndarray, n_hosts: int) -> tuple[np.ndarray, np.ndarray]:
        """Host traffic (rx, tx) = sum of its VMs', per host index."""
        rx = np.bincount(host_index, weights=self.net_rx_kbps, minlength=n_hosts)
        tx = np.bincount(host_index, weights=self.net_tx_kbps, minlength=n_hosts)
        return rx, tx


class Fleet:
    """N VMs on H hosts; ``sample(ts)`` advances the bursts and level shifts to ``ts``."""

    def __init__(self, n_vms: int, n_hosts: int, seed: int = 0) -> None:
        if n_vms < 1 or n_hosts < 1:
            raise ValueError("a fleet needs at least one VM and one host")
        self.n_vms, self.n_hosts = n_vms, n_hosts
        self._rng = rng = np.random.default_rng(seed)
        shares = np.array([t[3] for t in VM_TYPES])
        self.vm_type = rng.choice(len(VM_TYPES), size=n_vms, p=shares / shares.sum())
        self.vcpus = np.array([t[1] for t in VM_TYPES], dtype=np.float64)[self.vm_type]
        self.mem_total_mb = np.array([t[2] for t in VM_TYPES], dtype=np.float64)[self.vm_type]
        self.vm = vm_ids(n_vms)
        # Spread VMs over hosts round-robin after a shuffle: every host gets VMs.
        self.host_index = rng.permutation(n_vms) % n_hosts
        self.host = host_ids(n_hosts)[self.host_index]
        self.base = rng.beta(2.0, 5.0, n_vms) * 60.0 + 3.0  # mean CPU % level
        self.diurnal_amp = rng.uniform(0.0, 0.8, n_vms)  # relative swing
        self.peak_s = (14.0 + rng.normal(0.0, 3.0, n_vms)) * 3600.0  # daily peak time of day (UTC)
        self.weekend_factor = rng.uniform(0.5, 1.0, n_vms)
        self.noise_sd = rng.uniform(0.03, 0.15, n_vms)
        self.mem_idle = rng.uniform(0.15, 0.45, n_vms)  # fraction of memory used when idle
        self.mem_load = rng.uniform(0.2, 0.45, n_vms)  # extra fraction at full load
        self.dirty_per_gib = rng.lognormal(np.log(4.0), 0.6, n_vms)  # MB/s per GiB at full load
        self.disk_kbps = rng.lognormal(np.log(4000.0), 1.0, n_vms) * self.vcpus / 4.0
        self.net_kbps = rng.lognormal(np.log(3000.0), 1.0, n_vms) * self.vcpus / 4.0
        # The writable working set and the write-heavy minority come from their own stream,
        # so the CPU, memory, disk and network of a seed are what they were without them.
        wrng = np.random.default_rng(None if seed is None else [seed, 1])
        self.write_heavy = wrng.random(n_vms) < np.array(WRITE_HEAVY_SHARE)[self.vm_type]
        self.wss_frac = np.where(
            self.write_heavy,
            wrng.uniform(0.35, 0.9, n_vms),  # writes to most of the memory it uses
            np.clip(wrng.lognormal(np.log(0.08), 0.7, n_vms), 0.02, 0.4),  # mostly reads: a few %
        )  # fraction of memory used
        lo, hi = HEAVY_PEAK_DIRTY_RANGE
        self.heavy_peak_dirty = np.clip(
            wrng.lognormal(np.log(HEAVY_PEAK_DIRTY_MEDIAN), HEAVY_PEAK_DIRTY_SIGMA, n_vms), lo, hi
        )
        self.peak_load = np.clip(self.base * (1.0 + self.diurnal_amp) / 100.0, 0.01, 1.0)  # nominal weekday peak, 0-1
        self.level = np.ones(n_vms)
        self.burst_left_s = np.zeros(n_vms)
        self.burst_amp = np.zeros(n_vms)
        self._last_ts: float | None = None

    def _advance(self, ts: float) -> None:
        """Carry bursts and level shifts forward by the time since the last call."""
        dt = 300.0 if self._last_ts is None else max(ts - self._last_ts, 0.0)
        self._last_ts = ts
        rng, n = self._rng, self.n_vms
        self.burst_left_s = np.maximum(self.burst_left_s - dt, 0.0)
        start = (rng.random(n) < -np.expm1(-BURST_RATE_PER_S * dt)) & (self.burst_left_s <= 0)
        self.burst_left_s = np.where(start, rng.exponential(BURST_MEAN_S, n) + dt, self.burst_left_s)
        self.burst_amp = np.where(start, rng.uniform(15.0, 60.0, n), self.burst_amp)
        shift = rng.random(n) < -np.expm1(-SHIFT_RATE_PER_S * dt)
        self.level = np.where(shift, np.clip(self.level * rng.lognormal(0.0, 0.4, n), 0.3, 3.0), self.level)

    def sample(self, ts: float) -> FleetSample:
        """All VMs' metrics at ``ts`` (epoch seconds)."""
        self._advance(ts)
        rng, n = self._rng, self.n_vms
        tod = np.mod(ts, DAY_S)
        diurnal = np.cos(2.0 * np.pi * (tod - self.peak_s) / DAY_S)  # +1 at the VM's peak
        weekday = int(np.floor(ts / DAY_S) + 3) % 7  # 1970-01-01 was a Thursday; 5, 6 = Sat, Sun
        weekly = self.weekend_factor if weekday >= 5 else 1.0
        noise = rng.normal(1.0, self.noise_sd)
        burst = np.where(self.burst_left_s > 0, self.burst_amp, 0.0)
        cpu = np.clip(self.base * self.level * (1.0 + self.diurnal_amp * diurnal) * weekly * noise + burst, 0.0, 100.0)
        load = cpu / 100.0
        mem_frac = np.clip(self.mem_idle + self.mem_load * load + rng.normal(0.0, 0.01, n), 0.05, 0.98)
        mem_used = self.mem_total_mb * mem_frac
        wss = self.wss_frac * mem_used
        light = self.dirty_per_gib * (self.mem_total_mb / 1024.0) * load**1.3
        heavy = self.heavy_peak_dirty * np.minimum(load / self.peak_load, HEAVY_BURST_MAX) ** HEAVY_LOAD_EXPONENT
        dirty = np.where(self.write_heavy, heavy, light) * rng.lognormal(0.0, 0.15, n)
        dirty = np.minimum(dirty, np.minimum(wss / WSS_CALC_S, DIRTY_MAX_MBPS))  # distinct pages fit the working set
        io = rng.lognormal(0.0, 0.3, (4, n))
        act = 0.1 + load
        return FleetSample(
            ts=float(ts), vm=self.vm, host=self.host, cpu_pct=cpu,
            mem_total_mb=self.mem_total_mb.copy(), mem_used_mb=mem_used, dirty_mbps=dirty,
            net_rx_kbps=self.net_kbps * act * io[0], net_tx_kbps=self.net_kbps * 0.7 * act * io[1],
            disk_read_kbps=self.disk_kbps * act * io[2], disk_write_kbps=self.disk_kbps * 0.5 * act * io[3],
            vcpus=self.vcpus.copy(), wss_mb=wss,
        )


def series(n_vms: int, n_hosts: int, start_ts: float, n_steps: int, period_s: float, seed: int) -> dict[str, np.ndarray]:
    """``n_steps`` periods of a fresh ``Fleet``: ``(n_steps, n_vms)`` float64 per field in FIELDS,
    plus ``vm`` and ``host`` ``(n_vms,)`` (str objects) and ``ts`` ``(n_steps,)``.

    Identical to calling ``Fleet(n_vms, n_hosts, seed).sample`` at each step's ``ts``.
    """
    fleet = Fleet(n_vms, n_hosts, seed)
    ts = start_ts + np.arange(n_steps, dtype=np.float64) * period_s
    out = {f: np.empty((n_steps, n_vms), dtype=np.float64) for f in FIELDS}
    for i, t in enumerate(ts):  # one vectorised step over all VMs per period
        s = fleet.sample(float(t))
        for f in FIELDS:
            out[f][i] = getattr(s, f)
    out["vm"] = fleet.vm.copy()
    out["host"] = fleet.host.copy()
    out["ts"] = ts
    return out
