"""Local Kafka (KRaft, from Maven Central jars) and Redis for development and tests.

`zhuge services up|down|status` and the integration-test fixture both call
:func:`up`, :func:`down` and :func:`status`. Addresses come from ``Settings``
(``kafka_host_port``, ``redis_url``), state lives under
``<state_dir>/services/<name>-<port>/``, so several stacks on different ports
run side by side. We only ever stop processes we started: each has a pid file,
and its ``/proc/<pid>/cmdline`` must still match before we signal it.

Security is chosen by the same settings the clients use, so a local stack is
secured like production without code changes: the Kafka client listener speaks
``ZHUGE_KAFKA_SECURITY_PROTOCOL`` (SCRAM users created at storage-format time),
a ``rediss://`` URL starts Redis with TLS only, a password turns on AUTH.
Certificates come from one local CA under ``<state_dir>/services/ca``; its
certificate is written to the clients' CA files. Secrets only ever go into
mode-0600 files, never onto a command line (``ps``) or into a message.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from app.local_tls import LocalCA, client_cert, export_ca, issue_cert, local_ca, run_openssl, write_private
from app.service_errors import MissingTool, ServiceError
from app.settings import Settings

Echo = Callable[[str], None]

POM = Path(__file__).resolve().parents[1] / "ops" / "kafka" / "pom.xml"
KAFKA_HEAP = ("-Xms128m", "-Xmx512m")
START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 30.0
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
SCRAM_MECHANISMS = ("SCRAM-SHA-256", "SCRAM-SHA-512")
_SASL_USER = re.compile(r"[A-Za-z0-9._@-]{1,128}")



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


def services_root(settings: Settings) -> Path:
    return Path(settings.state_dir).expanduser().resolve() / "services"


def service_dir(settings: Settings, name: str, port: int) -> Path:
    return services_root(settings) / f"{name}-{port}"


def redis_endpoint(settings: Settings) -> tuple[str, int, str | None]:
    """(host, port, password) of the Redis to run: ``redis_url``, the password from it or ``redis_password``."""
    url = urlsplit(settings.redis_url)
    if url.scheme not in ("redis", "rediss", ""):
        raise ServiceError(f"unsupported Redis URL scheme {url.scheme!r} in {settings.redis_address}")
    host = _loopback(url.hostname or "127.0.0.1")
    in_url = unquote(url.password) if url.password else None
    if in_url and settings.redis_password and in_url != settings.redis_password:
        raise ServiceError("ZHUGE_REDIS_PASSWORD and the password in ZHUGE_REDIS_URL differ: set only one")
    return host, url.port or 6379, in_url or settings.redis_password or None


def _loopback(host: str) -> str:
    return "127.0.0.1" if host == "localhost" else host


# --------------------------------------------------------------------------- security settings


def kafka_tls(settings: Settings) -> bool:
    return settings.kafka_security_protocol in ("SSL", "SASL_SSL")


def kafka_sasl(settings: Settings) -> bool:
    return settings.kafka_security_protocol.startswith("SASL_")


def sasl_mechanism(settings: Settings) -> str:
    """The SASL mechanism clients use (``aiokafka_kwargs`` falls back to PLAIN too)."""
    return settings.kafka_sasl_mechanism or "PLAIN"


def redis_tls(settings: Settings) -> bool:
    return urlsplit(settings.redis_url).scheme == "rediss"


def security_problems(settings: Settings) -> list[str]:
    """Why `up` cannot secure the local stack as configured (empty: it can)."""
    problems: list[str] = []
    proto = settings.kafka_security_protocol
    if kafka_sasl(settings):
        if sasl_mechanism(settings) not in SASL_MECHANISMS:
            problems.append(f"ZHUGE_KAFKA_SASL_MECHANISM={settings.kafka_sasl_mechanism!r}: the local broker offers "
                            f"{', '.join(SASL_MECHANISMS)}")  # fmt: skip
        if not _SASL_USER.fullmatch(settings.kafka_sasl_username):
            problems.append(f"{proto} needs ZHUGE_KAFKA_SASL_USERNAME (letters, digits, . _ @ -)")
        if not _sasl_password_ok(settings.kafka_sasl_password):
            problems.append(f"{proto} needs ZHUGE_KAFKA_SASL_PASSWORD: printable ASCII without , \" or \\ "
                            "(Kafka's --add-scram and JAAS syntax)")  # fmt: skip
    tls_pairs = (
        ("ZHUGE_KAFKA_SSL", kafka_tls(settings), settings.kafka_ssl_cafile, settings.kafka_ssl_certfile,
         settings.kafka_ssl_keyfile, f"ZHUGE_KAFKA_SECURITY_PROTOCOL={proto}"),
        ("ZHUGE_REDIS_SSL", redis_tls(settings), settings.redis_ssl_cafile, settings.redis_ssl_certfile,
         settings.redis_ssl_keyfile, "a rediss:// URL"),
    )  # fmt: skip
    for prefix, tls, cafile, certfile, keyfile, what in tls_pairs:
        if tls and not cafile:
            problems.append(f"{what} needs {prefix}_CAFILE: the file zhuge writes its local CA to (e.g. .zhuge/ca.pem)")
        if bool(certfile) != bool(keyfile):
            problems.append(f"{prefix}_CERTFILE and {prefix}_KEYFILE go together (mutual TLS)")
        if certfile and not tls:
            problems.append(f"{prefix}_CERTFILE and _KEYFILE are for mutual TLS, which needs {what}")
    try:
        redis_endpoint(settings)
    except ServiceError as exc:
        problems.append(str(exc))
    return problems


def _sasl_password_ok(password: str) -> bool:
    """Printable ASCII without , \" or \\: what --add-scram, JAAS and Java properties files carry intact."""
    return 0 < len(password) <= 256 and all(" " <= c <= "~" and c not in ',"\\' for c in password)


def describe_security(settings: Settings, name: str) -> str:
    """How the service is secured, for echo lines (never a secret)."""
    if name == "kafka":
        proto = settings.kafka_security_protocol
        parts = [proto] + ([sasl_mechanism(settings)] if kafka_sasl(settings) else [])
        parts += ["mutual TLS"] if kafka_tls(settings) and settings.kafka_ssl_certfile else []
        return ", ".join(parts)
    parts = ["TLS" if redis_tls(settings) else "no TLS", "AUTH" if redis_endpoint(settings)[2] else "no AUTH"]
    parts += ["mutual TLS"] if redis_tls(settings) and settings.redis_ssl_certfile else []
    return ", ".join(parts)


def redact(text: str, settings: Settings) -> str:
    """``text`` with every secret of ``settings`` replaced by ``***`` (tool output we pass on)."""
    in_url = urlsplit(settings.redis_url).password
    for secret in (settings.kafka_sasl_password, settings.redis_password, in_url and unquote(in_url)):
        if secret:
            text = text.replace(secret, "***")
    return text


# --------------------------------------------------------------------------- files and certificates


def stack_ca(settings: Settings) -> LocalCA:
    """The local CA of the stacks under this state dir (``<state_dir>/services/ca``)."""
    return local_ca(services_root(settings) / "ca")


def _client_trust(settings: Settings, echo: Echo) -> None:
    """What clients need to trust the local servers (CA file) and to be trusted by them (client certificates)."""
    sides = (
        (kafka_tls(settings), "ZHUGE_KAFKA_SSL", settings.kafka_ssl_cafile, settings.kafka_ssl_certfile, settings.kafka_ssl_keyfile),
        (redis_tls(settings), "ZHUGE_REDIS_SSL", settings.redis_ssl_cafile, settings.redis_ssl_certfile, settings.redis_ssl_keyfile),
    )  # fmt: skip
    for tls, prefix, cafile, certfile, keyfile in sides:
        if not tls:
            continue
        ca = stack_ca(settings)
        export_ca(ca, cafile, f"{prefix}_CAFILE", echo)
        if certfile:
            client_cert(ca, certfile, keyfile, prefix, echo)


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
    return pid if pid is not None and _alive(pid) and _matches(pid, marker) else None


def _alive(pid: int | None) -> bool:
    """The process exists and is not a zombie (a zombie child of ours is reaped)."""
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    if _proc_state(pid) in ("Z", "X"):
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        return False
    return True


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
    """A port nothing listens on, for a child process to bind a moment later.

    It is drawn below the kernel's ephemeral range. A port from ``bind(0)``
    lies inside that range, so in the gap before the child binds it any
    outgoing connection (a Kafka or Redis client's) may take it as its local
    port; a CI run failed that way, the demo worker's /metrics refused with
    "Address already in use". Outgoing connections never get ports below it.
    """
    low = _first_ephemeral_port()
    first = max(10_000, low - 20_000)
    if low - first >= 1_000:
        pick = random.Random()
        for _ in range(200):
            port = pick.randrange(first, low)
            if not port_in_use(host, port):
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _first_ephemeral_port() -> int:
    """The lowest local port the kernel gives outgoing connections (Linux; IANA's where unknown)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 49152


def _spawn(args: list[str], cwd: Path, log: Path) -> int:
    """Start a detached process (own session, survives the CLI) and return its pid."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            args, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    return proc.pid


def _stop(pid: int, marker: Marker, timeout_s: float = STOP_TIMEOUT_S, kill: bool = False) -> None:
    """SIGTERM, wait, then SIGKILL (``kill``: SIGKILL at once); re-checks the cmdline so a recycled pid is never hit."""
    if not _matches(pid, marker):
        return
    if not kill:
        os.kill(pid, signal.SIGTERM)
        if _wait_gone(pid, marker, timeout_s):
            return
    os.kill(pid, signal.SIGKILL)
    _wait_gone(pid, marker, 10.0)


def _wait_gone(pid: int, marker: Marker, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        if _proc_state(pid) in ("Z", "X") or not _matches(pid, marker):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


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


@dataclass(frozen=True)
class BrokerTLS:
    """The broker's TLS material: PEM key store (encrypted key + chain), the CA as trust store."""

    keystore: Path
    key_password: str
    truststore: Path
    client_auth: bool  # clients must present a certificate from the local CA


def _kafka_properties(
    settings: Settings, host: str, port: int, controller_port: int, data: Path, tls: BrokerTLS | None = None
) -> str:
    """server.properties: the client listener speaks the configured protocol, the controller plain loopback."""
    proto = settings.kafka_security_protocol
    return "\n".join(
        [
            "# written by zhuge services: single-node KRaft, broker and controller in one process (mode 0600)",
            "process.roles=broker,controller",
            "node.id=1",
            f"controller.quorum.bootstrap.servers={host}:{controller_port}",
            f"listeners={proto}://{host}:{port},CONTROLLER://{host}:{controller_port}",
            f"advertised.listeners={proto}://{host}:{port}",
            "controller.listener.names=CONTROLLER",
            f"inter.broker.listener.name={proto}",
            f"listener.security.protocol.map={proto}:{proto},CONTROLLER:PLAINTEXT",
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
            *_kafka_security_properties(settings, tls),
            "",
        ]
    )


def _kafka_security_properties(settings: Settings, tls: BrokerTLS | None) -> list[str]:
    """TLS and SASL lines of the client listener (which is also the inter-broker one: no open side door)."""
    lines: list[str] = []
    if kafka_tls(settings):
        if tls is None:
            raise ValueError(f"{settings.kafka_security_protocol} needs the broker's TLS files")
        lines += [
            "ssl.keystore.type=PEM",
            f"ssl.keystore.location={tls.keystore}",
            f"ssl.key.password={tls.key_password}",
            "ssl.truststore.type=PEM",
            f"ssl.truststore.location={tls.truststore}",
            f"ssl.client.auth={'required' if tls.client_auth else 'none'}",
        ]
    if kafka_sasl(settings):
        mechanism = sasl_mechanism(settings)
        enabled = SCRAM_MECHANISMS if mechanism in SCRAM_MECHANISMS else (mechanism,)
        listener = settings.kafka_security_protocol.lower()
        lines += [f"sasl.enabled.mechanisms={','.join(enabled)}", f"sasl.mechanism.inter.broker.protocol={mechanism}"]
        lines += [f"listener.name.{listener}.{m.lower()}.sasl.jaas.config={_jaas(settings, m)}" for m in enabled]
    return lines


def _jaas(settings: Settings, mechanism: str) -> str:
    """The listener's JAAS line: the broker's own login (inter-broker); PLAIN users live here too."""
    user, password = settings.kafka_sasl_username, settings.kafka_sasl_password
    if mechanism == "PLAIN":
        module = "org.apache.kafka.common.security.plain.PlainLoginModule"
        return f'{module} required username="{user}" password="{password}" user_{user}="{password}";'
    return f'org.apache.kafka.common.security.scram.ScramLoginModule required username="{user}" password="{password}";'


def _scram_args(settings: Settings) -> list[str]:
    """StorageTool ``--add-scram`` options: the configured user for both SCRAM mechanisms."""
    if not (kafka_sasl(settings) and sasl_mechanism(settings) in SCRAM_MECHANISMS):
        return []
    user, password = settings.kafka_sasl_username, settings.kafka_sasl_password
    return [arg for m in SCRAM_MECHANISMS for arg in ("--add-scram", f"{m}=[name={user},password={password}]")]


def _scram_digest(settings: Settings, salt: str) -> str:
    secret = f"{settings.kafka_sasl_username}\0{settings.kafka_sasl_password}".encode()
    return hashlib.sha256(salt.encode() + secret).hexdigest()


def _scram_current(settings: Settings, root: Path) -> bool:
    """The data was formatted with the SCRAM user configured now (or none is needed)."""
    if not _scram_args(settings):
        return True
    try:
        saved = json.loads((root / "scram.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(saved.get("digest")) and saved["digest"] == _scram_digest(settings, saved.get("salt", ""))


def _save_scram(settings: Settings, root: Path) -> None:
    path = root / "scram.json"
    if not _scram_args(settings):
        path.unlink(missing_ok=True)
        return
    salt = secrets.token_hex(16)  # a salted digest: tells "same user and password" without keeping the password
    write_private(path, json.dumps({"user": settings.kafka_sasl_username, "salt": salt,
                                     "digest": _scram_digest(settings, salt)}))  # fmt: skip


def _argfile_line(arg: str) -> str:
    """One argument of a java @argfile, quoted (the launcher reads quotes and backslash escapes)."""
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _format_storage(settings: Settings, java: list[str], props: Path, root: Path) -> None:
    """``kafka.tools.StorageTool format``; SCRAM users go through a 0600 @argfile, never onto the command line."""
    args = ["kafka.tools.StorageTool", "format", "--standalone", "-t", _cluster_id(), "-c", str(props), *_scram_args(settings)]
    argfile = root / "format.args"
    write_private(argfile, "\n".join(map(_argfile_line, args)) + "\n")
    try:
        result = subprocess.run([*java, f"@{argfile}"], capture_output=True, text=True, cwd=root)
    finally:
        argfile.unlink(missing_ok=True)
    if result.returncode != 0:
        raise ServiceError(f"formatting Kafka storage failed:\n{redact((result.stdout + result.stderr)[-3000:], settings)}")
    _save_scram(settings, root)


def _broker_tls(settings: Settings, root: Path, host: str) -> BrokerTLS | None:
    """A fresh broker certificate from the local CA, as the PEM key store Kafka reads (its key encrypted)."""
    if not kafka_tls(settings):
        return None
    ca = stack_ca(settings)
    tls_dir = root / "tls"
    cert, key = tls_dir / "broker.pem", tls_dir / "broker.key"
    issue_cert(ca, cert, key, [host, "localhost", "127.0.0.1"])
    password = secrets.token_urlsafe(24)  # Kafka's PEM key store requires an encrypted key
    encrypted = tls_dir / "broker.key.enc"  # PBES1: Java 17's PBE factories cannot read OpenSSL's PBES2 default
    run_openssl("pkcs8", "-topk8", "-in", key, "-out", encrypted, "-v1", "PBE-SHA1-3DES", "-passout", "env:ZHUGE_KEY_PASS",
             env={"ZHUGE_KEY_PASS": password})  # fmt: skip
    keystore = tls_dir / "keystore.pem"
    write_private(keystore, encrypted.read_text() + cert.read_text() + ca.cert.read_text())
    encrypted.unlink()
    return BrokerTLS(keystore, password, ca.cert, client_auth=bool(settings.kafka_ssl_certfile))


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
    tls = _broker_tls(settings, root, host)
    controller_file = root / "controller.port"
    controller = _read_pid(controller_file)  # the port the quorum was formatted with
    reason = _reformat_reason(settings, root, host, controller)
    if reason:
        if data.exists():
            echo(f"kafka: {reason}; starting with fresh data")
        shutil.rmtree(data, ignore_errors=True)
        controller = free_port(host)
        write_private(props, _kafka_properties(settings, host, port, controller, data, tls))
        _format_storage(settings, java, props, root)
        controller_file.write_text(f"{controller}\n")
    else:
        assert controller is not None  # a reason is given whenever it is missing
        write_private(props, _kafka_properties(settings, host, port, controller, data, tls))
    pid = _spawn([*java, "kafka.Kafka", str(props)], root, logs / "stdout.log")
    pid_file.write_text(f"{pid}\n")
    return pid


def _reformat_reason(settings: Settings, root: Path, host: str, controller: int | None) -> str:
    """Why the data must be formatted afresh ('' when it can be kept)."""
    if controller is None or not (root / "data" / "meta.properties").exists():
        return "data unformatted"
    if port_in_use(host, controller):
        return f"controller port {controller} unavailable"
    if not _scram_current(settings, root):
        return "the SCRAM user or password changed since the data was formatted"
    return ""


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
    """PING answered through ``Settings.redis_client`` (so with the configured TLS and AUTH)."""
    try:
        client = settings.redis_client(asyncio=False)
    except Exception:  # noqa: BLE001 - e.g. a CA file not written yet
        return False
    try:
        return bool(client.ping())
    except Exception:  # noqa: BLE001 - any failure means "not yet"
        return False
    finally:
        client.close()


# --------------------------------------------------------------------------- redis


def _redis_marker(port: int) -> Marker:
    # redis-server rewrites its title to "redis-server host:port"; before that argv has "--port N" / "--tls-port N"
    return ("redis-server", str(port))


def _redis_quote(value: str) -> str:
    """A redis.conf argument in double quotes (Redis reads backslash escapes there)."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'"{escaped}"'


def _redis_conf(settings: Settings) -> str:
    """The secret part of Redis' configuration (requirepass, an ACL user), for a mode-0600 file."""
    _, _, password = redis_endpoint(settings)
    lines = ["# written by zhuge services (mode 0600: holds the password)"]
    if password:
        lines.append(f"requirepass {_redis_quote(password)}")
    user = urlsplit(settings.redis_url).username
    if user and user != "default":  # redis://user:pw@...: AUTH user pw needs that ACL user
        secret = _redis_quote(">" + password) if password else "nopass"
        lines.append(f"user {_redis_quote(user)} on {secret} ~* &* +@all")
    return "\n".join(lines) + "\n"


def _redis_listen_args(settings: Settings, root: Path, host: str, port: int) -> list[str]:
    """``--port N``, or with rediss:// TLS only on N (plain port off), certificates from the local CA."""
    if not redis_tls(settings):
        return ["--port", str(port)]
    ca = stack_ca(settings)
    cert, key = root / "tls" / "server.pem", root / "tls" / "server.key"
    issue_cert(ca, cert, key, [host, "localhost", "127.0.0.1"])
    auth_clients = "yes" if settings.redis_ssl_certfile else "no"
    return ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert), "--tls-key-file", str(key),
            "--tls-ca-cert-file", str(ca.cert), "--tls-auth-clients", auth_clients]  # fmt: skip


def _start_redis(settings: Settings, echo: Echo) -> int:
    host, port, _ = redis_endpoint(settings)
    exe = shutil.which("redis-server")
    if exe is None:
        raise MissingTool("redis-server")
    root = service_dir(settings, "redis", port)
    root.mkdir(parents=True, exist_ok=True)
    conf = root / "redis.conf"
    write_private(conf, _redis_conf(settings))
    args = [exe, str(conf), "--bind", host, *_redis_listen_args(settings, root, host, port), "--save", "",
            "--appendonly", "no", "--dir", str(root), "--daemonize", "no", "--protected-mode", "no"]  # fmt: skip
    pid = _spawn(args, root, root / "redis.log")
    (root / "redis.pid").write_text(f"{pid}\n")
    return pid


# --------------------------------------------------------------------------- public API


def _kafka_paths(settings: Settings) -> tuple[str, int, Path, Marker]:
    host, port = settings.kafka_host_port
    root = service_dir(settings, "kafka", port)
    return _loopback(host), port, root / "kafka.pid", _kafka_marker(root / "server.properties")


def _redis_paths(settings: Settings) -> tuple[str, int, Path, Marker]:
    host, port, _ = redis_endpoint(settings)
    root = service_dir(settings, "redis", port)
    return host, port, root / "redis.pid", _redis_marker(port)


PATHS = {"kafka": _kafka_paths, "redis": _redis_paths}
CHECKS = {"kafka": kafka_ready, "redis": redis_ready}


def status(settings: Settings, *, probe: bool = False) -> list[ServiceStatus]:
    """Each service: running (ours), foreign (port held by someone else) or stopped.

    ``probe`` also asks each listening service for a round trip with the configured
    security settings, which tells a stack started with other ones (or a foreign one) apart.
    """
    out = []
    for name, paths in PATHS.items():
        host, port, pid_file, marker = paths(settings)
        address = f"{host}:{port}"
        pid = owned_pid(pid_file, marker)
        if pid is not None:
            st = ServiceStatus(name, "running", address, pid, f"state in {pid_file.parent}")
        elif port_in_use(host, port):
            st = ServiceStatus(name, "foreign", address, None, "port in use by a process zhuge did not start")
        else:
            st = ServiceStatus(name, "stopped", address)
        if probe and st.state != "stopped":
            answer = "answers" if CHECKS[name](settings) else "does NOT answer"
            st = ServiceStatus(name, st.state, address, pid, f"{answer} ({describe_security(settings, name)}); {st.detail}")
        out.append(st)
    return out


def not_answering(settings: Settings) -> list[str]:
    """The services that do not answer at the configured addresses (what a command may start, then stop)."""
    return [name for name in PATHS if not CHECKS[name](settings)]


def check_tools(settings: Settings) -> list[MissingTool]:
    """Programs `up` would need but cannot find (mvn only while the jar cache is empty, openssl only for TLS)."""
    needed = ["java", "redis-server"]
    if not (kafka_home(settings) / ".resolved").exists():
        needed.append("mvn")
    if kafka_tls(settings) or redis_tls(settings):
        needed.append("openssl")
    return [MissingTool(t) for t in needed if shutil.which(t) is None]


def _selected(only: Sequence[str] | None) -> tuple[str, ...]:
    names = tuple(PATHS) if not only else tuple(only)
    unknown = sorted(set(names) - set(PATHS))
    if unknown:
        raise ServiceError(f"unknown service {', '.join(unknown)}: choose from {', '.join(PATHS)}")
    return names


def up(
    settings: Settings, echo: Echo = print, timeout_s: float = START_TIMEOUT_S, only: Sequence[str] | None = None
) -> list[ServiceStatus]:
    """Start Kafka and Redis (or ``only`` the named ones) unless running, then wait until they answer. Idempotent."""
    names = _selected(only)
    missing = check_tools(settings)
    problems = [str(m) for m in missing] + security_problems(settings)
    if problems:
        raise ServiceError("\n".join(problems))
    states = [st for st in status(settings) if st.name in names]
    for st in states:
        if st.state == "foreign":
            raise ServiceError(
                f"{st.name}: {st.address} is already in use by a process zhuge did not start; "
                f"stop it or point {'ZHUGE_KAFKA_BOOTSTRAP' if st.name == 'kafka' else 'ZHUGE_REDIS_URL'} at a free port"
            )
    _client_trust(settings, echo)
    starters = {"kafka": _start_kafka, "redis": _start_redis}
    started: dict[str, int] = {}
    for st in states:
        if st.state == "running":
            echo(f"{st.name}: already running at {st.address} (pid {st.pid})")
            continue
        echo(f"{st.name}: starting at {st.address} ({describe_security(settings, st.name)}) ...")
        started[st.name] = starters[st.name](settings, echo)
    deadline = time.monotonic() + timeout_s
    for name in ("redis", "kafka"):
        if name not in names:
            continue
        _wait_ready(settings, name, name in started, deadline, timeout_s)
        if name in started:
            echo(f"{name}: ready (pid {started[name]})")
    return status(settings)


@contextlib.contextmanager
def started_when_missing(settings: Settings, echo: Echo = print) -> Iterator[list[str]]:
    """Start Kafka and/or Redis when they do not answer; on exit stop exactly those (also when ``up`` fails)."""
    started = not_answering(settings)
    try:
        if started:
            up(settings, echo=echo, only=started)
        yield started
    finally:
        if started:
            down(settings, echo=echo, only=started)


def _wait_ready(settings: Settings, name: str, started: bool, deadline: float, timeout_s: float) -> None:
    """Until the service answers with these settings; a process of ours that died fails at once, with its log."""
    _, _, pid_file, _ = PATHS[name](settings)
    while not CHECKS[name](settings):
        # liveness by pid, not by ``owned_pid``'s cmdline check: redis-server rewrites its title in
        # place at start-up, and a read of /proc/<pid>/cmdline in the middle of that sees neither
        # form (twice on a busy box: "exited during start-up" for a Redis that was running)
        if started and not _alive(_read_pid(pid_file)):
            log = pid_file.parent / ("logs/server.log" if name == "kafka" else "redis.log")
            raise ServiceError(f"{name} exited during start-up; last lines of {log}:\n{redact(_tail(log), settings)}")
        if time.monotonic() > deadline:
            hint = "" if started else (
                "; it was already running: if it was started with other security settings "
                "(protocol, password, TLS), run `zhuge services down` and `up` again"
            )  # fmt: skip
            raise ServiceError(f"{name} did not answer within {timeout_s:.0f} s (logs under {pid_file.parent}){hint}")
        time.sleep(0.3)


def down(
    settings: Settings, echo: Echo = print, only: Sequence[str] | None = None, kill: bool = False
) -> list[ServiceStatus]:
    """Stop exactly the processes `up` started for these addresses (pid file + cmdline check).

    ``only``: just the named services; ``kill``: SIGKILL at once instead of a clean stop
    (what a crashed host looks like; the fault tests use it).
    """
    names = _selected(only)
    for name, paths in PATHS.items():
        if name not in names:
            continue
        host, port, pid_file, marker = paths(settings)
        pid = owned_pid(pid_file, marker)
        if pid is None:
            echo(f"{name}: not running at {host}:{port}")
        else:
            echo(f"{name}: {'killing' if kill else 'stopping'} pid {pid} ...")
            _stop(pid, marker, kill=kill)
            echo(f"{name}: stopped")
        pid_file.unlink(missing_ok=True)
    return status(settings)
