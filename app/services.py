"""Local Kafka (KRaft, from Maven Central jars) and Redis for development and tests.

`zhuge services up|down|status` and the integration-test fixture both call
:func:`up`, :func:`down` and :func:`status`. Addresses come from ``Settings``
(``kafka_host_port``, ``redis_url``), state lives under
``<state_dir>/services/<name>-<port>/``, so several stacks on different ports
run side by side. We only ever stop processes we started: each has a pid file,
and its ``/proc/<pid>/cmdline`` must still match before we signal it.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from app.settings import Settings

Echo = Callable[[str], None]

POM = Path(__file__).resolve().parents[1] / "ops" / "kafka" / "pom.xml"
KAFKA_HEAP = ("-Xms128m", "-Xmx512m")
START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 30.0

INSTALL_HINTS = {
    "java": "Java 17+ runs the Kafka broker: apt-get install openjdk-17-jre-headless",
    "mvn": "Maven resolves the Kafka jars from Maven Central (once): apt-get install maven",
    "redis-server": "Redis runs from the system package: apt-get install redis-server",
}


class ServiceError(RuntimeError):
    """A service could not be started or stopped; the message says what to do."""


class MissingTool(ServiceError):
    """A program we need is not on PATH."""

    def __init__(self, tool: str) -> None:
        self.tool = tool
        super().__init__(f"`{tool}` not found on PATH. {INSTALL_HINTS.get(tool, '')}".strip())


@dataclass(frozen=True)
class ServiceStatus:
    name: str  # "kafka" or "redis"
    state: str  # "running", "stopped" or "foreign" (port held by a process we did not start)
    address: str
    pid: int | None = None
    detail: str = ""


# --------------------------------------------------------------------------- paths


def kafka_version() -> str:
    """The broker version pinned in ``ops/kafka/pom.xml`` (one source of truth)."""
    match = re.search(r"<kafka\.version>([^<]+)</kafka\.version>", POM.read_text()) if POM.exists() else None
    if not match:
        raise ServiceError(f"cannot read <kafka.version> from {POM}: run zhuge services from a source checkout")
    return match.group(1).strip()


def kafka_home(settings: Settings) -> Path:
    """Jar cache: ``ZHUGE_KAFKA_HOME`` or ``~/.cache/zhuge/kafka-<version>`` (holds ``libs/``)."""
    if settings.kafka_home:
        return Path(settings.kafka_home).expanduser().resolve()
    return Path.home() / ".cache" / "zhuge" / f"kafka-{kafka_version()}"


def service_dir(settings: Settings, name: str, port: int) -> Path:
    return Path(settings.state_dir).expanduser().resolve() / "services" / f"{name}-{port}"


def redis_address(settings: Settings) -> tuple[str, int, str | None]:
    """(host, port, password) of ``redis_url``; a local redis-server cannot serve rediss://."""
    url = urlsplit(settings.redis_url)
    if url.scheme == "rediss":
        raise ServiceError("zhuge services starts a plain local Redis; a rediss:// URL points at a managed Redis")
    if url.scheme not in ("redis", ""):
        raise ServiceError(f"unsupported Redis URL scheme {url.scheme!r} in {settings.redis_url!r}")
    host = _loopback(url.hostname or "127.0.0.1")
    password = unquote(url.password) if url.password else None
    return host, url.port or 6379, password


def _loopback(host: str) -> str:
    return "127.0.0.1" if host == "localhost" else host


# --------------------------------------------------------------------------- processes


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _read_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None


Marker = tuple[str, ...]


def _matches(pid: int, marker: Marker) -> bool:
    cmdline = _cmdline(pid)
    return bool(cmdline) and all(part in cmdline for part in marker)


def owned_pid(pid_file: Path, marker: Marker) -> int | None:
    """The pid in ``pid_file`` if that process is alive and its cmdline contains every ``marker`` part."""
    pid = _read_pid(pid_file)
    if pid is None:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return None
    state = _proc_state(pid)
    if state in ("Z", "X"):  # a zombie child of ours: reap and forget it
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        return None
    return pid if _matches(pid, marker) else None


def _proc_state(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "X"
    return stat.rpartition(")")[2].split()[0]


def port_in_use(host: str, port: int) -> bool:
    """True when something already listens on host:port (we cannot bind it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _spawn(args: list[str], cwd: Path, log: Path) -> int:
    """Start a detached process (own session, survives the CLI) and return its pid."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            args, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    return proc.pid


def _stop(pid: int, marker: Marker, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM, wait, then SIGKILL; re-checks the cmdline so a recycled pid is never hit."""
    if not _matches(pid, marker):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        if _proc_state(pid) in ("Z", "X") or not _matches(pid, marker):
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --------------------------------------------------------------------------- kafka


def resolve_kafka(settings: Settings, echo: Echo = print) -> Path:
    """Copy the broker jars from Maven Central into the cache once; return the ``libs`` folder."""
    home = kafka_home(settings)
    libs = home / "libs"
    done = home / ".resolved"
    if done.exists():
        return libs
    if shutil.which("mvn") is None:
        raise MissingTool("mvn")
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two stacks starting at once download once
        if done.exists():
            return libs
        version = kafka_version()
        echo(f"resolving Kafka {version} jars from Maven Central into {libs} (once) ...")
        staging = Path(tempfile.mkdtemp(prefix="libs-", dir=home))
        cmd = [
            "mvn", "-q", "-B", "-f", str(POM), "dependency:copy-dependencies",
            "-DincludeScope=runtime", f"-DoutputDirectory={staging}", f"-Dkafka.version={version}",
        ]  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0 or not list(staging.glob("kafka_2.13-*.jar")):
            shutil.rmtree(staging, ignore_errors=True)
            raise ServiceError(f"mvn could not resolve the Kafka jars:\n{(result.stdout + result.stderr)[-3000:]}")
        shutil.rmtree(libs, ignore_errors=True)
        staging.rename(libs)
        done.write_text(version + "\n")
    return libs


def _kafka_properties(settings: Settings, host: str, port: int, controller_port: int, data: Path) -> str:
    return "\n".join(
        [
            "# written by zhuge services: single-node KRaft, broker and controller in one process",
            "process.roles=broker,controller",
            "node.id=1",
            f"controller.quorum.bootstrap.servers={host}:{controller_port}",
            f"listeners=PLAINTEXT://{host}:{port},CONTROLLER://{host}:{controller_port}",
            f"advertised.listeners=PLAINTEXT://{host}:{port}",
            "controller.listener.names=CONTROLLER",
            "inter.broker.listener.name=PLAINTEXT",
            "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            f"log.dirs={data}",
            f"num.partitions={settings.topic_partitions}",
            "default.replication.factor=1",
            "offsets.topic.replication.factor=1",
            "offsets.topic.num.partitions=8",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "share.coordinator.state.topic.replication.factor=1",
            "share.coordinator.state.topic.min.isr=1",
            "group.initial.rebalance.delay.ms=0",
            "auto.create.topics.enable=true",
            "log.retention.hours=24",
            "log.segment.bytes=67108864",
            "",
        ]
    )


def _log4j_properties(logs: Path) -> str:
    return "\n".join(
        [
            "status = warn",
            "appender.file.type = File",
            "appender.file.name = file",
            f"appender.file.fileName = {logs / 'server.log'}",
            "appender.file.layout.type = PatternLayout",
            "appender.file.layout.pattern = [%d] %p %m (%c)%n",
            "rootLogger.level = INFO",
            "rootLogger.appenderRef.file.ref = file",
            "logger.kafka.name = org.apache.kafka",
            "logger.kafka.level = WARN",
            "",
        ]
    )


def _cluster_id() -> str:
    """A KRaft cluster id: 16 random bytes, URL-safe base64, not starting with '-' (as Kafka's Uuid)."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cid.startswith("-"):
            return cid


def _kafka_marker(props: Path) -> Marker:
    return ("kafka.Kafka", str(props))


def _start_kafka(settings: Settings, echo: Echo) -> int:
    host, port = settings.kafka_host_port
    host = _loopback(host)
    root = service_dir(settings, "kafka", port)
    props, pid_file = root / "server.properties", root / "kafka.pid"
    if shutil.which("java") is None:
        raise MissingTool("java")
    libs = resolve_kafka(settings, echo)
    data, logs = root / "data", root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    (root / "log4j2.properties").write_text(_log4j_properties(logs))
    java = ["java", *KAFKA_HEAP, "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={root / 'log4j2.properties'}", "-cp", f"{libs}/*"]  # fmt: skip
    controller_file = root / "controller.port"
    controller = _read_pid(controller_file)  # the port the quorum was formatted with
    if controller is None or not (data / "meta.properties").exists() or port_in_use(host, controller):
        if data.exists():
            echo(f"kafka: controller port {controller} unavailable or data unformatted; starting with fresh data")
        shutil.rmtree(data, ignore_errors=True)
        controller = free_port(host)
        props.write_text(_kafka_properties(settings, host, port, controller, data))
        fmt = [*java, "kafka.tools.StorageTool", "format", "--standalone", "-t", _cluster_id(), "-c", str(props)]
        result = subprocess.run(fmt, capture_output=True, text=True, cwd=root)
        if result.returncode != 0:
            raise ServiceError(f"formatting Kafka storage failed:\n{(result.stdout + result.stderr)[-3000:]}")
        controller_file.write_text(f"{controller}\n")
    else:
        props.write_text(_kafka_properties(settings, host, port, controller, data))
    pid = _spawn([*java, "kafka.Kafka", str(props)], root, logs / "stdout.log")
    pid_file.write_text(f"{pid}\n")
    return pid


async def _kafka_answers(settings: Settings, timeout_ms: int = 3000) -> bool:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(**settings.aiokafka_kwargs(), request_timeout_ms=timeout_ms)
    try:
        await admin.start()
        await admin.list_topics()
        return True
    except Exception:  # noqa: BLE001 - any failure means "not yet"
        return False
    finally:
        with contextlib.suppress(Exception):
            await admin.close()


def kafka_ready(settings: Settings) -> bool:
    """The port accepts connections, then one metadata round trip through aiokafka's admin client."""
    import asyncio

    host, port = settings.kafka_host_port
    try:  # cheap check first: aiokafka logs every refused connection at ERROR
        socket.create_connection((_loopback(host), port), timeout=1).close()
    except OSError:
        return False
    return asyncio.run(_kafka_answers(settings))


def redis_ready(settings: Settings) -> bool:
    """PING answered."""
    import redis

    client = redis.from_url(settings.redis_url, socket_connect_timeout=1, socket_timeout=2)
    try:
        return bool(client.ping())
    except Exception:  # noqa: BLE001 - any failure means "not yet"
        return False
    finally:
        client.close()


# --------------------------------------------------------------------------- redis


def _redis_marker(port: int) -> Marker:
    # redis-server rewrites its title to "redis-server host:port"; before that argv has "--port N"
    return ("redis-server", str(port))


def _start_redis(settings: Settings, echo: Echo) -> int:
    host, port, password = redis_address(settings)
    exe = shutil.which("redis-server")
    if exe is None:
        raise MissingTool("redis-server")
    root = service_dir(settings, "redis", port)
    root.mkdir(parents=True, exist_ok=True)
    args = [exe, "--bind", host, "--port", str(port), "--save", "", "--appendonly", "no",
            "--dir", str(root), "--daemonize", "no", "--protected-mode", "no"]  # fmt: skip
    if password:
        args += ["--requirepass", password]
    pid = _spawn(args, root, root / "redis.log")
    (root / "redis.pid").write_text(f"{pid}\n")
    return pid


# --------------------------------------------------------------------------- public API


def _kafka_paths(settings: Settings) -> tuple[str, int, Path, Marker]:
    host, port = settings.kafka_host_port
    root = service_dir(settings, "kafka", port)
    return _loopback(host), port, root / "kafka.pid", _kafka_marker(root / "server.properties")


def _redis_paths(settings: Settings) -> tuple[str, int, Path, Marker]:
    host, port, _ = redis_address(settings)
    root = service_dir(settings, "redis", port)
    return host, port, root / "redis.pid", _redis_marker(port)


def status(settings: Settings) -> list[ServiceStatus]:
    """Each service: running (ours), foreign (port held by someone else) or stopped."""
    out = []
    for name, paths in (("kafka", _kafka_paths), ("redis", _redis_paths)):
        host, port, pid_file, marker = paths(settings)
        address = f"{host}:{port}"
        pid = owned_pid(pid_file, marker)
        if pid is not None:
            out.append(ServiceStatus(name, "running", address, pid, f"state in {pid_file.parent}"))
        elif port_in_use(host, port):
            out.append(ServiceStatus(name, "foreign", address, None, "port in use by a process zhuge did not start"))
        else:
            out.append(ServiceStatus(name, "stopped", address))
    return out


def check_tools(settings: Settings) -> list[MissingTool]:
    """Programs `up` would need but cannot find (mvn only while the jar cache is empty)."""
    needed = ["java", "redis-server"]
    if not (kafka_home(settings) / ".resolved").exists():
        needed.append("mvn")
    return [MissingTool(t) for t in needed if shutil.which(t) is None]


def up(settings: Settings, echo: Echo = print, timeout_s: float = START_TIMEOUT_S) -> list[ServiceStatus]:
    """Start Kafka and Redis unless running, then wait until both answer. Idempotent."""
    missing = check_tools(settings)
    if missing:
        raise ServiceError("\n".join(str(m) for m in missing))
    checks = {"kafka": kafka_ready, "redis": redis_ready}
    starters = {"kafka": _start_kafka, "redis": _start_redis}
    started: dict[str, tuple[int, Path, Marker]] = {}
    for st in status(settings):
        if st.state == "foreign":
            raise ServiceError(
                f"{st.name}: {st.address} is already in use by a process zhuge did not start; "
                f"stop it or point {'ZHUGE_KAFKA_BOOTSTRAP' if st.name == 'kafka' else 'ZHUGE_REDIS_URL'} at a free port"
            )
        if st.state == "running":
            echo(f"{st.name}: already running at {st.address} (pid {st.pid})")
            continue
        echo(f"{st.name}: starting at {st.address} ...")
        pid = starters[st.name](settings, echo)
        _, _, pid_file, marker = (_kafka_paths if st.name == "kafka" else _redis_paths)(settings)
        started[st.name] = (pid, pid_file, marker)
    deadline = time.monotonic() + timeout_s
    for name in ("redis", "kafka"):
        while not checks[name](settings):
            if name in started:
                pid, pid_file, marker = started[name]
                if owned_pid(pid_file, marker) is None:
                    log = pid_file.parent / ("logs/server.log" if name == "kafka" else "redis.log")
                    raise ServiceError(f"{name} exited during start-up; last lines of {log}:\n{_tail(log)}")
            if time.monotonic() > deadline:
                raise ServiceError(f"{name} did not answer within {timeout_s:.0f} s (logs under {pid_file.parent})")
            time.sleep(0.3)
        if name in started:
            echo(f"{name}: ready (pid {started[name][0]})")
    return status(settings)


def down(settings: Settings, echo: Echo = print) -> list[ServiceStatus]:
    """Stop exactly the processes `up` started for these addresses (pid file + cmdline check)."""
    for name, paths in (("kafka", _kafka_paths), ("redis", _redis_paths)):
        host, port, pid_file, marker = paths(settings)
        pid = owned_pid(pid_file, marker)
        if pid is None:
            echo(f"{name}: not running at {host}:{port}")
        else:
            echo(f"{name}: stopping pid {pid} ...")
            _stop(pid, marker)
            echo(f"{name}: stopped")
        pid_file.unlink(missing_ok=True)
    return status(settings)
