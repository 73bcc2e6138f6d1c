"""Start and stop ``zhuge worker`` as a child process (tests, benchmarks, the demo).

A worker is a real OS process here so that ``kill -9``, restarts and two-worker
rebalances are what production sees, not an in-process imitation.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, fields
from pathlib import Path

from app.services import free_port
from app.settings import ENV_PREFIX, Settings


def settings_env(settings: Settings, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment that reproduces ``settings`` in a child process."""
    env = dict(os.environ if base is None else base)
    for f in fields(settings):
        env[ENV_PREFIX + f.name.upper()] = str(getattr(settings, f.name))
    return env


@dataclass
class WorkerProcess:
    proc: subprocess.Popen
    metrics_port: int
    log_path: Path

    @classmethod
    def start(cls, settings: Settings, log_path: Path, *, ready_timeout: float = 90.0) -> WorkerProcess:
        port = free_port()
        env = settings_env(settings.replace(metrics_port=port))
        log = open(log_path, "ab")  # noqa: SIM115 - owned by the child
        proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "worker"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        worker = cls(proc, port, log_path)
        worker.wait_ready(ready_timeout)
        return worker

    def metrics_text(self) -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2).read().decode()

    def wait_ready(self, timeout: float) -> None:
        """Wait until /metrics says ready: a model in service (bootstrap training included) and the group joined."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}; log:\n{self.tail()}")
            try:
                if self.metric_sums().get("zhuge_ready") == 1 and self.model_version() not in ("", "none"):
                    return
            except OSError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"worker not ready on /metrics after {timeout}s; log:\n{self.tail()}")

    def _samples(self) -> list:  # type: ignore[type-arg]
        from prometheus_client.parser import text_string_to_metric_families

        return [s for family in text_string_to_metric_families(self.metrics_text()) for s in family.samples]

    def metric_sums(self) -> dict[str, float]:
        """Every sample name from /metrics with its values summed over labels."""
        sums: dict[str, float] = {}
        for sample in self._samples():
            sums[sample.name] = sums.get(sample.name, 0.0) + float(sample.value)
        return sums

    def sample(self, name: str, **labels: str) -> float | None:
        """The value of one labelled sample from /metrics (None when absent)."""
        return next(
            (float(s.value) for s in self._samples() if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())),
            None,
        )

    def counter(self, name: str) -> float:
        """Sum of a metric's samples (all labels) from /metrics."""
        return self.metric_sums().get(name, 0.0)

    def model_version(self) -> str:
        """The version label of ``zhuge_model_version_info`` (``none`` before a model is loaded)."""
        return next(
            (s.labels["version"] for s in self._samples() if s.name == "zhuge_model_version_info" and s.value == 1), ""
        )

    def kill9(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        return int(self.proc.returncode)

    def tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"
