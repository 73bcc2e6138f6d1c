"""Evaluation protocols: validation inside the training range, the test part strictly after it."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest

from app.settings import Settings
from training.dataset import Panel
from training.evaluate import BacktestConfig
from training.protocol import Protocol, parse_days, run_protocol, train_range, validate_only
from training.blend import WINDOW_QUANTILES
from training.validated import CANDIDATES, validation_plan, window_label

SETTINGS = Settings.from_env({})
CFG = BacktestConfig(n_estimators=4, max_depth=2, max_train_rows=5000, train_origin_every=24, test_origin_every=48, nthread=1)
DAY = 288


def daily_panel(vms: int, days: int, seed: int = 0, first_slot: int = 19_000 * DAY) -> Panel:
    """VMs with a daily cycle plus noise (cpu, dirty, net, mem)."""
    rng = np.random.default_rng(seed)
    t = np.arange(days * DAY)
    cycle = 30 + 20 * np.sin(2 * np.pi * t / DAY)
    series = np.empty((vms, t.size, 4), np.float32)
    series[:, :, 0] = cycle + rng.normal(0, 3, (vms, t.size))
    series[:, :, 1] = np.maximum(cycle / 5 + rng.normal(0, 1, (vms, t.size)), 0)
    series[:, :, 2] = 1.0
    series[:, :, 3] = 2048.0
    return Panel([f"vm{i}" for i in range(vms)], first_slot, series, np.full(vms, 4096.0, np.float32), np.full(vms, 2.0, np.float32))


def _ts(text: str) -> float:
    return dt.datetime.strptime(text, "%Y-%m-%d %H:%M").replace(tzinfo=dt.timezone.utc).timestamp()


def test_days_are_parsed_inclusive_from_one() -> None:
    assert parse_days("1-15") == (1, 15)
    for bad in ("0-3", "5-2", "x"):
        with pytest.raises(ValueError):
            parse_days(bad)


def test_validation_folds_follow_each_other_at_the_end_of_the_training_range() -> None:
    plan = validation_plan(0, 1000, horizon_slots=24, window_slots=288)
    assert plan.start == 0 and plan.end == 1000 and plan.val_start == 600
    assert plan.fold_ranges() == [(600, 733), (733, 866), (866, 1000)]
    # a validation part shorter than three horizons gets fewer folds
    assert len(validation_plan(0, 1000, horizon_slots=200, window_slots=288).folds) == 2
    with pytest.raises(ValueError, match="too short"):
        validation_plan(0, 300, horizon_slots=24, window_slots=288)


def test_holdout_trains_and_validates_before_the_test_part() -> None:
    panel = daily_panel(3, 8)
    res = run_protocol(panel, SETTINGS, CFG, Protocol("holdout"))
    sp = res.summary["splits"]
    assert _ts(sp["train"][0]) < _ts(sp["validation"][0]) <= _ts(sp["validation"][1]) <= _ts(sp["test"][0])
    assert sp["refit"][1] == sp["validation"][1]
    assert res.summary["validation"]["rows"] > 0 and set(res.summary["mae"]) == {"1h", "6h", "24h"}


def test_days_protocol_tests_only_the_requested_days() -> None:
    panel = daily_panel(2, 10)
    res = run_protocol(panel, SETTINGS, CFG, Protocol("days", train_days=(1, 5), test_days=(7, 10)))
    sp = res.summary["splits"]
    start = panel.first_slot * SETTINGS.slot_s
    assert _ts(sp["train"][0]) == start and _ts(sp["validation"][1]) <= start + 5 * 86400
    assert _ts(sp["test"][0]) == start + 6 * 86400
    with pytest.raises(ValueError, match="after the training days"):
        run_protocol(panel, SETTINGS, CFG, Protocol("days", train_days=(1, 5), test_days=(5, 10)))


def test_rolling_origin_averages_folds_each_trained_before_its_test() -> None:
    panel = daily_panel(2, 10)
    res = run_protocol(panel, SETTINGS, CFG, Protocol("rolling", folds=2, fold_days=1.5))
    folds = res.summary["splits"]["folds"]
    assert len(folds) == 2 and len(res.summary["folds"]) == 2
    for f in folds:
        assert _ts(f["refit"][1]) <= _ts(f["test"][0])
    assert _ts(folds[0]["test"][1]) <= _ts(folds[1]["test"][1])
    mean_1h = np.mean([f["mae"]["1h"]["model"] for f in res.summary["folds"]])
    assert res.summary["mae"]["1h"]["model"] == pytest.approx(mean_1h)


def test_transfer_tests_other_vms_of_another_trace() -> None:
    train, test = daily_panel(2, 6, seed=1), daily_panel(2, 4, seed=2, first_slot=19_100 * DAY)
    res = run_protocol(train, SETTINGS, CFG, Protocol("transfer"), test_panel=test)
    sp = res.summary["splits"]
    assert sp["train_vms"] == 2 and _ts(sp["test"][0]) >= test.first_slot * SETTINGS.slot_s
    assert _ts(sp["refit"][1]) < _ts(sp["test"][0])


def test_validation_only_reads_nothing_after_the_training_range() -> None:
    panel = daily_panel(2, 8)
    start, end = train_range(panel, SETTINGS, CFG, Protocol("holdout"))
    poisoned = Panel(panel.vms, panel.first_slot, panel.series.copy(), panel.mem_total_mb, panel.vcpus)
    poisoned.series[:, end:] = 1e6  # the test part: any read of it would show in the figures
    a = validate_only(panel, SETTINGS, CFG, Protocol("holdout"))
    b = validate_only(poisoned, SETTINGS, CFG, Protocol("holdout"))
    assert a["mae"] == b["mae"] and a["blend"] == b["blend"] and a["se_rule"] == b["se_rule"]
    # the window regret of the candidate blends and of the boosters alone, on the validation folds alone
    windows = {window_label(name, wq) for wq in WINDOW_QUANTILES for name in CANDIDATES}
    assert set(a["regret_ms"]) == {*windows, "boosters alone"} and a["window_choice"] in windows
    assert a["regret_ms"] == b["regret_ms"] and all(r["origins"] > 0 for r in a["regret_ms"].values())
    from training.report import validation_table

    text = validation_table(a)
    assert "validation folds" in text and "| boosters alone |" in text and f"served: {a['window_choice']}" in text
    assert "| blend rule checked forward (MAE on each next fold) | 1 x SE | 0 x SE | taken |" in text


@pytest.mark.parametrize("better, served, window_quantile", [
    (None, "nearest naive, q90", 0.9),
    ("model shape for windows, q90", "model shape for windows, q90", 0.9),
    ("nearest naive, q50", "nearest naive, q50", 0.5),
])  # fmt: skip
def test_the_window_candidate_with_clearly_better_windows_on_the_folds_is_served(
    monkeypatch, better, served, window_quantile
) -> None:
    """Ties (and gains within noise) go to the blend nearest the naive forecasts, its windows on q90;
    the served model's window search reads the quantile of the candidate chosen."""
    import training.validated as validated
    from training.evaluate import fit_model

    panel = daily_panel(4, 8)
    plan = validation_plan(0, 6 * DAY, SETTINGS.horizon_slots, SETTINGS.window_slots)
    real = validated.fold_regret

    def fold_regret(panel, plan, models, blends, settings, progress=None):  # the real one, then one blend made better
        out = real(panel, plan, models, blends, settings)
        rng = np.random.default_rng(0)
        base = rng.uniform(1, 20, out.at.shape[0])
        rows = {name: base + rng.normal(0, 0.1, base.size) for name in blends}
        if better is not None:
            rows[better] -= 5.0
        return validated.FoldRegret(rows, out.at, out.summary)

    monkeypatch.setattr(validated, "fold_regret", fold_regret)
    blend, report = validated.choose_blend(panel, plan, SETTINGS, lambda slot: fit_model(panel, slot, SETTINGS, CFG))
    assert report["window_choice"] == served and report["blend"] == blend.as_dict()
    assert blend.window_quantile == report["window_quantile"] == window_quantile
