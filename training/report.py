"""Markdown report (plus PNG plots when matplotlib is installed) of one backtest.

matplotlib is the optional extra ``report``; without it the report is tables only
and says so, rather than failing the evaluation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from training.evaluate import BacktestResult, quality_ok


def _save(plt: Any, fig: Any, out: Path, name: str) -> str:
    """Lay out, write ``out/name`` and close a figure; returns the name."""
    fig.tight_layout()
    fig.savefig(out / name, dpi=90)
    plt.close(fig)
    return name


def _fmt(x: float) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.3f}"


def summary_tables(summary: dict[str, Any]) -> str:
    """The headline tables as markdown (also used in the README)."""
    methods = list(next(iter(summary["mae"].values())).keys())
    lines = ["| horizon | " + " | ".join(f"MAE {m}" for m in methods) + " | MASE model | MASE seasonal |"]
    lines.append("| --- " * (len(methods) + 3) + "|")
    for b, row in summary["mae"].items():
        ms = summary["mase"][b]
        lines.append(
            f"| {b} | " + " | ".join(_fmt(row[m]) for m in methods) + f" | {_fmt(ms['model'])} | {_fmt(ms['seasonal'])} |"
        )
    ratios = naive_ratios(summary)
    lines += ["", "model / best naive: " + ", ".join(f"{k} {_fmt(v)}" for k, v in ratios.items())]
    reg = summary["regret_ms"]
    p95 = summary["regret_ms_p95"]
    lines += [
        "",
        f"q90 coverage (cpu_pct): {_fmt(summary['coverage_q90'])}; by target: "
        + ", ".join(f"{t} {_fmt(v)}" for t, v in summary["coverage_q90_by_target"].items()),
        "",
        "| window regret (ms) | mean | p95 |",
        "| --- | --- | --- |",
        *[f"| {k} | {_fmt(reg[k])} | {_fmt(p95[k])} |" for k in reg],
    ]
    return "\n".join(lines)


def validation_table(val: dict[str, Any]) -> str:
    """The validation split's MAE per target and bucket: boosters, naive forecasts, served blend."""
    r = val["ranges"]
    folds = ", ".join(f"{a} .. {b}" for a, b in r.get("validation_folds", [r["validation"]]))
    lines = [f"train {r['train'][0]} .. {r['train'][1]}, validation folds {folds}: {val['rows']} rows "
             f"from {val.get('days', '?')} origin days", ""]  # fmt: skip
    for target, buckets in val["mae"].items():
        methods = list(next(iter(buckets.values())).keys())
        lines += [f"| {target} | " + " | ".join(methods) + " | served / best naive |", "| --- " * (len(methods) + 2) + "|"]
        for b, row in buckets.items():
            best = min(row[m] for m in methods if m not in ("model", "served"))
            lines.append(f"| {b} | " + " | ".join(_fmt(row[m]) for m in methods) + f" | {_fmt(row['served'] / best if best else float('nan'))} |")
        lines.append("")
    if val.get("regret_ms"):
        lines += ["| window regret over the validation folds, ms | forecast | now | seasonal choice | origins |", "| --- " * 5 + "|"]
        lines += [f"| {name} | {_fmt(r['model'])} | {_fmt(r['now'])} | {_fmt(r['seasonal'])} | {int(r['origins'])} |"
                  for name, r in val["regret_ms"].items()]  # fmt: skip
        lines += ["", f"served: {val['window_choice']}", ""] if "window_choice" in val else [""]
    rule = val.get("se_rule")
    if rule:
        scales = rule["scales"]
        lines += ["| blend rule checked forward (MAE on each next fold) | " + " | ".join(f"{s:g} x SE" for s in scales)
                  + " | taken |", "| --- " * (len(scales) + 2) + "|"]  # fmt: skip
        for target, buckets in rule["forward_mae"].items():
            for b, maes in buckets.items():
                if rule["forward_rows"][target][b]:
                    lines.append(f"| {target} {b} | " + " | ".join(_fmt(m) for m in maes) + f" | {rule['chosen'][target][b]:g} x SE |")
        lines.append("")
    return "\n".join(lines)


def splits_text(summary: dict[str, Any]) -> str:
    """Which slots trained, validated and tested (one line per fold)."""
    sp = summary.get("splits")
    if not sp:
        return ""
    folds = sp.get("folds", [sp])
    return "\n".join(
        f"{f['protocol']}: train {f['train'][0]} .. {f['train'][1]} ({f['train_vms']} VMs), validation "
        f"{f['validation'][0]} .. {f['validation'][1]} ({len(f.get('validation_folds', [0]))} folds), refit to "
        f"{f['refit'][1]}, test {f['test'][0]} .. {f['test'][1]} "
        f"({f['test_vms']} VMs)"
        for f in folds
    )


def naive_ratios(summary: dict[str, Any]) -> dict[str, float]:
    """Model MAE / best naive baseline MAE per bucket, and the worst over the per-horizon table."""
    out = {b: row["model"] / min(v for k, v in row.items() if k != "model") for b, row in summary["mae"].items()}
    by_h = summary.get("mae_by_horizon") or {}
    if by_h:
        out["worst_horizon"] = max(row["model"] / min(v for k, v in row.items() if k != "model") for row in by_h.values())
    return out


def plot_tables(summary: dict[str, Any]) -> str:
    """The numbers behind the plots: MAE per grid horizon and regret quantiles per method."""
    by_h = summary.get("mae_by_horizon") or {}
    lines: list[str] = []
    if by_h:
        methods = list(next(iter(by_h.values())).keys())
        lines += ["| horizon | " + " | ".join(methods) + " |", "| --- " * (len(methods) + 1) + "|"]
        lines += [f"| {h} | " + " | ".join(_fmt(row[m]) for m in methods) + " |" for h, row in by_h.items()]
    qs = summary.get("regret_ms_quantiles") or {}
    if qs:
        cols = list(next(iter(qs.values())).keys())
        lines += ["", "| window regret (ms) | " + " | ".join(cols) + " |", "| --- " * (len(cols) + 1) + "|"]
        lines += [f"| {k} | " + " | ".join(_fmt(v[c]) for c in cols) + " |" for k, v in qs.items()]
    return "\n".join(lines)


def write_report(result: BacktestResult, out_dir: str | Path, title: str) -> Path:
    """Write ``report.md``, ``summary.json`` and plots into ``out_dir``; returns the report path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    s = result.summary
    (out / "summary.json").write_text(json.dumps(s, indent=1, sort_keys=True))
    bar = quality_ok(s)
    md = [
        f"# {title}",
        "",
        f"{s['n_vms']} VMs, {s['n_origins']} (VM, origin) pairs after the split, "
        f"{s.get('train_rows', 0)} training rows, {s.get('elapsed_s', 0)} s.",
        "Horizon buckets: grid horizons in (0,1h], (1h,6h], (6h,24h]; MAE on cpu_pct.",
        "",
        splits_text(s),
        "",
        summary_tables(s),
        "",
        "Quality bar: " + ", ".join(f"{k} {'ok' if v else 'MISSED'}" for k, v in bar.items()),
        "",
        "MAE on cpu_pct per grid horizon (the error-by-horizon plot) and regret quantiles (the regret plot):",
        "",
        plot_tables(s),
        "",
    ]
    plots = _plots(result, out)
    if plots:
        md += [f"![{name}]({name})" for name in plots]
    else:
        md.append("(plots need the optional extra `report`: `pip install zhuge[report]`)")
    path = out / "report.md"
    path.write_text("\n".join(md) + "\n")
    return path


def _plots(result: BacktestResult, out: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    names: list[str] = []
    if result.examples:
        fig, axes = plt.subplots(len(result.examples), 1, figsize=(9, 2.6 * len(result.examples)), squeeze=False)
        for ax, ex in zip(axes[:, 0], result.examples):
            S = ex["history"].size
            ax.plot(np.arange(-S + 1, 1), ex["history"], color="0.5", lw=0.8, label="history")
            ax.plot(np.arange(1, ex["future"].size + 1), ex["future"], color="k", lw=0.8, label="actual")
            ax.plot(ex["horizons"], ex["q50"], "o-", color="C0", ms=3, label="model q50")
            ax.plot(ex["horizons"], ex["q90"], "--", color="C0", lw=0.8, label="model q90")
            ax.plot(ex["horizons"], ex["seasonal"], ".", color="C3", label="seasonal")
            ax.set_title(ex["vm"], fontsize=9)
            ax.set_ylabel("cpu %")
        axes[0, 0].legend(fontsize=7, ncol=5)
        axes[-1, 0].set_xlabel("slots from origin (5 min)")
        names.append(_save(plt, fig, out, "forecasts.png"))
    if result.abs_err_by_h:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        for m, e in result.abs_err_by_h.items():
            ax.plot(result.horizons_h, e, "o-", ms=3, label=m)
        ax.set_xscale("log")
        ax.set_xlabel("horizon (h)")
        ax.set_ylabel("MAE cpu %")
        ax.legend(fontsize=8)
        names.append(_save(plt, fig, out, "error_by_horizon.png"))
    if result.regret:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        data = [np.asarray(v) for v in result.regret.values()]
        hi = max((float(np.quantile(d, 0.99)) for d in data if d.size), default=1.0) or 1.0
        for (m, d) in zip(result.regret, data):
            if d.size:
                ax.hist(np.clip(d, 0, hi), bins=40, histtype="step", label=f"{m} (mean {d.mean():.2f} ms)")
        ax.set_yscale("log")
        ax.set_xlabel("regret per origin (ms), clipped at p99")
        ax.legend(fontsize=8)
        names.append(_save(plt, fig, out, "regret.png"))
    return names
