"""What a KVM/QEMU hypervisor can measure of one guest, without any help from inside it.

- ``dirty_mbps``: QMP ``calc-dirty-rate`` then ``query-dirty-rate`` (MiB/s). QEMU
  offers three modes: ``dirty-ring`` (KVM with the dirty ring only),
  ``dirty-bitmap`` (counts every dirtied page; QEMU 7.2 under TCG crashes on it,
  seen here: a segfault in the KVM dirty-log path with no KVM) and
  ``page-sampling`` (hashes a sample of pages, compares after ``calc-time``).
  Where the guest runs on KVM the agent uses ``dirty-bitmap``; on TCG it uses
  page sampling with 16,384 pages per GiB (the default 512 read a guest
  dirtying 10 MiB/s as 6-8).
- ``wss_mb`` (writable working set, optional): the distinct pages dirtied over a
  long ``calc-time`` (``wss_calc_s``); reported only when that window saturated
  (fewer distinct pages than the short-window rate times the window), since a
  working set is only visible once the guest has gone round it.
- ``cpu_pct``: the vCPU threads' CPU time (``query-cpus-fast`` thread ids,
  ``/proc/<pid>/task/<tid>/stat``) over the sample's wall time, per vCPU.
- ``mem_total_mb``: ``query-memory-size-summary``; ``mem_used_mb``: resident,
  non-zero guest memory (what pre-copy round 0 sends, since QEMU skips zero
  pages), from the RAM mapping's pages in ``/proc/<pid>/pagemap`` and a sample of
  their contents read through ``/proc/<pid>/mem`` (needs the rights to trace
  the QEMU process; root here).
- no network or disk counters: the lab's guests have neither.

The libvirt equivalents (``virConnectGetAllDomainStats``): ``dirtyrate.megabytes_per_second``
(libvirt >= 7.2, after ``virDomainStartDirtyRateCalc``), ``vcpu.<n>.time``,
``balloon.current`` / ``balloon.rss``, ``net.<n>.rx.bytes`` / ``tx.bytes`` and
``block.<n>.rd.bytes`` / ``wr.bytes``: see ``agent/README`` in the main README.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

PAGE = 4096
SAMPLE_PAGES_PER_GIB = 16384
MEM_SAMPLE_PAGES = 2048
WSS_SATURATION = 0.8  # a long window holding < 80 % of rate x window: the guest went round its working set


@dataclass(frozen=True)
class GuestReading:
    """One sample of one guest, in the units of the ``vm.metrics`` contract."""

    vm: str
    ts: float  # epoch s (wall clock) at the middle of the window the rates were measured over
    cpu_pct: float
    vcpus: int
    mem_total_mb: float
    mem_used_mb: float
    dirty_mbps: float
    wss_mb: float | None = None

    def as_sample(self, host: str) -> dict[str, Any]:
        sample = {"vm": self.vm, "ts": round(self.ts, 3), "host": host, "cpu_pct": round(min(100.0, self.cpu_pct), 2),
                  "vcpus": self.vcpus, "mem_total_mb": self.mem_total_mb, "mem_used_mb": round(self.mem_used_mb, 1),
                  "dirty_mbps": round(self.dirty_mbps, 3)}  # fmt: skip
        if self.wss_mb is not None:
            sample["wss_mb"] = round(self.wss_mb, 1)
        return sample


async def dirty_rate(client: Any, calc_s: float, mode: str = "page-sampling", ram_mb: float = 512.0) -> float:
    """The guest's dirty rate (MiB/s) over ``calc_s`` seconds (blocks that long)."""
    args: dict[str, Any] = {"calc-time": max(1, int(round(calc_s)))}
    if mode == "page-sampling":
        args["sample-pages"] = SAMPLE_PAGES_PER_GIB
    else:
        args["mode"] = mode
    await client.execute("calc-dirty-rate", args)
    await asyncio.sleep(args["calc-time"])
    while True:
        result = await client.execute("query-dirty-rate")
        if result.get("status") == "measured":
            return float(result["dirty-rate"])
        await asyncio.sleep(0.05)


def vcpu_seconds(pid: int, tids: list[int]) -> float:
    """CPU seconds the vCPU threads have used (user + system)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for tid in tids:
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat)
    return total / ticks


def ram_mapping(pid: int, ram_mb: float) -> tuple[int, int] | None:
    """(start, end) of the QEMU process' guest-RAM mapping: the anonymous one of the guest's RAM size."""
    want = int(ram_mb) * 2**20
    best = None
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        m = re.match(r"^([0-9a-f]+)-([0-9a-f]+) rw", line)
        if not m:
            continue
        start, end = int(m.group(1), 16), int(m.group(2), 16)
        if end - start >= want and (best is None or end - start < best[1] - best[0]):
            best = (start, end)
    return best


def nonzero_resident_mb(pid: int, ram_mb: float, rng: np.random.Generator, sample: int = MEM_SAMPLE_PAGES) -> float:
    """Resident, non-zero guest memory (MiB): present pages from pagemap x the non-zero share of a sample."""
    span = ram_mapping(pid, ram_mb)
    if span is None:
        return float("nan")
    start, end = span
    n_pages = (end - start) // PAGE
    with open(f"/proc/{pid}/pagemap", "rb") as fh:
        fh.seek(start // PAGE * 8)
        entries = np.frombuffer(fh.read(n_pages * 8), dtype=np.uint64)
    present = np.flatnonzero(entries >> np.uint64(63))
    if present.size == 0:
        return 0.0
    picks = rng.choice(present, size=min(sample, present.size), replace=False)
    nonzero = 0
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for page in picks.tolist():
            mem.seek(start + page * PAGE)
            if any(mem.read(PAGE)):
                nonzero += 1
    return present.size * (nonzero / picks.size) * PAGE / 2**20


class QemuGuestReader:
    """Reads one guest through its QMP socket and its QEMU process."""

    def __init__(self, vm: str, qmp_path: Path, pid: int, *, accel: str = "tcg", seed: int = 0) -> None:
        self.vm, self.qmp_path, self.pid = vm, qmp_path, pid
        self.mode = "dirty-bitmap" if accel == "kvm" else "page-sampling"
        self.rng = np.random.default_rng(seed)

    async def read(self, *, calc_s: float = 1.0, wss_calc_s: float = 0.0) -> GuestReading:
        """One sample: a ``calc_s`` dirty-rate window (and a ``wss_calc_s`` one when > 0) plus the rest."""
        from qemu.qmp import QMPClient

        client = QMPClient(self.vm)
        client.logger.setLevel("WARNING")
        await client.connect(str(self.qmp_path))
        try:
            size = await client.execute("query-memory-size-summary")
            ram_mb = size["base-memory"] / 2**20
            tids = [c["thread-id"] for c in await client.execute("query-cpus-fast")]
            wall0, t0, cpu0 = time.time(), time.monotonic(), vcpu_seconds(self.pid, tids)
            rate = await dirty_rate(client, calc_s, self.mode, ram_mb)
            t1, cpu1 = time.monotonic(), vcpu_seconds(self.pid, tids)
            wss = None
            if wss_calc_s > calc_s:
                long_rate = await dirty_rate(client, wss_calc_s, self.mode, ram_mb)
                distinct = long_rate * round(wss_calc_s)
                if rate > 0 and distinct < WSS_SATURATION * rate * round(wss_calc_s):
                    wss = distinct
        finally:
            await client.disconnect()
        used = await asyncio.to_thread(nonzero_resident_mb, self.pid, ram_mb, self.rng)
        cpu = 100.0 * (cpu1 - cpu0) / max(1e-6, t1 - t0) / max(1, len(tids))
        return GuestReading(self.vm, wall0 + (t1 - t0) / 2, cpu, len(tids), ram_mb, used, rate, wss)
