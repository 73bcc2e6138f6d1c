"""Real live migrations between lab hosts, with the management layer's policy made explicit.

What a fleet's management layer (Nova, KubeVirt, a scheduler) does around QEMU:
start the destination QEMU with ``-incoming``, set ``downtime-limit`` (and lift
QEMU's own ``max-bandwidth``: the host link limits), ``migrate``, watch
``query-migrate``, and decide what happens to a migration that does not
converge: after ``timeout_s`` either **abort** it (``migrate_cancel``: the guest
keeps running where it was, nothing moved) or **force** it (raise the downtime
limit so the remainder is copied in one pause, however long). An optional
``ramp`` raises the limit in steps before that, as Nova's
``live_migration_downtime_steps`` does.

Measured outcome, from QEMU itself: total and setup time, bytes, dirty syncs,
the dirty rate QEMU saw while migrating, its own ``downtime`` figure and, from
QMP events on both ends (one host clock), the pause the guest really had:
source ``STOP`` to destination ``RESUME``. That pause is what ``downtime_ms``
reports: QEMU 7.2's own figure excludes the data still in flight and the
destination's resume, and reads 0 in some runs (seen here).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lab import qemu
from lab.state import LabState, lab_dir, load, updating

log = logging.getLogger(__name__)

POLL_S = 0.1
LIFTED_BANDWIDTH = 10**12  # QEMU's max-bandwidth out of the way: the host link limits
FORCE_LIMIT_MS = 600_000


class MigrationError(RuntimeError):
    """The migration could not be run (not: it did not converge; that is an outcome)."""


@dataclass(frozen=True)
class MigrationPolicy:
    """The management layer's rules for one migration."""

    downtime_limit_ms: float = 300.0
    timeout_s: float = 60.0
    on_timeout: str = "abort"  # "abort" or "force"
    ramp: tuple[tuple[float, float], ...] = ()  # (after s, downtime limit ms) steps

    def __post_init__(self) -> None:
        if self.on_timeout not in ("abort", "force"):
            raise ValueError(f"on_timeout must be abort or force, not {self.on_timeout!r}")
        if self.downtime_limit_ms <= 0 or self.timeout_s <= 0:
            raise ValueError("downtime_limit_ms and timeout_s must be positive")

    @property
    def name(self) -> str:
        return ("ramp+" if self.ramp else "") + self.on_timeout


@dataclass
class MigrationOutcome:
    vm: str
    host_from: str
    host_to: str
    start: float  # lab clock, epoch s
    end: float
    status: str  # completed, cancelled (aborted by the policy) or failed
    converged: bool  # completed within the downtime limit set at the start (not forced)
    policy: str
    downtime_limit_ms: float
    downtime_ms: float | None  # the guest's pause: source STOP -> destination RESUME (None: it never paused)
    qemu_downtime_ms: float | None
    total_ms: float
    setup_ms: float | None
    transferred_bytes: int
    downtime_bytes: int | None
    dirty_syncs: int
    dirty_rate_seen_mbps: float | None  # MiB/s QEMU measured while migrating (pages/s x 4 KiB)
    link_mbit: float
    trace: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def as_dict(self, with_trace: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not with_trace:
            d.pop("trace")
        return d

    def message(self, prediction: dict[str, Any] | None = None) -> dict[str, Any]:
        """The ``vm.migrations`` record: the outcome plus the prediction in force at the start."""
        msg: dict[str, Any] = {
            "vm": self.vm, "start": round(self.start, 3), "end": round(self.end, 3),
            "downtime_ms": round(self.downtime_ms or 0.0, 3), "total_ms": round(self.total_ms, 3),
            "bytes": self.transferred_bytes, "rounds": self.dirty_syncs, "converged": self.converged,
            "host_from": self.host_from, "host_to": self.host_to, "link_mbps": round(self.link_mbit / 8, 3),
            "downtime_limit_ms": self.downtime_limit_ms, "policy": self.policy,
        }  # fmt: skip
        if prediction:
            msg.update({k: v for k, v in prediction.items() if v is not None})
        return msg


async def _events(client: Any, sink: list[tuple[str, float]]) -> None:
    async for event in client.events:
        ts = event.get("timestamp", {})
        sink.append((event["event"], ts.get("seconds", 0) + ts.get("microseconds", 0) / 1e6))


def _first(events: list[tuple[str, float]], name: str) -> float | None:
    return next((t for e, t in events if e == name), None)


async def migrate(state_dir: str, lab: str, vm: str, to_host: str | None, policy: MigrationPolicy,
                  port: int = 4444, max_bandwidth_mbps: float | None = None) -> MigrationOutcome:  # fmt: skip
    """Live-migrate ``vm`` to ``to_host`` (default: the next host) and return what was measured.

    The lab state follows the guest: on completion it runs on the destination (the
    source QEMU is stopped); aborted or failed, it stays where it was.
    ``max_bandwidth_mbps`` (MiB/s): QEMU's own ``max-bandwidth`` for this migration,
    e.g. its share of the link in a drain (None: lifted, the host link limits).
    Concurrent migrations (``lab.drain``) need distinct ``port`` numbers; the state
    update at the end is one read-modify-write of this guest only, under the lab's
    file lock and with no ``await`` inside, so concurrent tasks and processes
    cannot lose each other's moves. Starting and stopping QEMU runs in a thread so
    the other migrations' watch loops keep their pace.
    """
    folder = lab_dir(state_dir, lab)
    state = load(folder)
    if state is None or vm not in state.guests:
        raise MigrationError(f"no guest {vm!r} in lab {lab!r}")
    guest = state.guests[vm]
    src = guest.process
    dest_name = to_host or _next_host(state, src.host)
    if dest_name == src.host or dest_name not in state.hosts:
        raise MigrationError(f"cannot migrate {vm} from {src.host} to {dest_name!r}")
    source_host, dest_host = state.hosts[src.host], state.hosts[dest_name]
    dest_folder = Path(src.folder).parent / f"{vm}@{dest_name}-{int(time.time() * 1000)}"
    dest = await asyncio.to_thread(qemu.launch, guest.spec, dest_host, state.image, dest_folder, incoming_port=port,
                                   accel=state.accel)  # fmt: skip
    try:
        await qemu.wait_qmp(dest)
        outcome = await _run(state, src, dest, source_host.link_mbit, policy, max_bandwidth_mbps)
    except BaseException:
        qemu.stop(dest)
        raise
    if outcome.status == "completed":
        with updating(folder) as st:  # first: the guest runs on dest from here on, whatever stopping src takes
            st.guests[vm].process = dest
        await asyncio.to_thread(qemu.stop, src)
    else:
        await asyncio.to_thread(qemu.stop, dest)
    return outcome


def _next_host(state: LabState, current: str) -> str:
    names = sorted(state.hosts)
    return names[(names.index(current) + 1) % len(names)]


async def _run(state: LabState, src: qemu.GuestProcess, dest: qemu.GuestProcess, link_mbit: float,
               policy: MigrationPolicy, max_bandwidth_mbps: float | None = None) -> MigrationOutcome:  # fmt: skip
    src_events: list[tuple[str, float]] = []
    dest_events: list[tuple[str, float]] = []
    trace: list[dict[str, Any]] = []
    async with qemu.qmp(src) as s, qemu.qmp(dest) as d:
        listeners = [asyncio.create_task(_events(s, src_events)), asyncio.create_task(_events(d, dest_events))]
        try:
            await s.execute("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
            bandwidth = LIFTED_BANDWIDTH if max_bandwidth_mbps is None else max(1, int(max_bandwidth_mbps * 2**20))
            await s.execute("migrate-set-parameters",
                            {"downtime-limit": int(policy.downtime_limit_ms), "max-bandwidth": bandwidth})  # fmt: skip
            start_lab, start_wall, t0 = state.clock.now(), time.time(), time.monotonic()
            await s.execute("migrate", {"uri": dest.incoming})
            info, forced = await _watch(s, policy, t0, trace)
            ended_wall = time.time()
            if info.get("status") == "completed":
                await _until(lambda: _first(dest_events, "RESUME") is not None, 5.0)
        finally:
            for task in listeners:
                task.cancel()
            await asyncio.gather(*listeners, return_exceptions=True)
    ram = info.get("ram", {})
    status = info.get("status", "failed")
    stop_t, resume_t = _first(src_events, "STOP"), _first(dest_events, "RESUME")
    completed = status == "completed" and stop_t is not None and resume_t is not None
    end_wall = resume_t if completed else ended_wall  # the guest runs on the destination from then on
    rates = [p["dirty_pages_rate"] for p in trace if p.get("dirty_pages_rate")]
    return MigrationOutcome(
        vm=src.name, host_from=src.host, host_to=dest.host, start=start_lab,
        end=start_lab + (end_wall - start_wall) * state.clock.speed, status=status,
        converged=completed and not forced, policy=policy.name, downtime_limit_ms=policy.downtime_limit_ms,
        downtime_ms=(resume_t - stop_t) * 1000 if completed else None, qemu_downtime_ms=info.get("downtime"),
        total_ms=(end_wall - start_wall) * 1000, setup_ms=info.get("setup-time"),
        transferred_bytes=int(ram.get("transferred", 0)), downtime_bytes=ram.get("downtime-bytes"),
        dirty_syncs=int(ram.get("dirty-sync-count", 0)),
        dirty_rate_seen_mbps=max(rates) * 4096 / 2**20 if rates else None, link_mbit=link_mbit, trace=trace,
    )  # fmt: skip


async def _watch(client: Any, policy: MigrationPolicy, t0: float, trace: list[dict[str, Any]]) -> tuple[dict, bool]:
    """Poll ``query-migrate`` until it ends, applying the policy; returns the last info and whether it was forced."""
    ramp = list(policy.ramp)
    forced = cancelled = False
    while True:
        info = await client.execute("query-migrate")
        elapsed = time.monotonic() - t0
        ram = info.get("ram", {})
        trace.append({"t": round(elapsed, 3), "status": info.get("status"), "remaining": ram.get("remaining"),
                      "transferred": ram.get("transferred"), "dirty_syncs": ram.get("dirty-sync-count"),
                      "dirty_pages_rate": ram.get("dirty-pages-rate"), "expected_downtime": info.get("expected-downtime")})  # fmt: skip
        if info.get("status") in ("completed", "failed", "cancelled"):
            return info, forced
        while ramp and elapsed >= ramp[0][0]:
            _, limit = ramp.pop(0)
            await client.execute("migrate-set-parameters", {"downtime-limit": int(limit)})
            forced = True
        if elapsed >= policy.timeout_s and not (forced and policy.on_timeout == "force") and not cancelled:
            if policy.on_timeout == "abort":
                await client.execute("migrate_cancel")
                cancelled = True
            else:
                await client.execute("migrate-set-parameters", {"downtime-limit": FORCE_LIMIT_MS})
                forced = True
        await asyncio.sleep(POLL_S)


async def _until(predicate: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)

