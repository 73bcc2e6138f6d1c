"""``zhuge lab up|down|status``: emulated hosts with QEMU guests on this machine.

``up`` builds (or reuses) the guest image, makes one network namespace per host
joined by rate-limited links (``lab.net``), boots the guests round-robin on the
hosts, records everything in the lab state (``lab.state``) and, when a guest has
a load program, starts the load driver (``zhuge lab drive``) in the background.
``down`` stops every QEMU and the driver and removes the namespaces. Several labs
can exist side by side under different names (tests use their own).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lab import net, qemu
from lab.image import ImageError, build_image
from lab.state import GuestState, LabClock, LabState, lab_dir, load, locked, save

Echo = Callable[[str], None]


class LabError(RuntimeError):
    """The lab cannot be brought up or down; the message says why and what to do."""


@dataclass(frozen=True)
class LabPlan:
    """What ``up`` builds."""

    hosts: int = 2
    link_mbit: float = 256.0
    guests: Sequence[qemu.GuestSpec] = (qemu.GuestSpec("vm1"), qemu.GuestSpec("vm2"))
    loads: dict[str, dict[str, Any]] | None = None  # guest -> load program (lab.load)
    clock: LabClock | None = None
    placement: dict[str, str] | None = None  # guest -> host name ("h1"...); the others round-robin


def check_tools() -> list[str]:
    return net.check_tools() + qemu.check_tools()


def _index(name: str) -> int:
    """The lab's subnet number, stable per name, in 20..239."""
    return 20 + int(hashlib.sha256(name.encode()).hexdigest(), 16) % 220


def up(state_dir: str, name: str, plan: LabPlan, echo: Echo = print) -> LabState:
    """Bring the lab up (or return it when it is already up with all its guests alive)."""
    folder = lab_dir(state_dir, name)
    with locked(folder):
        existing = load(folder)
        if existing is not None:
            dead = [g for g, st in existing.guests.items() if not st.process.alive()]
            if not dead:
                echo(f"lab {name}: already up ({len(existing.hosts)} hosts, {len(existing.guests)} guests)")
                return existing
            raise LabError(f"lab {name}: guests {dead} are not running; run `zhuge lab down` first")
        problems = check_tools()
        if problems:
            raise LabError("\n".join(problems))
        unknown = sorted(set((plan.placement or {}).values()) - {f"h{i}" for i in range(1, plan.hosts + 1)})
        if unknown:
            raise LabError(f"lab {name}: no host {', '.join(unknown)} (hosts h1..h{plan.hosts})")
        try:
            image = build_image()
        except ImageError as exc:
            raise LabError(str(exc)) from exc
        index = _index(name)
        net.destroy(name)  # leftovers of a lab that died without `down`
        hosts = {h.name: h for h in net.make_hosts(name, index, [plan.link_mbit] * plan.hosts)}
        accel = qemu.accelerator()
        echo(f"lab {name}: {plan.hosts} hosts on 10.233.{index}.0/24, links {plan.link_mbit:g} Mbit/s, {accel.upper()}")
        guests: dict[str, GuestState] = {}
        try:
            names = sorted(hosts)
            for i, spec in enumerate(plan.guests):
                host = hosts[(plan.placement or {}).get(spec.name) or names[i % len(names)]]
                process = qemu.launch(spec, host, image, folder / "guests" / spec.name, accel=accel)
                guests[spec.name] = GuestState(spec, process, (plan.loads or {}).get(spec.name, {}))
            for g in guests.values():
                took = qemu.wait_booted(g.process)
                echo(f"lab {name}: {g.spec.name} up on {g.process.host} in {took:.1f} s "
                     f"(RAM {g.spec.ram_mb} MB, workload {g.spec.mem_mb} MB, working set {g.spec.wss_mb} MB)")  # fmt: skip
        except BaseException:
            for g in guests.values():
                qemu.stop(g.process)
            net.destroy(name)
            raise
        state = LabState(name, index, accel, image, hosts, guests, plan.clock or LabClock())
        save(folder, state)
    if any(g.load for g in guests.values()):
        start_driver(state_dir, name)
    return state


def down(state_dir: str, name: str, echo: Echo = print) -> None:
    """Stop the driver and every QEMU of the lab, remove its namespaces and state."""
    folder = lab_dir(state_dir, name)
    stop_driver(state_dir, name)
    with locked(folder):
        state = load(folder)
        if state is not None:
            for guest in state.guests.values():
                qemu.stop(guest.process)
        for pid in _lab_qemu_pids(folder):  # destinations of migrations that were cut short
            _kill(pid)
        gone = net.destroy(name)
        for guest_folder in (folder / "guests").glob("*"):
            shutil.rmtree(qemu.socket_dir(guest_folder), ignore_errors=True)
        shutil.rmtree(folder / "guests", ignore_errors=True)
        (folder / "lab.json").unlink(missing_ok=True)
    echo(f"lab {name}: down (removed {len(gone)} namespaces)")


def status(state_dir: str, name: str) -> dict[str, Any]:
    """Hosts, guests (where they run, alive or not) and the driver, for printing."""
    folder = lab_dir(state_dir, name)
    state = load(folder)
    if state is None:
        return {"lab": name, "up": False}
    return {
        "lab": name, "up": True, "accel": state.accel, "namespaces": net.lab_namespaces(name),
        "hosts": {h.name: {"address": h.address, "link_mbit": h.link_mbit} for h in state.hosts.values()},
        "guests": {g: {"host": st.process.host, "pid": st.process.pid, "alive": st.process.alive(),
                       "ram_mb": st.spec.ram_mb, "mem_mb": st.spec.mem_mb, "wss_mb": st.spec.wss_mb,
                       "load": st.load or {"kind": "constant", "rate": st.spec.rate_mbps}}
                   for g, st in state.guests.items()},
        "driver": _driver_pid(folder) is not None,
    }  # fmt: skip


# ------------------------------------------------------------------------------ the load driver


def start_driver(state_dir: str, name: str) -> int:
    """Run ``zhuge lab drive`` detached (it plays the guests' load programs); returns its pid."""
    folder = lab_dir(state_dir, name)
    pid = _driver_pid(folder)
    if pid is not None:
        return pid
    log = open(folder / "driver.log", "ab")  # noqa: SIM115 - owned by the child
    env = {**os.environ, "ZHUGE_STATE_DIR": state_dir}
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "lab", "drive", "--name", name], stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, env=env)  # fmt: skip
    (folder / "driver.pid").write_text(f"{proc.pid}\n")
    return proc.pid


def stop_driver(state_dir: str, name: str) -> None:
    folder = lab_dir(state_dir, name)
    pid = _driver_pid(folder)
    if pid is not None:
        _kill(pid)
    (folder / "driver.pid").unlink(missing_ok=True)


def run_driver(state_dir: str, name: str) -> None:
    from lab.load import drive

    asyncio.run(drive(lab_dir(state_dir, name)))


def _driver_pid(folder: Path) -> int | None:
    try:
        pid = int((folder / "driver.pid").read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if b"lab\0drive" in cmdline else None


def _lab_qemu_pids(folder: Path) -> list[int]:
    """Every QEMU process whose sockets live under the lab's folder."""
    marker = str(folder / "guests").encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if qemu.QEMU.encode() in cmdline and marker in cmdline:
            pids.append(int(proc.name))
    return pids


def _kill(pid: int, timeout_s: float = 5.0) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
