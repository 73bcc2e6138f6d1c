"""ModelWatcher without Redis: periodic LATEST checks, swap only in maybe_reload, refusals counted."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from app.model_watch import ModelWatcher
from app.settings import Settings
from tests.model_support import tiny_model
from training.model import ForecastModel
from training.store import ModelStore


class Counter:
    def __init__(self) -> None:
        self.value = 0

    def inc(self) -> None:
        self.value += 1


class Metrics:
    def __init__(self) -> None:
        self.model_rejected = Counter()


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Settings, ModelStore, ForecastModel]:
    # Redis on a closed port: only the periodic check can find new versions
    settings = Settings.from_env({}, model_store=str(tmp_path), redis_url="redis://127.0.0.1:9/0", model_check_s=0.05)
    store = ModelStore(str(tmp_path))
    first = tiny_model(0)
    store.publish(first, now=1_790_000_000.0)
    return settings, store, first


async def test_new_version_is_swapped_only_between_batches(setup: tuple[Settings, ModelStore, ForecastModel]) -> None:
    settings, store, first = setup
    watcher = ModelWatcher(settings, store, first)
    assert watcher.maybe_reload() is None
    second = store.publish(tiny_model(1), now=1_790_000_060.0)
    await watcher.check()
    assert watcher.current() is first  # loaded, not yet in service
    new = watcher.maybe_reload()
    assert new is not None and new.version == second and watcher.current() is new
    assert watcher.maybe_reload() is None


async def test_background_task_finds_latest_periodically(setup: tuple[Settings, ModelStore, ForecastModel]) -> None:
    settings, store, first = setup
    watcher = ModelWatcher(settings, store, first)
    await watcher.start()
    try:
        second = store.publish(tiny_model(1), now=1_790_000_060.0)
        for _ in range(100):
            await asyncio.sleep(0.05)
            if (new := watcher.maybe_reload()) is not None:
                break
        assert new is not None and new.version == second
    finally:
        await watcher.stop()


async def test_tampered_model_is_refused_once_and_current_keeps_serving(
    setup: tuple[Settings, ModelStore, ForecastModel], tmp_path: Path
) -> None:
    settings, store, first = setup
    metrics, seen = Metrics(), []
    watcher = ModelWatcher(settings, store, first, metrics=metrics, on_rejected=lambda v, r: seen.append(v))
    bad = store.publish(tiny_model(2), now=1_790_000_120.0)
    f = tmp_path / bad / "dirty_mbps.band2.ubj"
    f.write_bytes(f.read_bytes()[:-1] + b"X")
    await watcher.check()
    await watcher.check()  # a refused version is not retried
    assert watcher.maybe_reload() is None and watcher.current() is first
    assert metrics.model_rejected.value == 1 and seen == [bad]
    assert "checksum" in watcher.rejected[bad]
