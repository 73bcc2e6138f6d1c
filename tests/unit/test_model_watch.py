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


class CountingStore(ModelStore):
    """The real store, counting loads."""

    loads = 0

    def load(self, *args: object, **kwargs: object) -> ForecastModel:  # type: ignore[override]
        self.loads += 1
        return super().load(*args, **kwargs)  # type: ignore[arg-type]


async def test_a_refused_version_is_retried_once_its_files_change(
    setup: tuple[Settings, ModelStore, ForecastModel], tmp_path: Path
) -> None:
    """Seen while still being copied: refused and counted once, picked up when the copy completes."""
    settings, _, first = setup
    store = CountingStore(str(tmp_path))
    metrics, seen = Metrics(), []
    watcher = ModelWatcher(settings, store, first, metrics=metrics, on_rejected=lambda v, r: seen.append(v))
    late = store.publish(tiny_model(3), now=1_790_000_180.0)
    f = tmp_path / late / "net_mbps.band0.ubj"
    good = f.read_bytes()
    f.write_bytes(good[: len(good) // 2])  # half copied
    await watcher.check()
    assert "checksum" in watcher.rejected[late] and store.loads == 1

    await watcher.check()  # same files: neither loaded again nor counted again
    assert store.loads == 1 and metrics.model_rejected.value == 1 and seen == [late]

    f.write_bytes(good + b"X")  # changed but still wrong: looked at again, still refused, not re-counted
    await watcher.check()
    assert store.loads == 2 and metrics.model_rejected.value == 1 and late in watcher.rejected

    f.write_bytes(good)  # the copy completed
    await watcher.check()
    new = watcher.maybe_reload()
    assert new is not None and new.version == late and watcher.current() is new
    assert late not in watcher.rejected and metrics.model_rejected.value == 1 and seen == [late]


async def test_a_store_that_cannot_list_still_serves_new_versions(
    setup: tuple[Settings, ModelStore, ForecastModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loading needs reads only: a listing error must not stop a good version (read-only object-store roles)."""
    settings, store, first = setup

    def denied(_: str) -> str:
        raise PermissionError("s3:ListBucket denied")

    monkeypatch.setattr(store, "fingerprint", denied)
    watcher = ModelWatcher(settings, store, first)
    second = store.publish(tiny_model(1), now=1_790_000_060.0)
    await watcher.check()
    new = watcher.maybe_reload()
    assert new is not None and new.version == second


async def test_a_swapped_in_model_predicts_with_the_configured_threads(tmp_path: Path) -> None:
    import json

    settings = Settings.from_env({"ZHUGE_PREDICT_THREADS": "1"}, model_store=str(tmp_path), redis_url="redis://127.0.0.1:9/0")
    store = ModelStore(str(tmp_path))
    store.publish(tiny_model(0), now=1_790_000_000.0)
    watcher = ModelWatcher(settings, store, tiny_model(0))
    store.publish(tiny_model(1), now=1_790_000_060.0)
    await watcher.check()
    new = watcher.maybe_reload()
    assert new is not None
    nthreads = {json.loads(b.save_config())["learner"]["generic_param"]["nthread"] for bs in new.boosters.values() for b in bs}
    assert nthreads == {"1"}


def test_predict_threads_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="predict_threads"):
        Settings.from_env({"ZHUGE_PREDICT_THREADS": "-1"})
