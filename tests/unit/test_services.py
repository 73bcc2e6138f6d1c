"""Local services without starting Kafka: config, address parsing, pid ownership, refusals."""

from __future__ import annotations

import contextlib
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from app import services as svc
from app.settings import Settings


def settings(tmp_path: Path, **kw) -> Settings:
    return Settings.from_env({}, state_dir=str(tmp_path / "state"), kafka_home=str(tmp_path / "kafka"), **kw)


def test_broker_config_is_single_node_kraft_on_loopback(tmp_path):
    s = settings(tmp_path, topic_partitions=5)
    props = svc._kafka_properties(s, "127.0.0.1", 29999, 30001, tmp_path / "data")
    kv = dict(line.split("=", 1) for line in props.splitlines() if line and not line.startswith("#"))
    assert kv["process.roles"] == "broker,controller"
    assert kv["listeners"] == "PLAINTEXT://127.0.0.1:29999,CONTROLLER://127.0.0.1:30001"
    assert kv["controller.quorum.bootstrap.servers"] == "127.0.0.1:30001"
    assert kv["num.partitions"] == "5"
    assert kv["offsets.topic.replication.factor"] == kv["transaction.state.log.replication.factor"] == "1"
    assert kv["group.initial.rebalance.delay.ms"] == "0"
    assert kv["auto.create.topics.enable"] == "true"
    assert kv["log.dirs"] == str(tmp_path / "data")


def test_state_lives_per_service_and_port(tmp_path):
    s = settings(tmp_path)
    assert svc.service_dir(s, "kafka", 29092) == (tmp_path / "state" / "services" / "kafka-29092").resolve()
    assert svc.service_dir(s, "kafka", 29092) != svc.service_dir(s, "kafka", 29192)


def test_kafka_version_comes_from_the_pom_and_cache_is_overridable(tmp_path):
    version = svc.kafka_version()
    assert re.fullmatch(r"4\.\d+\.\d+", version)
    assert svc.kafka_home(settings(tmp_path)) == (tmp_path / "kafka").resolve()
    default = Settings.from_env({})
    assert svc.kafka_home(default) == Path.home() / ".cache" / "zhuge" / f"kafka-{version}"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://127.0.0.1:26379/0", ("127.0.0.1", 26379, None)),
        ("redis://localhost/1", ("127.0.0.1", 6379, None)),
        ("redis://:p%40ss@127.0.0.1:7000/0", ("127.0.0.1", 7000, "p@ss")),
        ("redis://user:pw@127.0.0.2:7001", ("127.0.0.2", 7001, "pw")),
        ("rediss://localhost:6380/0", ("127.0.0.1", 6380, None)),
    ],
)
def test_redis_endpoint_from_url(tmp_path, url, expected):
    assert svc.redis_endpoint(settings(tmp_path, redis_url=url)) == expected


def test_redis_password_comes_from_the_setting_or_the_url_not_two_different_ones(tmp_path):
    s = settings(tmp_path, redis_url="rediss://127.0.0.1:6380/0", redis_password="s3cret")
    assert svc.redis_endpoint(s) == ("127.0.0.1", 6380, "s3cret")
    same = settings(tmp_path, redis_url="redis://:s3cret@127.0.0.1:6380/0", redis_password="s3cret")
    assert svc.redis_endpoint(same)[2] == "s3cret"
    with pytest.raises(svc.ServiceError, match="differ") as err:
        svc.redis_endpoint(settings(tmp_path, redis_url="redis://:pw-in-url@127.0.0.1:6380/0", redis_password="pw-set"))
    assert "pw-in-url" not in str(err.value) and "pw-set" not in str(err.value)


def test_an_unsupported_redis_scheme_is_refused_without_showing_the_password(tmp_path):
    with pytest.raises(svc.ServiceError, match="unsupported Redis URL scheme") as err:
        svc.redis_endpoint(settings(tmp_path, redis_url="unix://:hunter2@/tmp/redis.sock"))
    assert "hunter2" not in str(err.value)


# --------------------------------------------------------------------------- security settings

SECURE = dict(
    kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="SCRAM-SHA-512", kafka_sasl_username="zhuge",
    kafka_sasl_password="kafka-s3cret", redis_url="rediss://127.0.0.1:26380/0", redis_password="redis-s3cret",
)  # fmt: skip


def secure(tmp_path: Path, **kw) -> Settings:
    files = dict(kafka_ssl_cafile=str(tmp_path / "client" / "kafka-ca.pem"), redis_ssl_cafile=str(tmp_path / "client" / "redis-ca.pem"))
    return settings(tmp_path, **{**SECURE, **files, **kw})


def props(s: Settings, tls: svc.BrokerTLS | None = None) -> dict[str, str]:
    text = svc._kafka_properties(s, "127.0.0.1", 29999, 30001, Path("/data"), tls)
    return dict(line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))


def test_plaintext_broker_has_no_tls_or_sasl_lines(tmp_path):
    kv = props(settings(tmp_path))
    assert kv["listener.security.protocol.map"] == "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"
    assert kv["inter.broker.listener.name"] == "PLAINTEXT"
    assert not [k for k in kv if k.startswith(("ssl.", "sasl.", "listener.name."))]


def test_sasl_ssl_broker_secures_the_client_listener_and_keeps_the_controller_on_loopback(tmp_path):
    s = secure(tmp_path)
    tls = svc.BrokerTLS(Path("/tls/keystore.pem"), "key-pw", Path("/ca/ca.pem"), client_auth=False)
    kv = props(s, tls)
    assert kv["listeners"] == "SASL_SSL://127.0.0.1:29999,CONTROLLER://127.0.0.1:30001"
    assert kv["advertised.listeners"] == "SASL_SSL://127.0.0.1:29999"
    assert kv["listener.security.protocol.map"] == "SASL_SSL:SASL_SSL,CONTROLLER:PLAINTEXT"
    assert kv["inter.broker.listener.name"] == "SASL_SSL"  # no unauthenticated data listener beside it
    assert kv["sasl.enabled.mechanisms"] == "SCRAM-SHA-256,SCRAM-SHA-512"
    assert kv["sasl.mechanism.inter.broker.protocol"] == "SCRAM-SHA-512"
    jaas = kv["listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config"]
    assert jaas == 'org.apache.kafka.common.security.scram.ScramLoginModule required username="zhuge" password="kafka-s3cret";'
    assert (kv["ssl.keystore.type"], kv["ssl.keystore.location"], kv["ssl.key.password"]) == ("PEM", "/tls/keystore.pem", "key-pw")
    assert (kv["ssl.truststore.type"], kv["ssl.truststore.location"]) == ("PEM", "/ca/ca.pem")
    assert kv["ssl.client.auth"] == "none"
    with pytest.raises(ValueError, match="TLS files"):
        props(s, None)


def test_plain_mechanism_declares_its_user_in_the_listener_jaas(tmp_path):
    kv = props(secure(tmp_path, kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_mechanism="PLAIN"))
    assert kv["sasl.enabled.mechanisms"] == "PLAIN"
    assert kv["listener.name.sasl_plaintext.plain.sasl.jaas.config"].endswith(
        'username="zhuge" password="kafka-s3cret" user_zhuge="kafka-s3cret";'
    )
    assert not [k for k in kv if k.startswith("ssl.")]


def test_scram_users_are_added_at_format_time_for_both_mechanisms(tmp_path):
    assert svc._scram_args(secure(tmp_path)) == [
        "--add-scram", "SCRAM-SHA-256=[name=zhuge,password=kafka-s3cret]",
        "--add-scram", "SCRAM-SHA-512=[name=zhuge,password=kafka-s3cret]",
    ]  # fmt: skip
    assert svc._scram_args(secure(tmp_path, kafka_sasl_mechanism="PLAIN")) == []
    assert svc._scram_args(settings(tmp_path)) == []


def test_a_changed_scram_password_means_fresh_data_and_the_digest_keeps_no_password(tmp_path):
    s, root = secure(tmp_path), tmp_path / "kafka"
    root.mkdir()
    assert not svc._scram_current(s, root)  # formatted before SCRAM was configured
    svc._save_scram(s, root)
    assert svc._scram_current(s, root)
    assert "kafka-s3cret" not in (root / "scram.json").read_text()
    assert (root / "scram.json").stat().st_mode & 0o777 == 0o600
    assert not svc._scram_current(s.replace(kafka_sasl_password="new-one"), root)
    assert svc._scram_current(settings(tmp_path), root)  # PLAINTEXT needs no users: the data stays


def test_java_argfile_lines_quote_spaces_and_escapes():
    assert svc._argfile_line("a b#c") == '"a b#c"'
    assert svc._argfile_line('x"y\\z') == '"x\\"y\\\\z"'


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"kafka_ssl_cafile": ""}, "needs ZHUGE_KAFKA_SSL_CAFILE"),
        ({"redis_ssl_cafile": ""}, "needs ZHUGE_REDIS_SSL_CAFILE"),
        ({"kafka_sasl_username": ""}, "needs ZHUGE_KAFKA_SASL_USERNAME"),
        ({"kafka_sasl_password": ""}, "needs ZHUGE_KAFKA_SASL_PASSWORD"),
        ({"kafka_sasl_password": "a,b"}, "without ,"),
        ({"kafka_sasl_mechanism": "GSSAPI"}, "offers PLAIN, SCRAM-SHA-256, SCRAM-SHA-512"),
        ({"kafka_ssl_certfile": "/x/client.pem"}, "_CERTFILE and ZHUGE_KAFKA_SSL_KEYFILE go together"),
        ({"redis_url": "rediss://:other@127.0.0.1:26380/0"}, "differ"),
    ],
)
def test_security_problems_name_the_setting_to_fix(tmp_path, changes, problem):
    assert svc.security_problems(secure(tmp_path)) == []
    problems = svc.security_problems(secure(tmp_path, **changes))
    assert any(problem in p for p in problems), problems
    assert not any("s3cret" in p for p in problems)


def test_up_refuses_an_incomplete_secure_setup_before_starting_anything(tmp_path):
    s = secure(tmp_path, kafka_bootstrap=f"127.0.0.1:{svc.free_port()}", kafka_ssl_cafile="", kafka_sasl_password="")
    with pytest.raises(svc.ServiceError, match="ZHUGE_KAFKA_SSL_CAFILE") as err:
        svc.up(s, echo=lambda line: None)
    assert "ZHUGE_KAFKA_SASL_PASSWORD" in str(err.value)
    assert not (tmp_path / "state" / "services").exists()


def test_descriptions_and_redaction_never_show_a_secret(tmp_path):
    s = secure(tmp_path)
    assert svc.describe_security(s, "kafka") == "SASL_SSL, SCRAM-SHA-512"
    assert svc.describe_security(s, "redis") == "TLS, AUTH"
    assert svc.describe_security(settings(tmp_path), "redis") == "no TLS, no AUTH"
    text = "kafka-s3cret and redis-s3cret and url-pw"
    url = s.replace(redis_password="", redis_url="rediss://:url-pw@127.0.0.1:26380/0")
    assert svc.redact(text, s) == "*** and *** and url-pw"
    assert svc.redact(text, url) == "*** and redis-s3cret and ***"


def test_openssl_is_needed_only_for_tls(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert "openssl" not in {m.tool for m in svc.check_tools(settings(tmp_path))}
    assert "openssl" in {m.tool for m in svc.check_tools(secure(tmp_path))}
    assert "openssl" in {m.tool for m in svc.check_tools(settings(tmp_path, redis_url="rediss://127.0.0.1:1/0"))}


# --------------------------------------------------------------------------- redis configuration


def test_redis_password_goes_into_a_private_config_file_not_the_command_line(tmp_path):
    conf = svc._redis_conf(settings(tmp_path, redis_password='p "w" \\ x'))
    assert 'requirepass "p \\"w\\" \\\\ x"' in conf
    acl = svc._redis_conf(settings(tmp_path, redis_url="redis://app:pw@127.0.0.1:1/0"))
    assert 'user "app" on ">pw" ~* &* +@all' in acl
    assert "requirepass" not in svc._redis_conf(settings(tmp_path))
    path = tmp_path / "redis.conf"
    path.write_text("old")
    path.chmod(0o644)
    svc.write_private(path, conf)
    assert path.stat().st_mode & 0o777 == 0o600 and path.read_text() == conf


def test_plain_redis_listens_on_its_port_only(tmp_path):
    assert svc._redis_listen_args(settings(tmp_path), tmp_path, "127.0.0.1", 7000) == ["--port", "7000"]


# --------------------------------------------------------------------------- certificates

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")


@needs_openssl
def test_rediss_serves_tls_only_with_a_certificate_from_the_local_ca(tmp_path):
    def options(s: Settings) -> dict[str, str]:
        args = svc._redis_listen_args(s, tmp_path / "redis", "127.0.0.1", 26380)
        return dict(zip(args[::2], args[1::2]))

    s = secure(tmp_path)
    opts = options(s)
    assert opts["--port"] == "0" and opts["--tls-port"] == "26380" and opts["--tls-auth-clients"] == "no"
    assert opts["--tls-ca-cert-file"] == str(svc.stack_ca(s).cert)
    assert Path(opts["--tls-key-file"]).stat().st_mode & 0o777 == 0o600
    mutual = secure(tmp_path, redis_ssl_certfile="/c.pem", redis_ssl_keyfile="/c.key")
    assert options(mutual)["--tls-auth-clients"] == "yes"  # client certificates required


@needs_openssl
def test_local_ca_is_made_once_and_its_certificates_pass_client_hostname_checks(tmp_path):
    s = settings(tmp_path)
    ca = svc.stack_ca(s)
    pem = ca.cert.read_text()
    assert svc.stack_ca(s) == ca and ca.cert.read_text() == pem
    assert ca.key.stat().st_mode & 0o777 == 0o600
    cert, key = tmp_path / "srv" / "server.pem", tmp_path / "srv" / "server.key"
    svc.issue_cert(ca, cert, key, ["127.0.0.1", "localhost"])
    assert key.stat().st_mode & 0o777 == 0o600
    for host in ("127.0.0.1", "localhost"):
        assert _tls_handshake(cert, key, ca.cert, host) == "ok"
    other = svc.stack_ca(settings(tmp_path / "other"))
    assert "certificate verify failed" in _tls_handshake(cert, key, other.cert, "127.0.0.1")


def _tls_handshake(cert: Path, key: Path, cafile: Path, server_hostname: str) -> str:
    """One TLS handshake on loopback: server with cert/key, client trusting only cafile, hostname checked."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cafile))
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)

        def serve() -> None:
            conn, _ = listener.accept()
            with contextlib.suppress(OSError), server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            with socket.create_connection(listener.getsockname(), timeout=5) as raw:
                with client_ctx.wrap_socket(raw, server_hostname=server_hostname):
                    return "ok"
        except ssl.SSLError as exc:
            return str(exc)
        finally:
            thread.join(timeout=5)


@needs_openssl
def test_ca_is_written_for_clients_and_a_foreign_ca_file_is_refused(tmp_path):
    ca = svc.stack_ca(settings(tmp_path))
    lines: list[str] = []
    target = tmp_path / "clients" / "ca.pem"
    svc.export_ca(ca, str(target), "ZHUGE_KAFKA_SSL_CAFILE", lines.append)
    assert target.read_text() == ca.cert.read_text() and len(lines) == 1
    svc.export_ca(ca, str(target), "ZHUGE_KAFKA_SSL_CAFILE", lines.append)  # ours already: nothing to do
    bundle = tmp_path / "bundle.pem"
    bundle.write_text(svc.stack_ca(settings(tmp_path / "x")).cert.read_text() + ca.cert.read_text())
    svc.export_ca(ca, str(bundle), "ZHUGE_KAFKA_SSL_CAFILE", lines.append)  # a bundle holding ours: fine
    foreign = tmp_path / "foreign.pem"
    foreign.write_text(svc.stack_ca(settings(tmp_path / "y")).cert.read_text())
    with pytest.raises(svc.ServiceError, match="does not hold the local CA"):
        svc.export_ca(ca, str(foreign), "ZHUGE_REDIS_SSL_CAFILE", lines.append)
    assert len(lines) == 1


@needs_openssl
def test_client_certificates_are_issued_once_and_foreign_ones_refused(tmp_path):
    ca = svc.stack_ca(settings(tmp_path))
    cert, key = tmp_path / "c" / "client.pem", tmp_path / "c" / "client.key"
    svc.client_cert(ca, str(cert), str(key), "ZHUGE_REDIS_SSL", lambda line: None)
    first = cert.read_text()
    svc.client_cert(ca, str(cert), str(key), "ZHUGE_REDIS_SSL", lambda line: None)
    assert cert.read_text() == first
    other = svc.stack_ca(settings(tmp_path / "other"))
    svc.issue_cert(other, cert, key, ["zhuge-client"])
    with pytest.raises(svc.ServiceError, match="not signed by the local CA"):
        svc.client_cert(ca, str(cert), str(key), "ZHUGE_REDIS_SSL", lambda line: None)
    key.unlink()
    with pytest.raises(svc.ServiceError, match="one exists"):
        svc.client_cert(ca, str(cert), str(key), "ZHUGE_REDIS_SSL", lambda line: None)


def test_free_ports_lie_below_the_range_outgoing_connections_draw_from():
    """A child binds the port a moment later; no client connection may take it as its local port meanwhile."""
    low = svc._first_ephemeral_port()
    ports = [svc.free_port() for _ in range(50)]
    assert all(p < low for p in ports), (low, ports)
    with socket.create_server(("127.0.0.1", ports[0])):
        pass


def test_a_port_someone_listens_on_is_never_handed_out(monkeypatch):
    with socket.create_server(("127.0.0.1", 0)) as held:
        taken = held.getsockname()[1]
        monkeypatch.setattr(svc, "_first_ephemeral_port", lambda: taken + 1)
        monkeypatch.setattr(svc.random, "Random", lambda: _Always(taken))
        assert svc.free_port() != taken


class _Always:
    """A draw that keeps picking one port, to show the probe refuses it."""

    def __init__(self, port: int) -> None:
        self.port = port

    def randrange(self, start: int, stop: int) -> int:
        return self.port


def test_cluster_id_is_kafka_shaped():
    ids = {svc._cluster_id() for _ in range(200)}
    assert len(ids) == 200
    assert all(re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_-]{21}", i) for i in ids)


@pytest.fixture
def sleeper():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "zhuge-test-marker"])
    deadline = time.monotonic() + 10
    while not svc._matches(proc.pid, ("zhuge-test-marker",)):  # until exec replaced the forked cmdline
        assert time.monotonic() < deadline, "sleeper never started"
        time.sleep(0.01)
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_owned_pid_requires_a_live_process_with_our_cmdline(tmp_path, sleeper):
    pid_file = tmp_path / "x.pid"
    assert svc.owned_pid(pid_file, ("zhuge-test-marker",)) is None  # no file
    pid_file.write_text(f"{sleeper.pid}\n")
    assert svc.owned_pid(pid_file, ("zhuge-test-marker", "time.sleep")) == sleeper.pid
    assert svc.owned_pid(pid_file, ("kafka.Kafka",)) is None  # someone else's process: not ours
    sleeper.kill()
    sleeper.wait()
    assert svc.owned_pid(pid_file, ("zhuge-test-marker",)) is None  # dead


def test_stop_leaves_a_process_whose_cmdline_does_not_match(sleeper):
    svc._stop(sleeper.pid, ("kafka.Kafka",), timeout_s=1)
    assert sleeper.poll() is None
    svc._stop(sleeper.pid, ("zhuge-test-marker",), timeout_s=5)
    assert sleeper.wait(timeout=5) is not None


def test_down_without_pid_files_touches_nothing(tmp_path):
    s = settings(tmp_path, kafka_bootstrap=f"127.0.0.1:{svc.free_port()}", redis_url=f"redis://127.0.0.1:{svc.free_port()}/0")
    lines: list[str] = []
    states = svc.down(s, echo=lines.append)
    assert [st.state for st in states] == ["stopped", "stopped"]
    assert lines == [f"kafka: not running at {states[0].address}", f"redis: not running at {states[1].address}"]


def test_missing_tools_name_the_package_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on PATH
    s = settings(tmp_path)
    assert {m.tool for m in svc.check_tools(s)} == {"java", "redis-server", "mvn"}
    with pytest.raises(svc.ServiceError) as err:
        svc.up(s, echo=lambda line: None)
    text = str(err.value)
    assert "apt-get install redis-server" in text and "apt-get install maven" in text and "openjdk-17" in text


def test_mvn_not_needed_once_jars_are_cached(tmp_path, monkeypatch):
    s = settings(tmp_path)
    home = svc.kafka_home(s)
    home.mkdir(parents=True)
    (home / ".resolved").write_text("4\n")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert {m.tool for m in svc.check_tools(s)} == {"java", "redis-server"}


def test_status_reports_a_port_held_by_someone_else_as_foreign(tmp_path):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        s = settings(tmp_path, kafka_bootstrap=f"127.0.0.1:{port}", redis_url=f"redis://127.0.0.1:{svc.free_port()}/0")
        kafka, redis = svc.status(s)
        assert (kafka.state, redis.state) == ("foreign", "stopped")
        assert svc.port_in_use("127.0.0.1", port)
    assert not svc.port_in_use("127.0.0.1", port)
