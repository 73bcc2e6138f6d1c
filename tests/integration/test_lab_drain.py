"""A lab host drained for real, all now at K=2: concurrent migrations, each at its share, on the dilated lab clock.

The short check of ``lab.drain`` with QEMU (about 30 s): two small guests on h1,
``zhuge lab drain h1 --strategy all-now -k 2`` (no Redis or Kafka needed), both
running at once at link/2 (QEMU's ``max-bandwidth``), each on its own incoming
port, the lab state following both guests to h2, and the compressed lab clock
running in real time while they migrate. The full comparison with a plan is
``zhuge lab drain-compare`` (README "QEMU lab").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.test_lab import _lab_available

pytestmark = [pytest.mark.integration, pytest.mark.lab, pytest.mark.timeout(300)]

ZHUGE = [sys.executable, "-m", "app.cli"]


def test_all_now_at_k_runs_two_migrations_at_once_each_at_half_the_link(tmp_path: Path) -> None:
    _lab_available()
    from lab import lab as labmod
    from lab.drain import REAL_TIME
    from lab.qemu import GuestSpec
    from lab.state import LabClock, lab_dir, load

    state_dir = str(tmp_path / "state")
    name = f"dr{os.getpid() % 1000}"
    specs = [GuestSpec(vm, ram_mb=256, mem_mb=48, wss_mb=32, rate_mbps=1.0) for vm in ("vm1", "vm2")]
    clock = LabClock(300.0, time.time() - 3 * 86400, time.time())
    labmod.up(state_dir, name, labmod.LabPlan(2, 256.0, specs, None, clock, {"vm1": "h1", "vm2": "h1"}))
    try:
        env = {**os.environ, "ZHUGE_STATE_DIR": state_dir}
        out = subprocess.run([*ZHUGE, "lab", "drain", "h1", "--name", name, "--strategy", "all-now", "-k", "2",
                              "--timeout", "60", "--on-timeout", "abort", "--no-publish", "--json"],
                             capture_output=True, text=True, env=env, timeout=240)  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]
        outcome = json.loads(out.stdout)["outcome"]
        print(f"\nLAB-FIGURE drain all-now K=2: {json.dumps({k: outcome[k] for k in ('total_downtime_ms', 'worst_downtime_ms', 'makespan_s', 'makespan_wall_s')})}")
        rows = {r["vm"]: r for r in outcome["rows"]}
        assert set(rows) == {"vm1", "vm2"} and all(r["status"] == "completed" and r["converged"] for r in rows.values())
        link = 256e6 / 8 / 2**20
        assert all(r["bw_mbps"] == pytest.approx(link / 2, abs=0.01) for r in rows.values())
        assert rows["vm1"]["port"] != rows["vm2"]["port"]
        assert abs(rows["vm1"]["start"] - rows["vm2"]["start"]) < 60, "both at once"
        for r in rows.values():  # each at most its share (QEMU's max-bandwidth; the shared tc link alone would allow it)
            assert r["transferred_bytes"] / 2**20 / (r["total_ms"] / 1000) <= link / 2 * 1.1, r
        assert outcome["dilated"] and outcome["makespan_s"] == pytest.approx(outcome["makespan_wall_s"], rel=0.2, abs=2.0)
        state = load(lab_dir(state_dir, name))
        assert state is not None and {g.process.host for g in state.guests.values()} == {"h2"}
        assert state.clock.speed == 300.0 and state.clock.speed != REAL_TIME, "the clock has its speed back"
    finally:
        labmod.down(state_dir, name)
