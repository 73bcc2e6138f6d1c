"""`zhuge evaluate` (backtest on a trace) and `zhuge retrain` (Dask training, gated publication)."""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Optional

import typer

from app.context import settings_of
from training.fit import BAND_DEPTHS

log = logging.getLogger(__name__)
FORMATS = ("bitbrains", "azure", "planetlab")


def _progress(console: Any) -> Any:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description:<10}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                    TimeElapsedColumn(), console=console, transient=True)  # fmt: skip


def _parse_depths(text: str) -> int | tuple[int, ...]:
    """``"6,3,4"`` -> (6, 3, 4); ``"6"`` -> 6 (every band)."""
    try:
        depths = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"depths must be integers separated by commas, got {text!r}") from None
    if any(d < 1 for d in depths):
        raise typer.BadParameter(f"depths must be >= 1, got {text!r}")
    return depths[0] if len(depths) == 1 else depths


def _check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise typer.BadParameter(f"--format must be one of {', '.join(FORMATS)}")
    return fmt


def register(cli: typer.Typer) -> None:
    """Add this area's commands to the CLI."""

    @cli.command("evaluate")
    def evaluate(
        ctx: typer.Context,
        path: str = typer.Argument(..., help="trace directory (or file)"),
        fmt: str = typer.Option(..., "--format", help="bitbrains | azure | planetlab"),
        vms: Optional[str] = typer.Option(None, "--vms", help="VM selection, e.g. 1-50,77 (default all)"),
        as_json: bool = typer.Option(False, "--json", help="print one JSON object instead of tables"),
        out: Optional[str] = typer.Option(None, "--out", help="write a markdown report with plots into DIR"),
        train_frac: float = typer.Option(0.65, help="share of the time axis used for training"),
        origin_every_h: float = typer.Option(6.0, help="hours between test origins"),
        max_train_rows: int = typer.Option(200_000, help="training rows (random subsample above this)"),
        trees: int = typer.Option(150, help="boosting rounds"),
        depths: str = typer.Option(
            ",".join(map(str, BAND_DEPTHS)), help="tree depth per horizon band (<=1 h, 1-6 h, >6 h), or one depth"
        ),
        seed: int = typer.Option(0, help="seed of the training-origin phase, row subsample and trees"),
        protocol: str = typer.Option("holdout", "--protocol", help="holdout | rolling | days | transfer"),
        folds: int = typer.Option(3, help="rolling: number of test periods at the end of the trace"),
        fold_days: float = typer.Option(3.0, help="rolling: days per test period"),
        train_days: Optional[str] = typer.Option(None, help="days: training days, e.g. 1-15"),
        test_days: Optional[str] = typer.Option(None, help="days: test days, e.g. 16-30"),
        test_path: Optional[str] = typer.Option(None, help="transfer: the test trace (default PATH)"),
        test_vms: Optional[str] = typer.Option(None, help="transfer: the test trace's VMs, e.g. 126-250"),
        validation_only: bool = typer.Option(
            False, "--validation-only", help="fit and report the validation split only; the test part is not read"
        ),
    ) -> None:
        """Backtest the forecaster vs naive baselines under a protocol, with window regret."""
        from rich.console import Console

        from training.dataset import grids_from_trace, panel_from_grids
        from training.evaluate import BacktestConfig, quality_ok
        from training.protocol import Protocol, parse_days, run_protocol, validate_only
        from training.report import splits_text, summary_tables, validation_table, write_report

        settings = settings_of(ctx)
        _check_format(fmt)
        try:
            proto = Protocol(protocol, folds=folds, fold_days=fold_days,
                             train_days=parse_days(train_days) if train_days else None,
                             test_days=parse_days(test_days) if test_days else None)  # fmt: skip
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
        if protocol == "transfer" and not (test_path or test_vms):
            raise typer.BadParameter("--protocol transfer needs --test-path and/or --test-vms")
        console = Console(stderr=True)
        cfg = BacktestConfig(
            train_frac=train_frac,
            test_origin_every=max(1, int(round(origin_every_h * 3600 / settings.slot_s))),
            max_train_rows=max_train_rows,
            n_estimators=trees,
            max_depth=_parse_depths(depths),
            seed=seed,
        )
        try:
            with _progress(console) as prog:
                task = prog.add_task("load", total=1.0)
                grids = grids_from_trace(fmt, path, vms, settings.slot_s)
                panel = panel_from_grids(grids, cfg.default_mem_mb, zero_unmeasured_net=True)
                test_panel = None
                if protocol == "transfer":
                    test_grids = grids_from_trace(fmt, test_path or path, test_vms, settings.slot_s)
                    test_panel = panel_from_grids(test_grids, cfg.default_mem_mb, zero_unmeasured_net=True)
                prog.update(task, completed=1.0)
                tasks: dict[str, Any] = {}

                def report(phase: str, frac: float) -> None:
                    if phase not in tasks:
                        tasks[phase] = prog.add_task(phase, total=1.0)
                    prog.update(tasks[phase], completed=frac)

                if validation_only:
                    val = validate_only(panel, settings, cfg, proto, test_panel, report)
                else:
                    result = run_protocol(panel, settings, cfg, proto, test_panel, report)
        except (FileNotFoundError, ValueError) as exc:
            typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
            raise typer.Exit(1) from exc
        if validation_only:
            if as_json:
                typer.echo(json.dumps(val, sort_keys=True))
            else:
                console.print(validation_table(val), markup=False, soft_wrap=True)
            return
        summary = result.summary
        summary["format"] = fmt
        if out:
            path_md = write_report(result, out, f"zhuge backtest: {fmt} ({path})")
            console.print(f"report written to {path_md}")
        if as_json:
            typer.echo(json.dumps(summary, sort_keys=True))
            return
        console.print(splits_text(summary), markup=False, soft_wrap=True)
        console.print(summary_tables(summary), markup=False, soft_wrap=True)
        bar = quality_ok(summary)
        console.print("quality bar: " + ", ".join(f"{k} {'ok' if v else 'MISSED'}" for k, v in bar.items()))

    @cli.command("retrain")
    def retrain(
        ctx: typer.Context,
        history: Optional[str] = typer.Option(None, "--history", help="Parquet history URL [default settings.history_url]"),
        fmt: Optional[str] = typer.Option(None, "--format", help="train on a trace instead: bitbrains | azure | planetlab"),
        path: Optional[str] = typer.Option(None, "--path", help="trace directory (with --format)"),
        vms: Optional[str] = typer.Option(None, "--vms", help="VM selection of the trace, e.g. 1-50"),
        every: Optional[str] = typer.Option(None, "--every", help="repeat every interval (6h, 30m); failures are logged"),
        scheduler: Optional[str] = typer.Option(None, "--scheduler", help="address of an existing Dask scheduler"),
        workers: int = typer.Option(2, "--workers", help="LocalCluster worker processes"),
        max_rows: int = typer.Option(200_000, help="training rows (random subsample above this)"),
        trees: int = typer.Option(150, help="boosting rounds"),
    ) -> None:
        """Build features on Dask workers, train with xgboost.dask, publish if better than LATEST."""
        from rich.console import Console

        from training.retrain import RetrainConfig, open_client, parse_every, retrain_once

        settings = settings_of(ctx)
        # our loggers at the configured level; Dask's cluster chatter (and benign shutdown races) stays quiet
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        for ours in ("app", "training"):
            logging.getLogger(ours).setLevel(settings.log_level.upper())
        if fmt is not None:
            _check_format(fmt)
            if path is None:
                raise typer.BadParameter("--format needs --path")
        source = {"fmt": fmt, "path": path, "vms": vms} if fmt else {"history": history or settings.history_url}
        try:
            interval = parse_every(every) if every else None
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from exc
        cfg = RetrainConfig(n_workers=workers, scheduler=scheduler, max_rows=max_rows, n_estimators=trees)
        console = Console(stderr=True)
        import distributed  # noqa: F401  (its import installs its log config; quiet it afterwards)

        logging.getLogger("distributed").setLevel(logging.ERROR)
        client, cluster = open_client(cfg, settings.device)
        try:
            while True:
                started = time.monotonic()
                try:
                    res = _run_once(console, settings, client, cfg, source, retrain_once)
                    _summary(console, res)
                except Exception as exc:  # noqa: BLE001 - the periodic loop must survive a bad run
                    if interval is None:
                        typer.secho(f"error: retrain failed: {exc}", err=True, fg=typer.colors.RED)
                        raise typer.Exit(1) from exc
                    log.exception("retrain failed; next try in %s", every)
                if interval is None:
                    return
                time.sleep(max(0.0, interval - (time.monotonic() - started)))
        finally:
            client.close()
            if cluster is not None:
                cluster.close()


def _run_once(console: Any, settings: Any, client: Any, cfg: Any, source: dict[str, Any], fn: Any) -> Any:
    with _progress(console) as prog:
        tasks: dict[str, Any] = {}

        def report(phase: str, frac: float) -> None:
            task = tasks.setdefault("run", prog.add_task("retrain", total=1.0))
            prog.update(task, completed=frac, description=phase)

        return fn(settings, client, cfg, progress=report, **source)


def _summary(console: Any, res: Any) -> None:
    from rich.table import Table

    table = Table(title="retrain")
    table.add_column("item")
    table.add_column("value")
    champ = "-" if res.champion_loss is None else f"{res.champion_loss:.4f} ({res.champion})"
    rows = [
        ("VMs", str(res.n_vms)),
        ("training rows", str(res.rows)),
        ("challenger held-out pinball loss", f"{res.challenger_loss:.4f}"),
        ("champion held-out pinball loss", champ),
        *_gate_rows(res),
        ("decision", res.reason),
        ("published version", res.version or "-"),
        *[(k, f"{v:.1f}") for k, v in res.timings.items()],
    ]
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)


def _gate_rows(res: Any) -> list[tuple[str, str]]:
    """The gate's measure (live accuracy's): MAE / persistence, cpu_pct MAE per bucket, naive misses."""
    champ = "-" if res.champion_score is None else f"{res.champion_score:.4f}"
    rows = [("challenger MAE / persistence (gate)", f"{res.challenger_score:.4f}"), ("champion MAE / persistence", champ),
            ("held-out day", f"{res.held_out_pairs} cpu_pct pairs; {res.held_out_observed:.0%} of its VM-slots observed"
             + (f"; {res.held_out_gap_slots} slots without a sample skipped" if res.held_out_gap_slots else ""))]
    for bucket, row in res.mae.get("cpu_pct", {}).items():
        rows.append((f"cpu_pct MAE {bucket}", "  ".join(f"{m} {v:.3f}" for m, v in row.items())))
    rows.append(("worse than best naive", "; ".join(res.worse_than_naive) or "nowhere"))
    return rows
