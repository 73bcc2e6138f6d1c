"""A local Redis Cluster on loopback for tests and benchmarks: N masters, no replicas, no persistence.

``start_redis_cluster(root)`` starts ``redis-server --cluster-enabled yes`` on
free loopback ports (each also needs its cluster bus port, +10000), joins them
with ``redis-cli --cluster create ... --cluster-replicas 0 --cluster-yes`` and
waits for ``cluster_state:ok`` on every node; ``LocalCluster.stop()`` stops
exactly the processes it started (pid and command line checked, as
``zhuge services`` does). Plain TCP without AUTH: a fixture, not a deployment.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from app.service_errors import MissingTool, ServiceError
from app.services import _spawn, _stop, _tail, free_port, port_in_use

HOST = "127.0.0.1"
BUS_OFFSET = 10000  # Redis' cluster bus listens on port + 10000


@dataclass
class LocalCluster:
    root: Path
    ports: list[int]
    pids: list[int] = field(default_factory=list)
    host: str = HOST

    @property
    def url(self) -> str:
        """A seed URL for ``ZHUGE_REDIS_URL`` (any node; the client discovers the others)."""
        return f"redis://{self.host}:{self.ports[0]}/0"

    def stop(self) -> None:
        for pid, port in zip(self.pids, self.ports):
            _stop(pid, ("redis-server", str(port)), timeout_s=10.0)
        self.pids = []

    def start_nodes(self) -> None:
        """Start every node's ``redis-server`` (its ``nodes.conf`` under ``root``, if any, brings the
        node back into the cluster it was in: how a test restarts the cluster after ``stop``)."""
        for port in self.ports:
            node = self.root / f"node-{port}"
            node.mkdir(parents=True, exist_ok=True)
            args = [shutil.which("redis-server") or "redis-server", "--bind", self.host, "--port", str(port),
                    "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "5000",
                    "--save", "", "--appendonly", "no", "--dir", str(node), "--daemonize", "no",
                    "--protected-mode", "no"]  # fmt: skip
            self.pids.append(_spawn(args, node, node / "redis.log"))

    def wait_ok(self, timeout_s: float = 30.0) -> None:
        """Until every node reports ``cluster_state:ok`` with all slots served; ServiceError after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        for port in self.ports:
            _wait(lambda p=port: _cluster_ok(self.host, p, len(self.ports)), deadline,
                  f"node {port} not in cluster_state:ok", self)  # fmt: skip


def cluster_tools() -> list[MissingTool]:
    """The programs a local cluster needs but cannot find."""
    return [MissingTool(t) for t in ("redis-server", "redis-cli") if shutil.which(t) is None]


def cluster_ports(n: int, host: str = HOST) -> list[int]:
    """``n`` free ports whose cluster bus ports are free too."""
    ports: list[int] = []
    while len(ports) < n:
        p = free_port(host)
        if p + BUS_OFFSET < 65536 and p not in ports and not port_in_use(host, p + BUS_OFFSET):
            ports.append(p)
    return ports


def start_redis_cluster(root: Path, ports: Sequence[int] | None = None, *, masters: int = 3,
                        timeout_s: float = 30.0) -> LocalCluster:  # fmt: skip
    """Start ``masters`` cluster nodes under ``root`` and join them into one cluster; stopped again on failure."""
    missing = cluster_tools()
    if missing:
        raise ServiceError("; ".join(str(m) for m in missing))
    cluster = LocalCluster(Path(root), list(ports) if ports else cluster_ports(masters))
    try:
        cluster.start_nodes()
        deadline = time.monotonic() + timeout_s
        for port in cluster.ports:
            _wait(lambda p=port: _cli(cluster.host, p, "PING") == "PONG", deadline, f"node {port} not answering",
                  cluster)  # fmt: skip
        create = subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"{cluster.host}:{p}" for p in cluster.ports),
             "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, text=True, timeout=max(1.0, deadline - time.monotonic()), check=False,
        )  # fmt: skip
        if create.returncode != 0:
            raise ServiceError(f"redis-cli --cluster create failed: {create.stdout[-2000:]}{create.stderr[-2000:]}")
        cluster.wait_ok(max(1.0, deadline - time.monotonic()))
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _cli(host: str, port: int, *command: str) -> str:
    try:
        out = subprocess.run(["redis-cli", "-h", host, "-p", str(port), *command], capture_output=True, text=True,
                             timeout=5, check=False)  # fmt: skip
    except subprocess.TimeoutExpired:
        return ""
    return out.stdout.strip()


def _cluster_ok(host: str, port: int, nodes: int) -> bool:
    info = dict(line.split(":", 1) for line in _cli(host, port, "CLUSTER", "INFO").splitlines() if ":" in line)
    return (info.get("cluster_state") == "ok" and info.get("cluster_slots_ok") == "16384"
            and info.get("cluster_known_nodes") == str(nodes))  # fmt: skip


def _wait(ok: object, deadline: float, what: str, cluster: LocalCluster) -> None:
    while not ok():  # type: ignore[operator]
        if time.monotonic() > deadline:
            logs = "\n".join(_tail(cluster.root / f"node-{p}" / "redis.log", 5) for p in cluster.ports)
            raise ServiceError(f"local Redis Cluster: {what}; node logs:\n{logs}")
        time.sleep(0.1)
