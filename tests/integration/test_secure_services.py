"""A local stack secured like production, driven through settings alone.

The module starts its own stack with `zhuge services up` on free loopback ports:
Kafka with SASL_SSL (SCRAM-SHA-512, a broker certificate from the local CA) and
Redis with TLS only plus a password. Every command then runs as a subprocess
whose only configuration is the ``ZHUGE_*`` environment (``settings_env``):
simulate, replay, a real worker, score, top, retrain, bench pipeline and demo.
Last, the (random, distinctive) passwords must appear in no command output, no
log and no file of the run except the two mode-0600 server configs.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from app import services as svc
from app.settings import Settings
from app.worker_process import WorkerProcess, settings_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]

IN_CI = bool(os.environ.get("CI"))
ROOT = Path(__file__).resolve().parents[2]
BITBRAINS = Path(os.environ.get("ZHUGE_DATA_DIR", ROOT.parent / "shared" / "data")) / "bitbrains-rnd-2013-08"
ZHUGE = [sys.executable, "-m", "app.cli"]
N_VMS, N_HOSTS, PERIOD_S = 20, 2, 300
BACKFILL_STEPS, LIVE_STEPS = 2 * 288, 12  # retrain needs > 1.5 days of history (half a window + the held-out day)
VMS = [f"vm-{i:06d}" for i in range(1, N_VMS + 1)]
SECRET_FILES = ("server.properties", "redis.conf")  # mode 0600, hold the passwords by design


@dataclass
class Stack:
    settings: Settings
    tmp: Path
    passwords: tuple[str, str]
    outputs: dict[str, str] = field(default_factory=dict)  # step -> stdout + stderr

    def zhuge(
        self, step: str, *args: str, timeout: float = 120, check: bool = True, **changes: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run ``zhuge ARGS`` with the settings (plus ``changes``) as its only configuration."""
        settings = self.settings.replace(**changes) if changes else self.settings
        res = subprocess.run(
            [*ZHUGE, *args], env=settings_env(settings), cwd=self.tmp, capture_output=True, text=True, timeout=timeout
        )
        self.outputs[step] = res.stdout + res.stderr
        if check:
            assert res.returncode == 0, f"zhuge {' '.join(args)} exited {res.returncode}:\n{self.outputs[step][-3000:]}"
        return res

    def redis(self) -> Any:
        """A synchronous client with the stack's TLS and password."""
        return self.settings.redis_client(asyncio=False)


def _secure_settings(tmp: Path, kafka_password: str, redis_password: str) -> Settings:
    clients = tmp / "clients"
    env = {k: v for k, v in os.environ.items() if k == "ZHUGE_KAFKA_HOME"}  # the jar cache; nothing else from outside
    return Settings.from_env(
        env,
        kafka_bootstrap=f"127.0.0.1:{svc.free_port()}",
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="zhuge-test",
        kafka_sasl_password=kafka_password,
        kafka_ssl_cafile=str(clients / "kafka-ca.pem"),
        redis_url=f"rediss://127.0.0.1:{svc.free_port()}/0",
        redis_password=redis_password,
        redis_ssl_cafile=str(clients / "redis-ca.pem"),
        state_dir=str(tmp / "state"),
        model_store=str(tmp / "models"),
        history_url=str(tmp / "history"),
        snapshot_dir=str(tmp / "snapshots"),
        history_flush_s=2.0,
        metrics_port=0,
        consumer_group="zhuge-secure",
        topic_partitions=2,
        device="cpu",
    )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("zhuge-secure")
    passwords = (f"kafka-pw-{secrets.token_urlsafe(18)}", f"redis-pw-{secrets.token_urlsafe(18)}")
    settings = _secure_settings(tmp, *passwords)
    missing = svc.check_tools(settings)
    if missing:
        reason = "secure services unavailable: " + "; ".join(str(m) for m in missing)
        if IN_CI:
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    lines: list[str] = []
    try:
        svc.up(settings, echo=lines.append)
    except BaseException:
        svc.down(settings, echo=lines.append)
        raise
    stack = Stack(settings, tmp, passwords, {"services up (in process)": "\n".join(lines)})
    try:
        yield stack
    finally:
        svc.down(settings, echo=lambda line: None)


@pytest.fixture(scope="module")
def simulated(stack: Stack) -> Stack:
    """Two days of a 20-VM fleet in vm.metrics (history for retrain), then the last hour as `--steps 12`."""
    now = time.time()
    start = now - now % PERIOD_S - (BACKFILL_STEPS + LIVE_STEPS) * PERIOD_S
    common = ("--vms", str(N_VMS), "--hosts", str(N_HOSTS))
    stack.zhuge("simulate backfill", "simulate", *common, "--steps", str(BACKFILL_STEPS), "--fast", "--start", str(start))
    stack.zhuge("simulate", "simulate", *common, "--steps", str(LIVE_STEPS), "--fast")
    return stack


@pytest.fixture(scope="module")
def worker_run(simulated: Stack) -> Stack:
    """A real worker until every VM is scored and every sample processed; stopped (history flushed)."""
    stack = simulated
    expected = N_VMS * (BACKFILL_STEPS + LIVE_STEPS)
    worker = WorkerProcess.start(stack.settings, stack.tmp / "worker.log", ready_timeout=150)
    client = stack.redis()
    try:
        deadline = time.monotonic() + 120
        while True:
            done = worker.counter("zhuge_samples_in_total")
            scored = sum(client.exists(f"{stack.settings.redis_prefix}vm:{vm}") for vm in VMS)
            if done >= expected and scored == N_VMS:
                break
            assert worker.proc.poll() is None, f"worker exited:\n{worker.tail()}"
            assert time.monotonic() < deadline, f"{done:.0f}/{expected} samples, {scored}/{N_VMS} VMs:\n{worker.tail()}"
            time.sleep(0.5)
    finally:
        client.close()
        rc = worker.stop()
    assert rc == 0, f"worker exited {rc} on SIGINT:\n{worker.tail()}"
    return stack


# --------------------------------------------------------------------------- the stack itself


def test_servers_keep_secrets_off_command_lines_and_hand_clients_the_ca(stack: Stack):
    states = svc.status(stack.settings)
    assert [st.state for st in states] == ["running", "running"]
    for st in states:
        cmdline = Path(f"/proc/{st.pid}/cmdline").read_bytes().decode(errors="replace")
        assert not any(pw in cmdline for pw in stack.passwords), f"{st.name}: a password is on its command line"
    for name in SECRET_FILES:
        (path,) = (stack.tmp / "state" / "services").glob(f"*/{name}")
        assert path.stat().st_mode & 0o777 == 0o600, path
    ca = (stack.tmp / "state" / "services" / "ca" / "ca.pem").read_text()
    assert Path(stack.settings.kafka_ssl_cafile).read_text() == ca == Path(stack.settings.redis_ssl_cafile).read_text()
    out = stack.zhuge("services status", "services", "status").stdout
    assert out.count("running") == 2 and out.count(" answers (") == 2, out
    assert "SASL_SSL, SCRAM-SHA-512" in out and "TLS, AUTH" in out


def test_a_wrong_password_or_a_client_without_tls_is_refused(stack: Stack):
    s = stack.settings
    assert svc.kafka_ready(s) and svc.redis_ready(s)
    assert not svc.kafka_ready(s.replace(kafka_sasl_password="wrong-password"))
    assert not svc.kafka_ready(s.replace(kafka_sasl_mechanism="PLAIN"))
    assert not svc.kafka_ready(s.replace(kafka_security_protocol="SASL_PLAINTEXT"))  # no TLS
    assert not svc.kafka_ready(s.replace(kafka_security_protocol="PLAINTEXT"))
    assert not svc.redis_ready(s.replace(redis_password="wrong-password"))
    assert not svc.redis_ready(s.replace(redis_password=""))
    assert not svc.redis_ready(s.replace(redis_url=s.redis_url.replace("rediss://", "redis://"), redis_ssl_cafile=""))
    wrong_in_url = s.redis_url.replace("rediss://", "rediss://:wrong-in-url@")
    res = stack.zhuge("score, wrong password", "score", VMS[0], check=False, redis_url=wrong_in_url, redis_password="")
    assert res.returncode == 1 and "error" in res.stderr
    assert "wrong-in-url" not in res.stdout + res.stderr and "rediss://:***@127.0.0.1" in res.stderr.replace("\n", "")


# --------------------------------------------------------------------------- commands through settings alone


def test_simulate_produces_over_sasl_ssl(simulated: Stack):
    assert f"sent {N_VMS * LIVE_STEPS:,} samples" in simulated.outputs["simulate"]
    assert f"sent {N_VMS * BACKFILL_STEPS:,} samples" in simulated.outputs["simulate backfill"]


@pytest.mark.skipif(not BITBRAINS.exists(), reason=f"real traces not found at {BITBRAINS}")
def test_replay_a_real_trace_over_sasl_ssl(stack: Stack):
    out = stack.zhuge("replay", "replay", str(BITBRAINS), "--format", "bitbrains", "--vms", "1-2", "--fast",
                      "--topic", "secure.replay").stdout  # fmt: skip
    assert "replayed 2 VMs" in out, out


def test_worker_scores_every_vm_into_redis(worker_run: Stack):
    client = worker_run.redis()
    try:
        rows = [client.hgetall(f"{worker_run.settings.redis_prefix}vm:{vm}") for vm in VMS]
    finally:
        client.close()
    assert all(rows) and all(b"best_start" in row for row in rows)
    assert list(Path(worker_run.settings.history_url).rglob("*.parquet")), "the worker archived no history"


def test_score_and_top_read_over_tls_with_auth(worker_run: Stack):
    row = json.loads(worker_run.zhuge("score", "score", VMS[0], "--json").stdout)
    assert row["vm"] == VMS[0] and row["host"]
    top = json.loads(worker_run.zhuge("top", "top", "-n", "5", "--json").stdout)
    assert len(top) == 5 and {r["vm"] for r in top} <= set(VMS)


def test_retrain_on_the_worker_history_publishes_and_tells_workers_over_redis(worker_run: Stack):
    s = worker_run.settings
    client = s.redis_client(asyncio=False)
    sub = client.pubsub()
    sub.subscribe(f"{s.redis_prefix}models")
    try:
        worker_run.zhuge("retrain", "retrain", "--workers", "1", "--max-rows", "5000", "--trees", "10", timeout=180,
                         model_store=str(worker_run.tmp / "retrain-models"))  # fmt: skip
        got, deadline = None, time.monotonic() + 10
        while got is None and time.monotonic() < deadline:
            msg = sub.get_message(timeout=0.5)
            got = msg["data"].decode() if msg and msg["type"] == "message" else None
    finally:
        sub.close()
        client.close()
    assert "store empty" in worker_run.outputs["retrain"]
    assert got and (worker_run.tmp / "retrain-models" / got).exists(), worker_run.outputs["retrain"][-2000:]


def test_bench_pipeline_runs_on_the_secure_stack(worker_run: Stack):
    out = worker_run.zhuge("bench pipeline", "bench", "pipeline", "--samples", "1000", "--vms", str(N_VMS), "--hosts",
                           str(N_HOSTS), "--shape", "batched", "--latency-seconds", "1", "--workdir",
                           str(worker_run.tmp / "bench"), "--json", timeout=240).stdout  # fmt: skip
    result = json.loads(out.strip().splitlines()[-1])
    assert result["e2e_samples_per_s"] > 0 and result["reference_per_s"] > 0 and result["p50_ms"] > 0


def test_demo_uses_the_secure_stack_and_scores_vms(worker_run: Stack):
    s = worker_run.settings
    res = worker_run.zhuge(
        "demo", "demo", "--vms", str(N_VMS), "--hosts", str(N_HOSTS), "--duration", "20", timeout=300,
        topic_metrics="demo.metrics", topic_dlq="demo.dlq", topic_scores="demo.scores", topic_migrations="demo.migrations",
        consumer_group="zhuge-secure-demo", redis_prefix="demo:",
    )  # fmt: skip
    assert "already answering" in res.stdout and f"{N_VMS} VMs had migration-window scores" in res.stdout, res.stdout[-2000:]
    assert [st.state for st in svc.status(s)] == ["running", "running"]  # the demo did not stop what it did not start


# --------------------------------------------------------------------------- no secret anywhere


def test_no_password_in_any_output_log_or_file(stack: Stack):
    """Runs last: everything the steps above printed or wrote is searched for both passwords."""
    s = stack.settings
    assert stack.outputs, "no command ran"
    texts = {f"output of {step}": text for step, text in stack.outputs.items()}
    texts["repr(settings)"] = repr(s)
    texts["services status (in process)"] = repr(svc.status(s, probe=True))
    files = [p for p in stack.tmp.rglob("*") if p.is_file() and p.name not in SECRET_FILES]
    assert any(p.name == "server.log" for p in files) and any(p.name == "redis.log" for p in files)
    assert any(p.name == "worker.log" for p in files)
    leaks = [name for name, text in texts.items() if any(pw in text for pw in stack.passwords)]
    needles = [pw.encode() for pw in stack.passwords]
    leaks += [str(p) for p in files if any(n in p.read_bytes() for n in needles)]
    assert leaks == [], f"a password leaked into: {leaks}"
    held = b"".join(p.read_bytes() for p in (stack.tmp / "state" / "services").glob("*/*") if p.name in SECRET_FILES)
    assert all(n in held for n in needles)  # the search does find them where they are meant to be
