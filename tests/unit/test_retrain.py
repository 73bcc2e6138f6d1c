"""Retrain helpers that need no cluster: the interval parser and the gate's loss."""

from __future__ import annotations

import numpy as np
import pytest

from training.retrain import holdout_loss, parse_every


@pytest.mark.parametrize(("text", "seconds"), [("6h", 21600), ("30m", 1800), ("90s", 90), ("1d", 86400), ("45", 45)])
def test_intervals_read_like_the_cli_says(text, seconds):
    assert parse_every(text) == seconds


@pytest.mark.parametrize("bad", ["", "h", "-1h", "0", "six hours"])
def test_bad_intervals_are_refused(bad):
    with pytest.raises(ValueError):
        parse_every(bad)


class _Fixed:
    """A stand-in model predicting given quantiles (the gate only calls predict and reads quantiles)."""

    quantiles = (0.5, 0.9)

    def __init__(self, pred):
        self.pred = pred

    def predict(self, X):
        return self.pred


def test_the_gate_prefers_the_model_closer_to_the_truth():
    rng = np.random.default_rng(1)
    Y = rng.uniform(1, 50, size=(500, 3)).astype(np.float32)
    exact = np.stack([Y, Y * 1.2], axis=2)
    off = np.stack([Y + 5, Y * 1.2 + 5], axis=2)
    X = np.zeros((500, 1), np.float32)
    assert holdout_loss(_Fixed(exact), X, Y) < holdout_loss(_Fixed(off), X, Y)


def _held_out_rows(n_vms: int = 8):
    """Feature rows of real windows (so the naive forecasts can be read from them) and their labels."""
    from gpu_kernels.features import TARGETS, WINDOW_CHANNELS, build_features
    from training.model import default_horizons

    rng = np.random.default_rng(2)
    win = rng.uniform(5, 60, (n_vms, 288, len(WINDOW_CHANNELS))).astype(np.float32)
    h = default_horizons(288)
    X = build_features(win, {"mem_total_mb": np.full(n_vms, 4096.0), "vcpus": np.full(n_vms, 2.0)}, np.arange(n_vms) + 9000, h, 300)
    last = win[:, -1, : len(TARGETS)]
    Y = (np.repeat(last, h.size, axis=0) + rng.normal(0, 4, (n_vms * h.size, len(TARGETS)))).astype(np.float32)
    return X, Y


def test_the_gate_measures_like_live_accuracy_and_prefers_the_better_model():
    from training.retrain import gate_decision, holdout_accuracy

    X, Y = _held_out_rows()
    exact = _Fixed(np.stack([Y, Y * 1.2], axis=2))
    off = _Fixed(np.stack([Y + 50, Y * 1.2 + 50], axis=2))
    tally = holdout_accuracy({"challenger": exact, "champion": off}, X, Y)
    assert tally.methods == ("challenger", "champion", "last", "seasonal")
    mae = tally.mae()
    assert mae["cpu_pct"]["1h"]["challenger"] == 0.0 and mae["cpu_pct"]["6h"]["champion"] == pytest.approx(50.0)
    assert 2.5 < mae["cpu_pct"]["24h"]["last"] < 4.0  # persistence: the label noise
    assert tally.worse_than_naive("challenger") == []
    assert len(tally.worse_than_naive("champion")) == 9  # every target and bucket
    publish, reason, c, champ = gate_decision(tally, champion=True)
    assert publish and reason == "challenger not worse" and c == 0.0 and champ > 10
    flipped = holdout_accuracy({"challenger": off, "champion": exact}, X, Y)
    assert gate_decision(flipped, champion=True)[:2] == (False, "champion kept (challenger worse)")
    alone = holdout_accuracy({"challenger": off}, X, Y)
    assert gate_decision(alone, champion=False)[:2] == (True, "store empty")


def test_the_held_out_day_reaches_back_across_a_gap_to_a_day_of_samples():
    """A backfill, a day with no worker, then live data: the gate gets a day of samples, not a day of gap."""
    from training.dataset import CHANNELS, Panel
    from training.retrain import held_out_observed, holdout_cut

    series = np.full((3, 400, len(CHANNELS)), np.nan, np.float32)
    series[:, :112] = 1.0  # three VMs backfilled
    series[0, 300:] = 2.0  # then live data after a gap of 188 slots: one VM every slot ...
    series[1, 300::2] = 2.0  # ... one every second slot, the third gone
    panel = Panel(["a", "b", "c"], 0, series, np.ones(3, np.float32), np.ones(3, np.float32))
    cut = holdout_cut(panel, 150)
    assert cut == 62  # the 100 live slots and the newest 50 backfilled ones
    share, gap = held_out_observed(panel, cut)
    assert gap == 188 and share == pytest.approx((3 * 50 + 100 + 50) / (3 * 150))
    assert holdout_cut(panel, 100) == 300  # no gap in the newest 100 slots: the plain last 100
    assert holdout_cut(panel, 250) == 150  # fewer slots with a sample than asked: the plain last 250


def test_the_held_out_day_reports_how_much_of_it_holds_samples():
    """A last day in which most VMs report now and then is reported, not silently gated on."""
    from training.dataset import CHANNELS, Panel
    from training.retrain import held_out_observed

    series = np.full((3, 400, len(CHANNELS)), np.nan, np.float32)
    series[:, :400:4] = 1.0  # three VMs, every 4th slot
    series[0, 112:] = 2.0  # one of them every slot in the held-out part (from slot 112)
    panel = Panel(["a", "b", "c"], 0, series, np.ones(3, np.float32), np.ones(3, np.float32))
    assert held_out_observed(panel, 112) == (pytest.approx((288 + 2 * 72) / (3 * 288)), 0)
    series[:, 112:] = np.nan
    assert np.isnan(held_out_observed(panel, 112)[0])
