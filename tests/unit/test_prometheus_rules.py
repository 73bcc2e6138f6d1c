"""The Prometheus rules in ops/: valid (``promtool check``), wired into the config compose mounts,
and behaving as documented (``promtool test rules``: the alert fires after an hour of a model worse
than persistence, not for a short bad spell, not on few pairs, not when it is as good)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "ops" / "prometheus" / "rules" / "zhuge-forecast.yml"
RULE_TESTS = ROOT / "ops" / "prometheus" / "rules" / "tests" / "zhuge-forecast.test.yml"
PROMTOOL = shutil.which("promtool")


def _promtool(*args: str) -> subprocess.CompletedProcess:
    if PROMTOOL is None:
        if os.environ.get("CI"):
            pytest.fail("promtool not on PATH under CI (make install / ops/install-system-deps.sh installs prometheus)")
        pytest.skip("promtool not on PATH (apt-get install prometheus)")
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_the_rules_file_is_valid():
    out = _promtool("check", "rules", str(RULES))
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_alert_behaves_as_documented():
    out = _promtool("test", "rules", str(RULE_TESTS))
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_compose_prometheus_loads_the_rules():
    config = ROOT / "ops" / "prometheus" / "prometheus.yml"
    prom = yaml.safe_load(config.read_text())
    assert "rules/zhuge-forecast.yml" in prom["rule_files"]
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert "./ops/prometheus/rules:/etc/prometheus/rules:ro" in compose["services"]["prometheus"]["volumes"]
    out = _promtool("check", "config", str(config))
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_alert_is_on_persistence_per_target_and_bucket():
    groups = yaml.safe_load(RULES.read_text())["groups"]
    rules = {r.get("alert") or r["record"]: r for g in groups for r in g["rules"]}
    alert = rules["ZhugeModelWorseThanPersistence"]
    assert alert["for"] == "1h" and "zhuge:forecast_mae_vs_last:1h > 1" in alert["expr"]
    assert 'method="last"' in rules["zhuge:forecast_mae_vs_last:1h"]["expr"]
    assert "by (target, bucket, method)" in rules["zhuge:forecast_mae:1h"]["expr"]
