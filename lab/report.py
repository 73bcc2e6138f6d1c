"""The calibration's numbers: constants fitted on idle runs, models scored on the others, a report.

Protocol (so the figures are not in-sample): the runs with an idle guest (dirty
rate 0) isolate the link's constants, since with nothing dirtied a migration is one
pass plus the pause: the effective payload rate (``efficiency``: the agent's
non-zero memory over the first pass's time), where the last pass leaves the
pending bytes (``gap_ms``, from QEMU's ``downtime-bytes``) and the pause's fixed
cost (``resume_ms``: the pause minus its copy time). Every model is then scored on
the runs with a dirtying guest, which the fit never saw:

- ``classic``: the round-based model zhuge shipped first (settings' ``max_rounds``,
  ``resume_ms``);
- ``qemu``: the QEMU-faithful model with zhuge's default constants;
- ``qemu_calibrated``: the same model with the constants fitted here.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from app.settings import Settings
from gpu_kernels.downtime import PrecopyParams, precopy_with
from lab.calibrate import GridPoint, Run, full_grid, load_runs, measurement_error, quick_grid, run_grid, save, summary

Echo = Callable[[str], None]
MIB_PER_MBIT = 1e6 / 8 / 2**20


def fit_constants(runs: list[Run], defaults: PrecopyParams) -> dict[str, float]:
    """Efficiency, gap and resume cost from the idle runs (medians); the defaults where there are none."""
    eff, gaps, resumes = [], [], []
    for r in runs:
        o = r.outcome
        if r.point.rate_mbps != 0 or not o["converged"] or o["downtime_ms"] is None:
            continue
        link = r.point.link_mbit * MIB_PER_MBIT
        pause_s = o["downtime_ms"] / 1000
        first_pass_s = o["total_ms"] / 1000 - pause_s
        e = r.measured["mem_used_mb"] / (link * first_pass_s)
        eff.append(e)
        if o.get("downtime_bytes"):
            copy_s = o["downtime_bytes"] / 2**20 / (link * e)
            gaps.append(r.point.limit_ms - copy_s * 1000)
            resumes.append((pause_s - copy_s) * 1000)
    med = lambda xs, d: float(np.median(xs)) if xs else d  # noqa: E731
    return {"efficiency": min(1.0, med(eff, defaults.efficiency)), "gap_ms": max(0.0, med(gaps, defaults.gap_ms)),
            "resume_ms": max(0.0, med(resumes, defaults.resume_ms)), "idle_runs": len(eff)}  # fmt: skip


def predictor(params: PrecopyParams, timeout_s: float) -> Callable[[dict[str, Any], GridPoint, float], dict[str, Any]]:
    """A model over one run's measured inputs, in the units of the outcome."""

    def predict(measured: dict[str, Any], point: GridPoint, _: float) -> dict[str, Any]:
        p = PrecopyParams(**{**params.__dict__, "downtime_target_ms": point.limit_ms, "timeout_s": timeout_s})
        wss = measured.get("wss_mb")
        pc = precopy_with(p, np.float64(measured["mem_used_mb"]), np.float64(measured["dirty_mbps"]),
                          np.float64(point.link_mbit * MIB_PER_MBIT), np, np.float64(np.nan if wss is None else wss))  # fmt: skip
        converged = bool(pc.converged)
        return {"converged": converged, "total_s": float(pc.duration_s),
                "downtime_ms": float(pc.downtime_ms) if converged else None}  # fmt: skip

    return predict


def score(runs: list[Run], settings: Settings, timeout_s: float) -> dict[str, Any]:
    """Fit on the idle runs, predict every run with each model, summarise on the held-out ones."""
    base = PrecopyParams.from_settings(settings)
    fitted = fit_constants(runs, base)
    models = {
        "classic": PrecopyParams(**{**base.__dict__, "model": "classic"}),
        "qemu": PrecopyParams(**{**base.__dict__, "model": "qemu"}),
        "qemu_calibrated": PrecopyParams(**{**base.__dict__, "model": "qemu", "efficiency": fitted["efficiency"],
                                            "gap_ms": fitted["gap_ms"], "resume_ms": fitted["resume_ms"]}),
    }  # fmt: skip
    for run in runs:
        for name, params in models.items():
            run.predictions[name] = predictor(params, timeout_s)(run.measured, run.point, timeout_s)
    held_out = [r for r in runs if r.point.rate_mbps != 0]
    return {
        "fitted": fitted,
        "held_out": {name: summary(held_out, name) for name in models},
        "all_runs": {name: summary(runs, name) for name in models},
        "measurement": measurement_error(runs),
    }


def calibrate_command(settings: Settings, *, quick: bool, out: str | None, runs: str | None, timeout_s: float,
                      echo: Echo) -> dict[str, Any]:  # fmt: skip
    """What ``zhuge lab calibrate`` prints: migrate the grid (or load runs), score, write the report."""
    started = time.monotonic()
    if runs:
        found = load_runs(Path(runs))
        grid_name = f"re-scored from {runs}"
    else:
        points = quick_grid() if quick else full_grid()
        grid_name = "quick" if quick else "full"
        echo(f"calibrating on {len(points)} real migrations ({grid_name} grid); this takes a few minutes ...")

        def progress(i: int, n: int, run: dict[str, Any]) -> None:
            o, p = run["outcome"], run["point"]
            pause = f"{o['downtime_ms']:.0f} ms" if o["downtime_ms"] is not None else "-"
            echo(f"[{time.monotonic() - started:5.0f} s] {i}/{n} mem {p['mem_mb']} MB wss {p['wss_mb']} MB "
                 f"dirty {p['rate_mbps']:g} MiB/s link {p['link_mbit']:g} Mbit/s limit {p['limit_ms']:g} ms: "
                 f"{o['status']}, total {o['total_ms'] / 1000:.1f} s, pause {pause}")  # fmt: skip

        found = asyncio.run(run_grid(settings.state_dir, "calibrate", points, timeout_s=timeout_s,
                                     wss_calc_s=4.0 if quick else 6.0, progress=progress))  # fmt: skip
    result = score(found, settings, timeout_s)
    best = result["held_out"]["qemu_calibrated"]
    doc: dict[str, Any] = {
        "runs": len(found), "held_out_runs": best["runs"], "grid": grid_name,
        "mape_total_time": best["mape_total_time"], "downtime_mae_ms": best["downtime_mae_ms"],
        "downtime_mape": best["downtime_mape"], "downtime_within_20pct_or_10ms": best["downtime_within_20pct_or_10ms"],
        "convergence_accuracy": best["convergence_accuracy"], **result,
        "seconds": round(time.monotonic() - started, 1), "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "timeout_s": timeout_s,
    }  # fmt: skip
    doc = _finite(doc)
    doc["text"] = render(doc)
    if out:
        folder = Path(out)
        save(found, folder)
        (folder / "summary.json").write_text(json.dumps({k: v for k, v in doc.items() if k != "text"}, indent=2))
        (folder / "report.md").write_text(doc["text"] + _plots(found, folder))
        echo(f"report: {folder / 'report.md'}")
    return doc


def render(doc: dict[str, Any]) -> str:
    """The report as markdown (also what ``zhuge lab calibrate`` prints)."""
    f = doc["fitted"]
    where = doc["grid"] if doc["grid"].startswith("re-scored") else f"{doc['grid']} grid, {doc['seconds']:.0f} s"
    lines = [
        f"# Downtime model calibration: {doc['runs']} real QEMU migrations ({where}, "
        f"{doc['machine']}, abort after {doc['timeout_s']:g} s)", "",
        f"Constants fitted on {f['idle_runs']} idle runs: efficiency {f['efficiency']:.3f}, gap {f['gap_ms']:.1f} ms, "
        f"resume {f['resume_ms']:.1f} ms. Scored on the {doc['held_out_runs']} runs with a dirtying guest:", "",
        "| model | MAPE total time | downtime MAE (ms) | downtime MAPE | within 20 % or 10 ms | convergence right |",
        "| --- | --- | --- | --- | --- | --- |",
    ]  # fmt: skip
    for name, s in doc["held_out"].items():
        lines.append(f"| {name} | {_pct(s['mape_total_time'])} | {_num(s['downtime_mae_ms'])} | {_pct(s['downtime_mape'])} "
                     f"| {_pct(s['downtime_within_20pct_or_10ms'])} | {_pct(s['convergence_accuracy'])} |")  # fmt: skip
    m = doc["measurement"]
    lines += ["", f"Measurement error of the inputs: the agent's dirty rate is {_num(m['dirty_rate_abs_err_mbps'])} MiB/s "
              f"({_pct(m['dirty_rate_rel_err'])}) from the guest's own page counter on average; QEMU saw "
              f"{_num(m['qemu_seen_over_agent_rate'], 2)}x the agent's rate while migrating (median).", ""]  # fmt: skip
    return "\n".join(lines)


def _plots(runs: list[Run], folder: Path) -> str:
    """Predicted vs measured total time and pause per model (when matplotlib is installed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "\n(plots need matplotlib: pip install -e .[report])\n"
    names = list(runs[0].predictions) if runs else []
    fig, axes = plt.subplots(2, len(names), figsize=(4 * len(names), 7), squeeze=False)
    for j, name in enumerate(names):
        conv = [r for r in runs if r.outcome["converged"]]
        meas = [r.outcome["total_ms"] / 1000 for r in conv]
        pred = [r.predictions[name]["total_s"] for r in conv]
        ax = axes[0][j]
        ax.scatter(meas, pred, s=14)
        top = max(meas + [p for p in pred if math.isfinite(p)] + [1])
        ax.plot([0, top], [0, top], "k--", lw=0.8)
        ax.set(title=f"{name}: total time (s)", xlabel="measured", ylabel="predicted")
        both = [r for r in conv if r.predictions[name]["converged"] and r.outcome["downtime_ms"] is not None]
        ax = axes[1][j]
        ax.scatter([r.outcome["downtime_ms"] for r in both], [r.predictions[name]["downtime_ms"] for r in both], s=14)
        top = max([r.outcome["downtime_ms"] for r in both] + [1])
        ax.plot([0, top], [0, top], "k--", lw=0.8)
        ax.set(title=f"{name}: pause (ms)", xlabel="measured", ylabel="predicted")
    fig.tight_layout()
    fig.savefig(folder / "predicted_vs_measured.png", dpi=110)
    plt.close(fig)
    return "\n![predicted vs measured](predicted_vs_measured.png)\n"


def _finite(obj: Any) -> Any:
    """NaN/inf -> None, so the JSON is strict."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f} %"


def _num(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"
