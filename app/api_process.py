"""Start and stop ``zhuge api`` as a child process (tests, benchmarks): real uvicorn on a loopback socket."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.services import free_port
from app.settings import Settings
from app.worker_process import settings_env


@dataclass
class ApiProcess:
    proc: subprocess.Popen
    url: str
    log_path: Path

    @classmethod
    def start(cls, settings: Settings, log_path: Path, timeout_s: float = 30.0, workers: int = 1,
              port: int | None = None) -> ApiProcess:  # fmt: skip
        """``zhuge api`` on ``port`` (default: a free one) on loopback, once ``/readyz`` answers 200."""
        port = port or free_port()
        log = open(log_path, "ab")  # noqa: SIM115 - owned by the child
        proc = subprocess.Popen([sys.executable, "-m", "app.cli", "api", "--port", str(port), "--workers", str(workers)],
                                env=settings_env(settings), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        api = cls(proc, f"http://127.0.0.1:{port}", log_path)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"zhuge api exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
            try:
                if api.get("/readyz")[0] == 200:
                    return api
            except OSError:
                pass
            time.sleep(0.2)
        api.stop()
        raise TimeoutError(f"zhuge api not ready after {timeout_s}s: {log_path.read_text()[-2000:]}")

    def request(self, method: str, path: str, body: Any = None, token: str | None = None) -> tuple[int, Any]:
        """(status, decoded JSON body) of one request; HTTP errors are returned, not raised."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if token is not None:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                raw, status = resp.read(), resp.status
        except urllib.error.HTTPError as exc:
            raw, status = exc.read(), exc.code
        try:
            return status, json.loads(raw)
        except ValueError:  # not JSON (the page, /metrics): the text
            return status, raw.decode(errors="replace")

    def get(self, path: str, token: str | None = None) -> tuple[int, Any]:
        return self.request("GET", path, token=token)

    def stop(self) -> None:
        """SIGTERM to the process group (uvicorn's worker processes too), SIGKILL after 10 s."""
        import os
        import signal

        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
