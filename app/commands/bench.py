"""`zhuge bench ...`: benchmarks. One typer sub-app; each benchmark is one command on it."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Optional

import typer

from app.context import settings_of

bench_app = typer.Typer(help="Benchmarks (scoring kernel, pipeline end to end).", no_args_is_help=True)


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


#: The `bench` sub-app's commands, (name, function): add new benchmarks here.
COMMANDS: list[tuple[str, Callable[..., None]]] = [("score", score)]


def register(cli: typer.Typer) -> None:
    """Add the `bench` sub-app and its commands to the CLI."""
    for name, fn in COMMANDS:
        bench_app.command(name)(fn)
    cli.add_typer(bench_app, name="bench")
