"""`zhuge bench pipeline --workers`: argument parsing, the scale-out JSON, the group-stability wait (no broker)."""

from __future__ import annotations

import os

import pytest
from typer.testing import CliRunner

from app.commands.bench import format_scale_out
from bench.pipeline import (
    ScaleRun, _env, host_cpu_jiffies, omp_threads_for, parse_workers, proc_cpu_s, scale_out_summary, wait_group_stable,
)  # fmt: skip


def _run(workers: int, rate: float, **kw) -> ScaleRun:
    wall = 200_000 / rate
    base = dict(
        workers=workers, samples=200_000, messages=200_000, aggregate_samples_per_s=rate, wall_s=wall, produce_s=0.8,
        per_worker=[200_000 // workers] * workers, partitions_per_worker=[16 // workers] * workers,
        cpu_s_per_worker=[4.0 / workers] * workers, interval_s=wall + 0.2, host_cpu_busy=0.9, host_cores=2,
        host_busy_cpu_s=9.0, bench_cpu_s=0.3, broker_cpu_s=1.0, redis_cpu_s=0.2, setup_s=6.0,
    )  # fmt: skip
    base.update(kw)
    return ScaleRun(**base)


def test_worker_counts_parse_from_a_list_or_repeats():
    assert parse_workers(None) == []
    assert parse_workers(["1,2"]) == [1, 2]
    assert parse_workers(["1", "2,4", "2"]) == [1, 2, 4]
    assert parse_workers([" 3 , "]) == [3]
    for bad in (["0"], ["a"], ["1,-2"], ["1.5"]):
        with pytest.raises(ValueError):
            parse_workers(bad)


def test_scale_out_summary_keeps_every_run_and_the_2_vs_1_speedup():
    out = scale_out_summary([_run(1, 40_000.0), _run(2, 50_000.0)], partitions=16, shape="per-vm", vms=1000)
    assert out["partitions"] == 16 and out["shape"] == "per-vm" and out["speedup_2_vs_1"] == 1.25
    one, two = out["runs"]
    assert one["workers"] == 1 and one["speedup_vs_1"] == 1.0 and two["speedup_vs_1"] == 1.25
    assert out["aggregate_samples_per_s"] == {"1": 40_000.0, "2": 50_000.0}
    assert two["per_worker"] == [100_000, 100_000] and two["partitions_per_worker"] == [8, 8]
    assert two["per_worker_samples_per_s"] == [25_000.0, 25_000.0]
    assert one["samples_per_worker_cpu_s"] == 50_000.0
    assert one["other_cpu_s"] == pytest.approx(9.0 - 4.0 - 0.3 - 1.0 - 0.2)
    assert 0 < two["cpu_util_per_worker"][0] < 1
    # without a 1- and a 2-worker run there is no 2-vs-1 figure; unknown service CPU counts as none
    solo = scale_out_summary([_run(2, 50_000.0, broker_cpu_s=None)], partitions=16, shape="per-vm", vms=1000)
    assert "speedup_2_vs_1" not in solo and solo["runs"][0]["broker_cpu_s"] is None
    # repeated rounds: medians per worker count, each run against the 1-worker median
    rounds = [_run(1, 40_000.0), _run(2, 50_000.0), _run(1, 30_000.0), _run(2, 60_000.0), _run(1, 35_000.0), _run(2, 45_000.0)]
    rep = scale_out_summary(rounds, partitions=16, shape="per-vm", vms=1000)
    assert rep["aggregate_samples_per_s"] == {"1": 35_000.0, "2": 50_000.0} and rep["speedup_2_vs_1"] == round(50 / 35, 3)
    assert [r["workers"] for r in rep["runs"]] == [1, 2, 1, 2, 1, 2] and rep["runs"][0]["speedup_vs_1"] == round(40 / 35, 3)


def test_text_output_names_each_run():
    lines = format_scale_out(scale_out_summary([_run(1, 40_000.0), _run(2, 50_000.0)], partitions=16, shape="per-vm", vms=1000))
    assert "16 partitions" in lines[0] and "1 worker(s)" in lines[1] and "2 worker(s)" in lines[2]
    assert lines[-1].endswith("x1.25")
    assert format_scale_out(None) == []


def test_process_and_host_cpu_readings():
    mine = proc_cpu_s(os.getpid())
    assert mine is not None and mine >= 0
    assert proc_cpu_s(None) is None and proc_cpu_s(2**31 - 1) is None
    busy, total = host_cpu_jiffies()
    assert 0 <= busy <= total


class _FakeWorker:
    def __init__(self, states: list[tuple[float, float]]) -> None:
        self.states = states  # (partitions assigned, rebalances) per poll; the last one repeats

    def counter(self, name: str) -> float:
        state = self.states[0] if len(self.states) == 1 else self.states.pop(0)
        return state[0] if name == "zhuge_partitions_assigned" else state[1]


def test_the_group_is_stable_once_all_partitions_are_owned_and_nothing_moved():
    # first worker owns all 16, then a rebalance splits them 8/8
    a = _FakeWorker([(16, 1), (16, 1), (8, 2)])
    b = _FakeWorker([(0, 0), (0, 0), (8, 1)])
    wait_group_stable([a, b], 16, quiet_s=0.3, timeout_s=10)
    with pytest.raises(TimeoutError):
        wait_group_stable([_FakeWorker([(8, 1)])], 16, quiet_s=0.1, timeout_s=0.6)


def test_bad_worker_counts_are_refused_before_any_service_starts():
    from app.cli import cli

    out = CliRunner().invoke(cli, ["bench", "pipeline", "--workers", "1,x"])
    assert out.exit_code == 2 and "--workers" in out.output
    out = CliRunner().invoke(cli, ["bench", "pipeline", "--workers", "1", "--scale-shape", "bogus"])
    assert out.exit_code == 2


def test_worker_threads_never_outnumber_the_cores():
    assert [omp_threads_for(n, cores=2) for n in (1, 2, 3)] == [2, 1, 1]
    assert [omp_threads_for(n, cores=16) for n in (1, 2, 4, 32)] == [16, 8, 4, 1]


def test_the_worker_environment_is_set_while_they_start_and_restored(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    with _env("OMP_NUM_THREADS", "1"):
        assert os.environ["OMP_NUM_THREADS"] == "1"
    assert "OMP_NUM_THREADS" not in os.environ
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    with _env("OMP_NUM_THREADS", "2"):
        assert os.environ["OMP_NUM_THREADS"] == "2"
    assert os.environ["OMP_NUM_THREADS"] == "4"
    with _env("OMP_NUM_THREADS", None):
        assert os.environ["OMP_NUM_THREADS"] == "4"
