"""The demo's live view reports the lag of the samples arriving now, not the all-time mean."""

from __future__ import annotations

from app.demo import LAG, recent_mean

SUM, COUNT = LAG


def test_after_a_day_long_backfill_the_view_shows_the_live_samples_lag() -> None:
    backfilled = {SUM: 288 * 43_200.0, COUNT: 288.0}  # a day of samples, half a day late on average
    live = {SUM: backfilled[SUM] + 10 * 1.5, COUNT: 298.0}  # then ten samples 1.5 s late
    assert recent_mean(backfilled, live) == 1.5  # the all-time mean: 41,750 s


def test_with_no_new_sample_between_scrapes_there_is_no_recent_lag() -> None:
    scrape = {SUM: 12.0, COUNT: 4.0}
    assert recent_mean(scrape, dict(scrape)) is None
    assert recent_mean({}, {}) is None
