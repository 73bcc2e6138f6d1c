"""The guest workload's control line (guest ``/dev/ttyS1``, host ``ctl.sock``): set its load, read its counters.

The protocol is lab/guest/workload.c's: ``set mem=<MB> wss=<MB> rate=<MiB/s> cpu=<%> pattern=<seq|rand>``
(any subset), answered, like every second, by a ``stat`` line with the pages it has
written so far. Those counters are the guest's own view of its dirty rate: the
cross-check of what the hypervisor measures.

QEMU's socket chardev serves one client at a time, so a controller connects, says
what it has to say and leaves (``send``), or holds the line while it drives a load.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from pathlib import Path

PAGE_BYTES = 4096
STAT_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class WorkloadStat:
    t: float  # guest monotonic seconds since the workload started
    pages: int  # pages written since start (one word per page per write)
    rate: float  # MiB/s written over the last second (0 in a reply to a command)
    mem: int
    wss: int
    target: float
    cpu: float
    pattern: str

    @classmethod
    def parse(cls, line: str) -> WorkloadStat:
        fields = dict(kv.split("=", 1) for kv in line.split()[1:] if "=" in kv)
        return cls(float(fields["t"]), int(fields["pages"]), float(fields["rate"]), int(fields["mem"]),
                   int(fields["wss"]), float(fields["target"]), float(fields["cpu"]), fields["pattern"])  # fmt: skip


def command(**params: object) -> str:
    """The ``set`` line for ``params`` (mem, wss, rate, cpu, pattern); None values are left out."""
    parts = [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items() if v is not None]
    return "set " + " ".join(parts) if parts else "stat"


class WorkloadLine:
    """One connection to a guest's control socket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, path: Path, timeout_s: float = STAT_TIMEOUT_S) -> WorkloadLine:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), timeout_s)
        return cls(reader, writer)

    async def send(self, **params: object) -> WorkloadStat:
        """Apply ``params`` (or just ask, with none) and return the workload's answer.

        The answer is checked against what was asked and the command sent again when it
        does not match (a line that arrives while the guest's UART is being set up can
        be lost): at most three tries.
        """
        for _ in range(3):
            self.writer.write((command(**params) + "\n").encode())
            await self.writer.drain()
            stat = await self.next_stat(reply=True)
            if _applied(stat, params):
                return stat
        raise ConnectionError(f"the workload did not apply {command(**params)!r} (it reports {stat})")

    async def next_stat(self, reply: bool = False, timeout_s: float = STAT_TIMEOUT_S) -> WorkloadStat:
        """The next ``stat`` line (``reply``: the one answering a command, whose rate field is 0)."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            left = deadline - asyncio.get_running_loop().time()
            line = (await asyncio.wait_for(self.reader.readline(), max(0.01, left))).decode(errors="replace")
            if not line:
                raise ConnectionError("workload line closed")
            if line.startswith("stat "):
                stat = WorkloadStat.parse(line)
                if not reply or stat.rate == 0:
                    return stat

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


def _applied(stat: WorkloadStat, params: dict[str, object]) -> bool:
    checks = {"mem": stat.mem, "wss": stat.wss, "rate": stat.target, "cpu": stat.cpu, "pattern": stat.pattern}
    for key, value in params.items():
        if value is None or key not in checks:
            continue
        got = checks[key]
        if isinstance(got, str) or isinstance(value, str):
            if str(got) != str(value):
                return False
        elif abs(float(got) - float(value)) > 1e-3 * max(1.0, abs(float(value))):  # type: ignore[arg-type]
            return False
    return True


async def send(path: Path, **params: object) -> WorkloadStat:
    """Connect, apply ``params``, disconnect."""
    line = await WorkloadLine.open(path)
    try:
        return await line.send(**params)
    finally:
        await line.close()


async def measured_rate(path: Path, seconds: float = 2.0) -> float:
    """The guest's own dirty-write rate (MiB/s) over ``seconds``, from its page counter."""
    line = await WorkloadLine.open(path)
    try:
        first = await line.send()
        await asyncio.sleep(seconds)
        last = await line.send()
    finally:
        await line.close()
    return (last.pages - first.pages) * PAGE_BYTES / 2**20 / max(1e-9, last.t - first.t)
