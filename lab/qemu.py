"""QEMU guest processes of the lab: launch on an emulated host, talk QMP, stop.

Each guest is a ``qemu-system-x86_64`` started inside its host's network
namespace (``ip netns exec``), daemonised with a pid file and a console log in
its folder, and two unix sockets in a short folder of its own (``socket_dir``: a
socket path must fit in 107 bytes): ``qmp.sock`` (QMP, through the ``qemu.qmp``
library) and ``ctl.sock`` (the workload's control line, guest ``/dev/ttyS1``).
A migration target is the same command line plus ``-incoming`` on the
destination host's address. KVM is used when it works, TCG otherwise (the
same accelerator on both ends, so any guest can move to any host).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lab.image import INSTALL_HINT, GuestImage
from lab.net import Host

QEMU = "qemu-system-x86_64"
BOOT_TIMEOUT_S = 60.0
KVM_CREATE_VM = 0xAE01


class GuestError(RuntimeError):
    """A guest did not start or stop as asked; the message says why (with its console)."""


@dataclass(frozen=True)
class GuestSpec:
    """What a lab guest is: its size and the workload it starts with."""

    name: str
    ram_mb: int = 512
    mem_mb: int = 128  # resident, non-zero memory the workload keeps (the guest OS adds its own)
    wss_mb: int = 64  # writable working set inside it
    rate_mbps: float = 0.0  # dirty rate, MiB/s
    cpu_pct: float = 0.0  # extra busy share
    pattern: str = "seq"

    def cmdline(self) -> str:
        return (f"console=ttyS0 quiet panic=0 zhuge.mem={self.mem_mb} zhuge.wss={self.wss_mb} "
                f"zhuge.rate={self.rate_mbps:g} zhuge.cpu={self.cpu_pct:g} zhuge.pattern={self.pattern}")  # fmt: skip


@dataclass(frozen=True)
class GuestProcess:
    """A running QEMU of one guest on one host."""

    name: str
    host: str
    pid: int
    folder: str
    incoming: str = ""  # "tcp:addr:port" while it waits for a migration

    @property
    def qmp_path(self) -> Path:
        return socket_dir(Path(self.folder)) / "qmp.sock"

    @property
    def ctl_path(self) -> Path:
        return socket_dir(Path(self.folder)) / "ctl.sock"

    @property
    def console_path(self) -> Path:
        return Path(self.folder) / "console.log"

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        cmdline = Path(f"/proc/{self.pid}/cmdline")
        return cmdline.exists() and QEMU.encode() in cmdline.read_bytes()

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def socket_dir(folder: Path) -> Path:
    """Where a guest's unix sockets live: a short path (a socket path must fit 107 bytes), one per folder."""
    digest = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "zhuge-lab" / digest


def kvm_usable() -> bool:
    """True when KVM can run guests here: the CPU has VMX/SVM and /dev/kvm creates a VM.

    /dev/kvm alone is not enough: on a CPU without VMX/SVM (a VM without nested
    virtualisation) it may exist and even create VMs whose vCPUs never run.
    """
    flags = Path("/proc/cpuinfo").read_text(errors="replace") if Path("/proc/cpuinfo").exists() else ""
    if not any(f" {flag}" in flags for flag in ("vmx", "svm")):
        return False
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        vm = fcntl.ioctl(fd, KVM_CREATE_VM, 0)
        os.close(vm)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def accelerator() -> str:
    return "kvm" if kvm_usable() else "tcg"


def check_tools() -> list[str]:
    return [] if shutil.which(QEMU) else [f"`{QEMU}` not found: {INSTALL_HINT}"]


def launch(spec: GuestSpec, host: Host, image: GuestImage, folder: Path, *, incoming_port: int | None = None,
           accel: str | None = None) -> GuestProcess:  # fmt: skip
    """Start the guest's QEMU on ``host``; with ``incoming_port`` it waits for a migration instead of booting."""
    folder.mkdir(parents=True, exist_ok=True)
    sockets = socket_dir(folder)
    sockets.mkdir(parents=True, exist_ok=True, mode=0o700)
    for leftover in (sockets / "qmp.sock", sockets / "ctl.sock", folder / "qemu.pid"):
        leftover.unlink(missing_ok=True)
    accel = accel or accelerator()
    accel_args = ["-accel", "kvm", "-cpu", "host"] if accel == "kvm" else ["-accel", "tcg,tb-size=64", "-cpu", "Nehalem"]
    cmd = [
        "ip", "netns", "exec", host.netns, QEMU, *accel_args, "-name", f"guest={spec.name}",
        "-m", str(spec.ram_mb), "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none",
        "-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", spec.cmdline(),
        "-serial", f"file:{folder / 'console.log'}",
        "-serial", f"unix:{sockets / 'ctl.sock'},server=on,wait=off",
        "-qmp", f"unix:{sockets / 'qmp.sock'},server=on,wait=off",
        "-pidfile", str(folder / "qemu.pid"), "-daemonize",
    ]  # fmt: skip
    incoming = f"tcp:{host.address}:{incoming_port}" if incoming_port else ""
    if incoming:
        cmd += ["-incoming", incoming]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise GuestError(f"{spec.name}: QEMU did not start on {host.name}: {result.stderr.strip()[-2000:]}")
    pid = int((folder / "qemu.pid").read_text().strip())
    return GuestProcess(spec.name, host.name, pid, str(folder), incoming)


def wait_booted(guest: GuestProcess, timeout_s: float = BOOT_TIMEOUT_S) -> float:
    """Seconds until the guest's /init reported the workload up (its console line)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        text = guest.console_path.read_text(errors="replace") if guest.console_path.exists() else ""
        if "zhuge guest up" in text and guest.ctl_path.exists():
            return time.monotonic() - t0
        if not guest.alive():
            raise GuestError(f"{guest.name}: QEMU exited while booting; console:\n{text[-2000:]}")
        time.sleep(0.1)
    raise GuestError(f"{guest.name}: not booted after {timeout_s:.0f} s; console:\n{_tail(guest.console_path)}")


def stop(guest: GuestProcess, timeout_s: float = 5.0) -> None:
    """Terminate the guest's QEMU (SIGTERM, then SIGKILL)."""
    if not guest.alive():
        return
    os.kill(guest.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while guest.alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    if guest.alive():
        os.kill(guest.pid, signal.SIGKILL)


@contextlib.asynccontextmanager
async def qmp(guest: GuestProcess) -> AsyncIterator[Any]:
    """A connected ``qemu.qmp.QMPClient`` for the guest (disconnected on exit)."""
    from qemu.qmp import QMPClient

    client = QMPClient(guest.name)
    client.logger.setLevel("WARNING")
    await client.connect(str(guest.qmp_path))
    try:
        yield client
    finally:
        with contextlib.suppress(Exception):
            await client.disconnect()


async def wait_qmp(guest: GuestProcess, timeout_s: float = 10.0) -> None:
    """Until the guest's QMP socket accepts a connection."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            async with qmp(guest):
                return
        except Exception:  # noqa: BLE001 - not listening yet
            if asyncio.get_running_loop().time() > deadline or not guest.alive():
                raise GuestError(f"{guest.name}: QMP at {guest.qmp_path} does not answer") from None
            await asyncio.sleep(0.1)


def _tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "(no console)"
