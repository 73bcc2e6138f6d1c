"""A throwaway local Prometheus that scrapes given targets (dashboard tests, docs, demos).

Why a real Prometheus rather than parsing ``/metrics``: the dashboard's PromQL
(``rate``, ``histogram_quantile``, ``or vector(0)``) only proves itself when a real
server has scraped real series over time. This runs the ``prometheus`` binary on a
free loopback port with a generated config and its TSDB in a caller-owned directory.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.services import free_port


def find_prometheus() -> str | None:
    """Path of the ``prometheus`` binary on ``PATH``, or None."""
    return shutil.which("prometheus")


def scrape_config(targets: Sequence[str], *, job: str = "zhuge-worker", interval: str = "1s") -> str:
    """A minimal ``prometheus.yml`` scraping ``targets`` (``host:port``) every ``interval``."""
    listed = ", ".join(json.dumps(t) for t in targets)
    return (
        "global:\n"
        f"  scrape_interval: {interval}\n"
        f"  evaluation_interval: {interval}\n"
        "scrape_configs:\n"
        f"  - job_name: {json.dumps(job)}\n"
        "    metrics_path: /metrics\n"
        "    static_configs:\n"
        f"      - targets: [{listed}]\n"
    )


class PromQLError(RuntimeError):
    """Prometheus answered a query with an error (bad PromQL, timeout)."""


@dataclass
class PrometheusProcess:
    proc: subprocess.Popen
    port: int
    workdir: Path

    @classmethod
    def start(
        cls,
        targets: Sequence[str],
        workdir: Path,
        *,
        scrape_interval: str = "1s",
        binary: str | None = None,
        ready_timeout: float = 30.0,
    ) -> PrometheusProcess:
        """Start Prometheus scraping ``targets``; config, TSDB and log go under ``workdir``."""
        binary = binary or find_prometheus()
        if binary is None:
            raise FileNotFoundError("prometheus binary not found on PATH (Debian/Ubuntu: apt-get install prometheus)")
        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / "prometheus.yml"
        config.write_text(scrape_config(targets, interval=scrape_interval))
        port = free_port()
        log = open(workdir / "prometheus.log", "ab")  # noqa: SIM115 - owned by the child
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--storage.tsdb.retention.time=1h",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        prom = cls(proc, port, workdir)
        try:
            prom.wait_ready(ready_timeout)
        except BaseException:
            prom.stop()
            raise
        return prom

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}; log:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"prometheus not ready after {timeout}s; log:\n{self.tail()}")

    def query(self, expr: str) -> dict[str, Any]:
        """``/api/v1/query`` at now; returns ``data`` (``resultType``, ``result``) or raises ``PromQLError``."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                body = json.load(r)
        except urllib.error.HTTPError as exc:  # 400/422 carry a JSON error body
            body = json.load(exc)
        if body.get("status") != "success":
            raise PromQLError(f"{body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def wait_for(self, expr: str, ok: Any, timeout: float, what: str = "") -> dict[str, Any]:
        """Poll ``expr`` until ``ok(data)`` is true; return the last data or raise ``TimeoutError``."""
        deadline = time.monotonic() + timeout
        data: dict[str, Any] = {}
        while True:
            data = self.query(expr)
            if ok(data):
                return data
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what or expr}: not reached after {timeout}s; last answer {data}")
            time.sleep(0.25)

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join((self.workdir / "prometheus.log").read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


def sample_values(data: dict[str, Any]) -> list[float]:
    """The float values of an instant-query answer (vector, scalar or matrix; newest point of each series)."""
    kind, result = data.get("resultType"), data.get("result")
    if kind == "scalar":
        return [float(result[1])]
    if kind == "vector":
        return [float(s["value"][1]) for s in result]
    if kind == "matrix":
        return [float(s["values"][-1][1]) for s in result if s.get("values")]
    return []


def has_finite(data: dict[str, Any]) -> bool:
    """True when at least one value is a real number (``histogram_quantile`` of no data is NaN)."""
    return any(math.isfinite(v) for v in sample_values(data))
