"""`zhuge` commands: query the scores in Redis (`score VM`, `top`)."""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from typing import Any, Optional

import typer

from app.context import settings_of

# `zhuge score`: now, the recommended window (best_*) and why, the strict minimum (min_*), provenance
_FIELDS = (
    "host", "now_downtime_ms", "now_p_ok", "now_total_s", "downtime_factor", "best_start", "best_end",
    "best_downtime_ms", "p_ok", "window_rule", "min_start", "min_end", "min_downtime_ms", "min_p_ok", "model",
    "last_ts", "updated",
)  # fmt: skip
_TIMES = {"best_start", "best_end", "min_start", "min_end", "last_ts", "updated"}


def _utc(ts: Any) -> str:
    if not isinstance(ts, float) or not math.isfinite(ts):
        return "-"
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def _num(v: Any, digits: int) -> str:
    if not isinstance(v, float):
        return "-" if v is None else str(v)
    return f"{v:.{digits}f}" if math.isfinite(v) else ("never" if v > 0 else "-")


def _json_safe(row: dict[str, Any]) -> dict[str, Any]:
    """Non-finite floats (a migration that never converges) as JSON null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


def _run(coro_fn: Any, settings: Any) -> Any:
    import asyncio

    async def main() -> Any:
        client = settings.redis_client()
        try:
            return await coro_fn(client)
        finally:
            await client.aclose()

    try:
        return asyncio.run(main())
    except OSError as exc:  # connection refused and friends
        raise _fail(f"cannot reach Redis at {settings.redis_address}: {exc}") from exc
    except Exception as exc:
        import redis

        if isinstance(exc, redis.RedisError):
            raise _fail(f"Redis error ({settings.redis_address}): {exc}") from exc
        raise


def _fail(message: str) -> typer.Exit:
    from rich.console import Console

    Console(stderr=True).print(f"[red]error:[/red] {message}")
    return typer.Exit(code=1)


def register(cli: typer.Typer) -> None:
    """Add this area's commands to the CLI."""

    @cli.command("score")
    def score(
        ctx: typer.Context,
        vm: str = typer.Argument(..., help="VM id"),
        as_json: bool = typer.Option(False, "--json", help="print the score hash as JSON"),
    ) -> None:
        """Show a VM's migration score: downtime now, the recommended window and the minimum, confidence."""
        from rich.console import Console
        from rich.table import Table

        from streams.sinks.redis_sink import read_vm

        settings = settings_of(ctx)
        row = _run(lambda c: read_vm(c, settings.redis_prefix, vm), settings)
        if row is None:
            raise _fail(f"no score for VM {vm!r} (key {settings.redis_keys().vm(vm)} not in Redis)")
        if as_json:
            typer.echo(json.dumps(_json_safe(row), sort_keys=True))
            return
        table = Table(title=f"VM {vm}", show_header=False)
        table.add_column("field", style="bold")
        table.add_column("value")
        for key in _FIELDS:
            value = row.get(key)
            if key in _TIMES:
                text = _utc(value)
            elif key.endswith("p_ok"):
                text = _num(value, 3)
            elif key.endswith(("_ms", "_s")):
                text = _num(value, 1)
            else:
                text = "-" if value in (None, "") else str(value)
            table.add_row(key, text)
        Console().print(table)

    @cli.command("top")
    def top_cmd(
        ctx: typer.Context,
        host: Optional[str] = typer.Option(None, "--host", help="only VMs on this host"),
        n: int = typer.Option(20, "-n", "--limit", min=1, help="how many VMs"),
        as_json: bool = typer.Option(False, "--json", help="print a JSON array"),
    ) -> None:
        """Best candidates to migrate now (lowest predicted downtime), optionally on one host."""
        from rich.console import Console
        from rich.table import Table

        from streams.sinks.redis_sink import top

        settings = settings_of(ctx)
        rows = _run(lambda c: top(c, settings.redis_prefix, n, host), settings)
        if as_json:
            typer.echo(json.dumps([_json_safe(r) for r in rows]))
            return
        if not rows:
            where = f" on host {host!r}" if host else ""
            Console(stderr=True).print(f"no scored VMs{where} in Redis ({settings.redis_keys().rank_now} is empty)")
            return
        title = f"best VMs to migrate now{f' on {host}' if host else ''}"
        table = Table(title=title)
        for col, justify in (("vm", "left"), ("host", "left"), ("now_downtime_ms", "right"), ("best_start (UTC)", "left"),
                             ("best_end (UTC)", "left"), ("best_downtime_ms", "right"), ("p_ok", "right"), ("rule", "left"),
                             ("min_start (UTC)", "left"), ("min_downtime_ms", "right"), ("model", "left")):
            table.add_column(col, justify=justify)  # type: ignore[arg-type]
        for r in rows:
            table.add_row(
                r["vm"], str(r.get("host", "") or "-"), _num(r.get("now_downtime_ms"), 1), _utc(r.get("best_start")),
                _utc(r.get("best_end")), _num(r.get("best_downtime_ms"), 1), _num(r.get("p_ok"), 3),
                str(r.get("window_rule") or "-"), _utc(r.get("min_start")), _num(r.get("min_downtime_ms"), 1),
                str(r.get("model", "-")),
            )
        Console().print(table)
