"""``zhuge agent``: a hypervisor agent that publishes its guests' samples to ``vm.metrics``.

Every ``period_s`` it reads every guest (``agent.qemu``: QMP and the QEMU process,
all guests of a host at once) and sends one message per host: a JSON array of
contract samples, keyed by the host's name, so a host's VMs stay on one
partition. Guests come from a lab (``--lab``: the lab state tells which QEMU holds
which guest on which host, and follows migrations) or from QMP sockets given on
the command line (``--qmp vm1=/run/qemu/vm1.qmp``: the QEMU process is found by
its socket). Sends are retried until acknowledged (``streams.sinks.kafka_out``),
so a broker outage delays samples, it does not lose them.

A guest that cannot be read this period (migrating, just started, gone) is
skipped and logged once; the others are sent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from agent.qemu import GuestReading, QemuGuestReader
from app.settings import Settings

log = logging.getLogger(__name__)
_encode = msgspec.json.Encoder().encode


@dataclass(frozen=True)
class Target:
    """One guest to read: where its QMP socket is and which QEMU process holds it."""

    vm: str
    host: str
    qmp_path: Path
    pid: int
    accel: str = "tcg"


def lab_targets(state_dir: str, lab: str) -> tuple[list[Target], Callable[[], float]]:
    """The lab's guests as they run now, and the lab's clock."""
    from lab.state import lab_dir, load

    state = load(lab_dir(state_dir, lab))
    if state is None:
        raise FileNotFoundError(f"no lab {lab!r} under {state_dir}: run `zhuge lab up` first")
    targets = [Target(name, g.process.host, g.process.qmp_path, g.process.pid, state.accel)
               for name, g in state.guests.items() if g.process.alive() and not g.process.incoming]  # fmt: skip
    return targets, state.clock.now


def find_qemu_pid(qmp_path: Path) -> int:
    """The QEMU process whose command line names ``qmp_path``."""
    needle = str(qmp_path).encode()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if needle in (proc / "cmdline").read_bytes():
                    return int(proc.name)
            except OSError:
                continue
    raise FileNotFoundError(f"no QEMU process with {qmp_path} on its command line")


def host_messages(readings: list[tuple[Target, GuestReading]], stamp: Callable[[float], float]) -> list[tuple[bytes, bytes]]:
    """One (key, value) per host: the host's samples as a JSON array, key = host name.

    Every sample of the cycle gets one time, ``stamp`` of the mean of the readings' times
    (the middles of their measurement windows, wall clock): the cycle's clock at the moment
    the rates describe, not at the end of the cycle. Why: the lab's clock runs 300x, so a
    1 s dirty-rate window is a whole 5-minute slot, and stamping when the page scan after it
    ended put samples a slot or two late: at the end of a busy phase the worker saw busy
    rates in what it took for the first quiet slot, and a migration started in the quiet
    window was recorded against a busy prediction (a CI failure).
    """
    by_host: dict[str, list[dict[str, Any]]] = {}
    now = stamp(sum(r.ts for _, r in readings) / len(readings)) if readings else 0.0
    for target, reading in readings:
        sample = reading.as_sample(target.host)
        sample["ts"] = round(now, 3)  # one clock for all guests of the cycle
        by_host.setdefault(target.host, []).append(sample)
    return [(host.encode(), _encode(samples)) for host, samples in sorted(by_host.items())]


class Agent:
    """Reads guests every period and produces their samples."""

    def __init__(self, settings: Settings, discover: Callable[[], tuple[list[Target], Callable[[], float]]], *,
                 period_s: float = 5.0, calc_s: float = 1.0, wss_calc_s: float = 0.0, wss_every: int = 0) -> None:  # fmt: skip
        self.settings = settings
        self.discover = discover
        self.period_s, self.calc_s = period_s, calc_s
        self.wss_calc_s, self.wss_every = wss_calc_s, wss_every
        self.readers: dict[tuple[str, int], QemuGuestReader] = {}
        self.wss: dict[str, float] = {}  # the last working-set estimate per guest (long windows are rare)
        self.cycles = 0
        self.sent = 0
        self._failing: set[str] = set()

    def _reader(self, t: Target) -> QemuGuestReader:
        key = (t.vm, t.pid)
        if key not in self.readers:
            self.readers[key] = QemuGuestReader(t.vm, t.qmp_path, t.pid, accel=t.accel)
        return self.readers[key]

    async def _read(self, t: Target, long_window: bool) -> GuestReading | None:
        try:
            reading = await self._reader(t).read(calc_s=self.calc_s, wss_calc_s=self.wss_calc_s if long_window else 0)
        except Exception as exc:  # migrating, stopping, not booted yet: skip it this period
            if t.vm not in self._failing:
                log.warning("guest %s not readable (%s: %s); skipping it until it is", t.vm, type(exc).__name__, exc)
                self._failing.add(t.vm)
            return None
        if t.vm in self._failing:
            log.info("guest %s readable again", t.vm)
            self._failing.discard(t.vm)
        if reading.wss_mb is not None:
            self.wss[t.vm] = reading.wss_mb
        elif t.vm in self.wss:
            reading = GuestReading(**{**reading.__dict__, "wss_mb": self.wss[t.vm]})
        return reading

    async def cycle(self) -> list[tuple[bytes, bytes]]:
        """Read every guest once; returns the per-host messages."""
        targets, clock = self.discover()
        long_window = self.wss_every > 0 and self.wss_calc_s > self.calc_s and self.cycles % self.wss_every == 0
        self.cycles += 1
        wall0, clock0 = time.time(), clock()
        readings = await asyncio.gather(*(self._read(t, long_window) for t in targets))
        wall1, clock1 = time.time(), clock()

        def stamp(wall: float) -> float:
            """A wall time inside the cycle on the cycle's clock (the lab's runs faster; linear over one cycle)."""
            return clock0 + (clock1 - clock0) * (wall - wall0) / max(wall1 - wall0, 1e-9)

        return host_messages([(t, r) for t, r in zip(targets, readings) if r is not None], stamp)

    async def run(self, *, cycles: int | None = None, stop: asyncio.Event | None = None) -> None:
        from aiokafka import AIOKafkaProducer

        from app.topics import ensure_topics
        from streams.sinks.kafka_out import OutRecord, send_all

        s = self.settings
        await ensure_topics(s, [s.topic_metrics])
        producer = AIOKafkaProducer(**s.aiokafka_kwargs(), linger_ms=5, acks="all")
        await producer.start()
        try:
            while (cycles is None or self.cycles < cycles) and not (stop and stop.is_set()):
                started = time.monotonic()
                messages = await self.cycle()
                await send_all(producer, [OutRecord(s.topic_metrics, k, v, output="metrics") for k, v in messages])
                self.sent += len(messages)
                left = self.period_s - (time.monotonic() - started)
                if left > 0:
                    if stop is None:
                        await asyncio.sleep(left)
                    else:
                        try:
                            await asyncio.wait_for(stop.wait(), left)
                        except asyncio.TimeoutError:
                            pass
        finally:
            await producer.stop()
