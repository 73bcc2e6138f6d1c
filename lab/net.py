"""Emulated hosts: one network namespace per host, joined by rate-limited veth links to a fabric.

::

    zl-<lab>-h1 (10.233.<n>.1) --veth, tc tbf <rate>--+
    zl-<lab>-h2 (10.233.<n>.2) --veth, tc tbf <rate>--+-- bridge in zl-<lab>-fab
    ...

A host's migration link is its veth's egress, shaped by ``tc tbf`` to the host's
rate (QEMU's own ``max-bandwidth`` is lifted, so the link limits the pre-copy and
the final stop-and-copy alike, as a real NIC does). All addresses live inside
namespaces this module creates; ``destroy`` removes them (and so every veth).
Needs root (or CAP_NET_ADMIN) and iproute2.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

SUBNET = "10.233"
TBF_LATENCY_MS = 50
TBF_BURST_KB = 256


class NetError(RuntimeError):
    """Namespaces or links could not be made; the message says why."""


@dataclass(frozen=True)
class Host:
    """One emulated hypervisor host."""

    name: str  # e.g. "h1"
    netns: str
    address: str  # its migration address inside the fabric
    link_mbit: float  # egress rate of its migration link, Mbit/s (0: unshaped)

    @property
    def link_mib_s(self) -> float:
        """The link rate in MiB/s, the unit of QEMU's dirty rates and of the lab's model inputs."""
        return self.link_mbit * 1e6 / 8 / 2**20


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise NetError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def check_tools() -> list[str]:
    """What is missing to build the fabric here (empty when all is well)."""
    missing = [t for t in ("ip", "tc") if shutil.which(t) is None]
    problems = [f"`{t}` not found (apt-get install iproute2)" for t in missing]
    if not missing and _ip("netns", "list", check=False).returncode != 0:
        problems.append("cannot list network namespaces (root or CAP_NET_ADMIN needed)")
    return problems


def fabric_name(lab: str) -> str:
    return f"zl-{lab}-fab"


def make_hosts(lab: str, index: int, links_mbit: list[float]) -> list[Host]:
    """Create the fabric and one namespace per host (``index``: the lab's subnet number, 1-250)."""
    fab = fabric_name(lab)
    _ip("netns", "add", fab)
    _ip("-n", fab, "link", "add", "br0", "type", "bridge")
    _ip("-n", fab, "link", "set", "br0", "up")
    _ip("-n", fab, "link", "set", "lo", "up")
    hosts = []
    for i, rate in enumerate(links_mbit, start=1):
        name = f"h{i}"
        ns = f"zl-{lab}-{name}"
        inner, outer = f"zl{index}h{i}", f"zl{index}h{i}b"
        address = f"{SUBNET}.{index}.{i}"
        _ip("netns", "add", ns)
        _ip("link", "add", inner, "netns", ns, "type", "veth", "peer", "name", outer, "netns", fab)
        _ip("-n", ns, "addr", "add", f"{address}/24", "dev", inner)
        _ip("-n", ns, "link", "set", inner, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", fab, "link", "set", outer, "master", "br0")
        _ip("-n", fab, "link", "set", outer, "up")
        host = Host(name, ns, address, float(rate))
        set_link(host, rate)
        hosts.append(host)
    return hosts


def interface(host: Host) -> str:
    """The host's veth inside its namespace."""
    out = _ip("-n", host.netns, "-o", "link", "show").stdout
    names = [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ": zl" in line]
    if not names:
        raise NetError(f"host {host.name}: no lab interface in {host.netns}")
    return names[0]


def set_link(host: Host, rate_mbit: float) -> Host:
    """Shape the host's egress to ``rate_mbit`` Mbit/s (0: remove the shaping)."""
    dev = interface(host)
    subprocess.run(["ip", "netns", "exec", host.netns, "tc", "qdisc", "del", "dev", dev, "root"], capture_output=True)
    if rate_mbit > 0:
        cmd = ["ip", "netns", "exec", host.netns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
               "rate", f"{rate_mbit}mbit", "burst", f"{TBF_BURST_KB}kb", "latency", f"{TBF_LATENCY_MS}ms"]  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise NetError(f"tc on {host.netns}/{dev}: {result.stderr.strip()}")
    return Host(host.name, host.netns, host.address, float(rate_mbit))


def lab_namespaces(lab: str) -> list[str]:
    """Every namespace of this lab that exists now."""
    out = _ip("netns", "list", check=False).stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [n for n in names if n.startswith(f"zl-{lab}-")]


def destroy(lab: str) -> list[str]:
    """Remove the lab's namespaces (their veths and addresses go with them); returns what was removed."""
    gone = []
    for ns in lab_namespaces(lab):
        if _ip("netns", "del", ns, check=False).returncode == 0:
            gone.append(ns)
    return gone
