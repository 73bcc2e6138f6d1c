"""Evaluation protocols: which part of which trace trains, validates and tests.

Every protocol fits with ``training.validated.fit_validated`` (choices on a validation split
inside the training range) and touches its test part once, in ``training.evaluate.backtest``:

- ``holdout``: the first ``train_frac`` of the time axis trains, the rest tests;
- ``rolling``: ``folds`` consecutive test periods of ``fold_days`` at the end of the trace, each
  with a model trained on everything before it (rolling origin, expanding window); the summary
  is the mean over folds (each fold's is kept under ``folds``);
- ``days``: train on days ``A-B`` and test on days ``C-D`` of the trace (day 1 = its first day);
- ``transfer``: train on the whole of one trace (``PATH``, ``--vms``) and test on another
  (``--test-path``, ``--test-vms``): other VMs, another month. When both are the same folder
  the time axis is split at ``train_frac`` as well, so no test VM's days were trained on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from gpu_kernels.features import DAY_S
from training.dataset import Panel
from training.evaluate import BacktestConfig, BacktestResult, Progress, _noop, backtest, split_index
from training.validated import fit_validated, iso_utc, validate

PROTOCOLS = ("holdout", "rolling", "days", "transfer")


@dataclass(frozen=True)
class Protocol:
    kind: str = "holdout"
    folds: int = 3
    fold_days: float = 3.0
    train_days: tuple[int, int] | None = None
    test_days: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.kind not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {self.kind!r}")
        if self.kind == "days" and (self.train_days is None or self.test_days is None):
            raise ValueError("the days protocol needs train days and test days (e.g. 1-15 and 16-30)")
        if self.kind == "rolling" and (self.folds < 1 or self.fold_days <= 0):
            raise ValueError("rolling needs folds >= 1 and fold days > 0")


def parse_days(text: str) -> tuple[int, int]:
    """``"1-15"`` -> (1, 15): inclusive, counted from 1."""
    try:
        a, b = (int(x) for x in text.split("-"))
    except ValueError:
        raise ValueError(f"days must look like 1-15, got {text!r}") from None
    if a < 1 or b < a:
        raise ValueError(f"days must be increasing and start at 1 or later, got {text!r}")
    return a, b


def _split_info(kind: str, panel: Panel, test_panel: Panel, val: dict[str, Any], test: tuple[int, int], slot_s: int) -> dict[str, Any]:
    iso = lambda p, i: iso_utc((p.first_slot + i) * slot_s)  # noqa: E731
    return {"protocol": kind, **val["ranges"], "test": [iso(test_panel, test[0]), iso(test_panel, test[1])],
            "train_vms": len(panel.vms), "test_vms": len(test_panel.vms)}  # fmt: skip


def _one(
    kind: str, panel: Panel, test_panel: Panel, start: int, end: int, test: tuple[int, int],
    settings: Any, cfg: BacktestConfig, progress: Progress,
) -> BacktestResult:  # fmt: skip
    model, val = fit_validated(panel, end, settings, cfg, start=start, progress=progress)
    res = backtest(test_panel, model, test[0], settings, cfg, progress, end=test[1])
    res.summary["validation"] = val
    res.summary["splits"] = _split_info(kind, panel, test_panel, val, test, settings.slot_s)
    res.summary["train_rows"] = int(model.metrics["rows"])
    res.summary["fit_s"] = model.metrics["fit_s"]
    return res


def run_protocol(
    panel: Panel,
    settings: Any,
    cfg: BacktestConfig,
    protocol: Protocol = Protocol(),
    test_panel: Panel | None = None,
    progress: Progress = _noop,
) -> BacktestResult:
    """Fit and backtest under ``protocol``; the summary says exactly which slots did what (``splits``)."""
    tic = time.perf_counter()
    day = DAY_S // settings.slot_s
    S = settings.window_slots
    if protocol.kind == "holdout":
        split = split_index(panel, cfg.train_frac)
        res = _one("holdout", panel, panel, 0, split, (split, panel.n_slots), settings, cfg, progress)
    elif protocol.kind == "days":
        (a, b), (c, d) = protocol.train_days, protocol.test_days  # type: ignore[misc]
        if c <= b:
            raise ValueError(f"test days {c}-{d} must come after the training days {a}-{b}")
        end, test_end = min(b * day, panel.n_slots), min(d * day, panel.n_slots)
        if (c - 1) * day >= panel.n_slots:
            raise ValueError(f"the trace has {panel.n_slots / day:.1f} days: no day {c}")
        res = _one("days", panel, panel, (a - 1) * day, end, ((c - 1) * day, test_end), settings, cfg, progress)
    elif protocol.kind == "transfer":
        if test_panel is None:
            raise ValueError("the transfer protocol needs a test trace (--test-path and/or --test-vms)")
        if _same_axis(panel, test_panel):  # same folder, other VMs: also split the time axis
            split = split_index(panel, cfg.train_frac)
            res = _one("transfer", panel, test_panel, 0, split, (split, test_panel.n_slots), settings, cfg, progress)
        else:
            res = _one("transfer", panel, test_panel, 0, panel.n_slots, (S, test_panel.n_slots), settings, cfg, progress)
    else:
        res = _rolling(panel, settings, cfg, protocol, progress)
    res.summary["elapsed_s"] = round(time.perf_counter() - tic, 1)
    return res


def _same_axis(a: Panel, b: Panel | None) -> bool:
    return b is not None and a.first_slot == b.first_slot and a.n_slots == b.n_slots


def train_range(panel: Panel, settings: Any, cfg: BacktestConfig, protocol: Protocol, test_panel: Panel | None = None) -> tuple[int, int]:
    """The ``[start, end)`` slot range the protocol's (last) model trains on."""
    day = DAY_S // settings.slot_s
    if protocol.kind == "days":
        a, b = protocol.train_days  # type: ignore[misc]
        return (a - 1) * day, min(b * day, panel.n_slots)
    if protocol.kind == "rolling":
        return 0, panel.n_slots - settings.horizon_slots - int(round(protocol.fold_days * DAY_S / settings.slot_s))
    if protocol.kind == "transfer" and not _same_axis(panel, test_panel):
        return 0, panel.n_slots
    return 0, split_index(panel, cfg.train_frac)


def validate_only(
    panel: Panel, settings: Any, cfg: BacktestConfig, protocol: Protocol, test_panel: Panel | None = None, progress: Progress = _noop
) -> dict[str, Any]:
    """The validation report of the protocol's (last) training range, without a refit or any test:
    what choices (features, knobs) are made on."""
    start, end = train_range(panel, settings, cfg, protocol, test_panel)
    return validate(panel, end, settings, cfg, start=start, progress=progress)


def _rolling(panel: Panel, settings: Any, cfg: BacktestConfig, protocol: Protocol, progress: Progress) -> BacktestResult:
    """Folds at the end of the trace, oldest first; the headline figures are the fold means."""
    fold = int(round(protocol.fold_days * DAY_S / settings.slot_s))
    T = panel.n_slots
    results = []
    for i in range(protocol.folds, 0, -1):
        lo, hi = T - i * fold - settings.horizon_slots, T - (i - 1) * fold
        results.append(_one("rolling", panel, panel, 0, lo, (lo, hi), settings, cfg, progress))
    first = results[0]
    first.summary = _mean_summaries([r.summary for r in results])
    first.regret_rows = {k: np.concatenate([r.regret_rows[k] for r in results]) for k in first.regret_rows}
    first.regret_at = np.concatenate([r.regret_at for r in results])
    first.abs_err_by_h = {m: np.mean([r.abs_err_by_h[m] for r in results], axis=0) for m in first.abs_err_by_h}
    return first


def _mean_summaries(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """Fold means of every number that sits at the same place in each summary; the folds kept."""

    def mean(values: list[Any]) -> Any:
        if all(isinstance(v, dict) for v in values):
            return {k: mean([v[k] for v in values]) for k in values[0] if all(k in v for v in values)}
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return float(np.mean(values))
        return values[-1]

    out = mean(summaries)
    out["folds"] = [{k: s[k] for k in ("splits", "mae", "coverage_q90", "regret_ms", "n_origins")} for s in summaries]
    out["splits"] = {"protocol": "rolling", "folds": [s["splits"] for s in summaries]}
    out["n_origins"] = int(sum(s["n_origins"] for s in summaries))
    return out
