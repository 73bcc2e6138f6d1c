"""`zhuge bench ...`: benchmarks. One typer sub-app; each benchmark is one command on it."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Optional

import typer

from app.context import settings_of

bench_app = typer.Typer(help="Benchmarks (scoring kernel, pipeline end to end, HTTP API, window snapshots).", no_args_is_help=True)


def score(
    ctx: typer.Context,
    vms: int = typer.Option(10_000, "--vms", min=1, help="VMs in the synthetic fleet"),
    slots: int = typer.Option(288, "--slots", min=2, help="window slots per VM"),
    device: Optional[str] = typer.Option(None, "--device", help="auto|cpu|gpu (default: the global setting)"),
    compare_cpu: bool = typer.Option(False, "--compare-cpu", help="also time the CPU path in the same run"),
    cpu_sample: Optional[int] = typer.Option(
        None, "--cpu-sample", min=1, help="time the CPU path on this many VMs and extrapolate linearly"
    ),
    chunk: Optional[int] = typer.Option(None, "--chunk", min=1, help="VMs per scoring chunk"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Time the full scoring step (features -> model -> downtime -> best window) for N VMs."""
    from bench.score import format_bench, run_bench

    settings = settings_of(ctx)
    try:
        result = run_bench(
            settings, vms, slots, device or settings.device, compare_cpu=compare_cpu, cpu_sample=cpu_sample,
            chunk_vms=chunk,
        )  # fmt: skip
    except RuntimeError as exc:
        raise typer.BadParameter(str(exc), param_hint="--device") from exc
    typer.echo(json.dumps(result.as_dict(), indent=2) if as_json else format_bench(result))


def pipeline(
    ctx: typer.Context,
    samples: int = typer.Option(200_000, "--samples", min=1000, help="K samples produced per message shape"),
    vms: int = typer.Option(1000, "--vms", min=1, help="VMs in the simulated fleet"),
    hosts: int = typer.Option(50, "--hosts", min=1, help="hosts (a host-batched message holds its VMs)"),
    shape: list[str] = typer.Option(["batched", "per-vm"], "--shape", help="message shapes to run: batched, per-vm"),
    latency_s: float = typer.Option(15.0, "--latency-seconds", min=1.0, help="duration of the half-load latency phase"),
    workdir: Optional[str] = typer.Option(None, "--workdir", help="where worker logs, snapshots and models go (default: a temp dir)"),
    workers: Optional[list[str]] = typer.Option(
        None, "--workers", help="scale-out: worker counts to run in one group, e.g. 1,2 (default: none, the single-worker figures only)"
    ),
    partitions: int = typer.Option(16, "--partitions", min=1, help="partitions of the scale-out topic (with --workers)"),
    scale_shape: str = typer.Option("per-vm", "--scale-shape", help="message shape of the scale-out runs: batched or per-vm"),
    scale_samples: Optional[int] = typer.Option(None, "--scale-samples", min=1000, help="samples per scale-out run (default: --samples)"),
    scale_repeats: int = typer.Option(1, "--scale-repeats", min=1, help="rounds of the scale-out runs (1,2,1,2,...; medians reported)"),
    scale_vms: Optional[int] = typer.Option(
        None, "--scale-vms", min=1, help="VMs of the scale-out fleet (default: --vms; hosts scaled alike). More VMs than a micro-batch "
        "holds: about one score per sample, as live traffic; few VMs: one score covers many backlog samples"
    ),
    scale_period_s: float = typer.Option(
        300.0, "--scale-period", min=1.0, help="seconds between two samples of a VM in the scale-out fleet (300: each one a new slot)"
    ),
    worker_threads: int = typer.Option(
        0, "--worker-threads", min=0, help="OMP_NUM_THREADS of the scale-out workers (XGBoost threads); 0: cores // workers "
        "unless OMP_NUM_THREADS is set"
    ),
    as_json: bool = typer.Option(False, "--json", help="print one JSON line"),
) -> None:
    """Worker end to end vs a bare consumer and a minimal decode+HSET pipeline, same topic, same run.

    With --workers N[,M...], then N workers in one consumer group over --partitions partitions
    (aggregate samples/s, per-worker samples and CPU). Starts Kafka and/or Redis at the configured
    addresses when they do not answer, and stops exactly those again at the end.
    """
    from app import services
    from bench.pipeline import parse_workers, run_pipeline_bench

    settings = settings_of(ctx)
    bad = [s for s in [*shape, scale_shape] if s not in ("batched", "per-vm")]
    if bad:
        raise typer.BadParameter(f"unknown shape(s) {bad}; use batched and/or per-vm", param_hint="--shape/--scale-shape")
    try:
        counts = parse_workers(workers)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--workers") from exc
    _exit_on_sigterm()  # `timeout`, a CI runner: still stop the workers and services this run started
    with services.started_when_missing(settings, echo=lambda m: typer.echo(m, err=True)):
        result = run_pipeline_bench(settings, samples=samples, vms=vms, hosts=hosts, shapes=shape, latency_s=latency_s,
                                    workdir=workdir, workers=counts, partitions=partitions, scale_shape=scale_shape,
                                    scale_samples=scale_samples, scale_repeats=scale_repeats,
                                    scale_vms=scale_vms, worker_threads=worker_threads,
                                    scale_period_s=scale_period_s)  # fmt: skip
    if as_json:
        typer.echo(json.dumps(result))
        return
    for name, r in result["shapes"].items():
        typer.echo(
            f"{name:8s} {r['samples']:>9,} samples  e2e {r['e2e_samples_per_s']:>10,.0f}/s  raw consume {r['raw_consume_per_s']:>10,.0f}/s  "
            f"reference {r['reference_per_s']:>10,.0f}/s  ratio {r['ratio']:.2f}  p50 {r['p50_ms']:.0f} ms  p99 {r['p99_ms']:.0f} ms "
            f"(at {r['offered_per_s']:,.0f}/s offered)"
        )
    for line in format_scale_out(result.get("scale_out")):
        typer.echo(line)


def _exit_on_sigterm() -> None:
    """SIGTERM raises SystemExit in the main thread, so every ``finally`` (workers, services) runs."""
    import signal

    def _exit(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)


def format_scale_out(scale: dict | None) -> list[str]:
    """Text lines of the ``scale_out`` section (none without --workers)."""
    if not scale:
        return []
    lines = [f"scale-out: {scale['shape']}, {scale['partitions']} partitions, {scale['vms']:,} VMs, a sample every {scale.get('period_s', 300):g} s"]
    for r in scale["runs"]:
        per = ", ".join(
            f"{n:,} samples / {p} partitions / {c:.1f} CPU s" for n, p, c in zip(r["per_worker"], r["partitions_per_worker"], r["cpu_s_per_worker"])
        )  # fmt: skip
        lines.append(
            f"  {r['workers']} worker(s): {r['aggregate_samples_per_s']:>10,.0f} samples/s aggregate ({r['samples']:,} in {r['wall_s']:.2f} s, "
            f"x{r['speedup_vs_1']:.2f} vs 1)  host CPU busy {r['host_cpu_busy']:.0%} of {r['host_cores']} cores "
            f"(other jobs {r['other_cpu_s']:.1f} CPU s)  OMP threads {r.get('omp_threads') or 'unset'}  workers: {per}"
        )
    if "speedup_2_vs_1" in scale:
        lines.append(f"  speedup 2 vs 1 worker (medians): x{scale['speedup_2_vs_1']:.2f}")
    return lines


def api(
    ctx: typer.Context,
    vms: int = typer.Option(10_000, "--vms", min=1, help="VMs in the simulated fleet (one day scored first)"),
    hosts: int = typer.Option(200, "--hosts", min=1, help="hosts of the fleet"),
    rate: float = typer.Option(2000.0, "--rate", min=1.0, help="requests/s offered in the paced phase"),
    duration_s: float = typer.Option(20.0, "--seconds", min=1.0, help="duration of each wrk phase"),
    connections: int = typer.Option(40, "--connections", min=1, help="wrk connections"),
    api_workers: int = typer.Option(1, "--api-workers", min=1, help="uvicorn worker processes of the API"),
    workdir: Optional[str] = typer.Option(None, "--workdir", help="where worker and API logs go (default: a temp dir)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON line"),
) -> None:
    """Latency and throughput of GET /v1/vms/{vm} under wrk: a paced phase at --rate, then saturated.

    Starts Kafka and/or Redis when they do not answer (and stops exactly those), a worker and
    `zhuge api` of its own, with its own topics and Redis prefix (removed at the end).
    """
    from app import services
    from bench.api_load import format_api_bench, run_api_bench

    settings = settings_of(ctx)
    with services.started_when_missing(settings, echo=lambda m: typer.echo(m, err=True)):
        result = run_api_bench(settings, vms, hosts, rate, duration_s, connections, workdir, api_workers)
    typer.echo(json.dumps(result) if as_json else format_api_bench(result))


def snapshot(
    ctx: typer.Context,
    vms: int = typer.Option(100_000, "--vms", min=1, help="VMs in the one partition's window store"),
    repeats: int = typer.Option(3, "--repeats", min=1, help="snapshots taken per path"),
    path: list[str] = typer.Option(["periodic", "shutdown"], "--path", help="snapshot paths: periodic (end of a batch), shutdown (snapshot_all)"),
    workdir: Optional[str] = typer.Option(None, "--workdir", help="where the snapshot files go (default: a temp dir, removed)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Event-loop stall, lock time, wall time, bytes and restore time of one partition's window snapshot."""
    from bench.snapshot import format_snapshot_bench, run_snapshot_bench

    bad = [p for p in path if p not in ("periodic", "shutdown")]
    if bad:
        raise typer.BadParameter(f"unknown path(s) {bad}; use periodic and/or shutdown", param_hint="--path")
    result = run_snapshot_bench(settings_of(ctx), vms, repeats, path, workdir)
    typer.echo(json.dumps(result.as_dict(), indent=2) if as_json else format_snapshot_bench(result))


#: The `bench` sub-app's commands, (name, function): add new benchmarks here.
COMMANDS: list[tuple[str, Callable[..., None]]] = [
    ("score", score), ("pipeline", pipeline), ("api", api), ("snapshot", snapshot),
]


def register(cli: typer.Typer) -> None:
    """Add the `bench` sub-app and its commands to the CLI."""
    for name, fn in COMMANDS:
        bench_app.command(name)(fn)
    cli.add_typer(bench_app, name="bench")
