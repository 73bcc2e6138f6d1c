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
