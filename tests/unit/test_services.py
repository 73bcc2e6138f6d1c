"""Local services without starting Kafka: config, address parsing, pid ownership, refusals."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
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
    ],
)
def test_redis_address_from_url(tmp_path, url, expected):
    assert svc.redis_address(settings(tmp_path, redis_url=url)) == expected


def test_tls_redis_is_refused_with_a_reason(tmp_path):
    with pytest.raises(svc.ServiceError, match="managed Redis"):
        svc.redis_address(settings(tmp_path, redis_url="rediss://cache.example:6380/0"))


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
