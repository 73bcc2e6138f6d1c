"""Hot reload through a real Redis pub/sub: a published model reaches the worker without waiting
for the periodic check, and a tampered one is refused while the current model keeps serving."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from app.model_watch import ModelWatcher, notify_new_version
from app.settings import Settings
from tests.model_support import tiny_model
from training.store import ModelStore

pytestmark = pytest.mark.integration


class Counter:
    value = 0

    def inc(self) -> None:
        self.value += 1


class Metrics:
    def __init__(self) -> None:
        self.model_rejected = Counter()


async def _until(predicate, timeout: float = 10.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (result := predicate()):
            return result
        await asyncio.sleep(0.05)
    return None


async def test_pubsub_announcement_triggers_reload_and_refusal(services: Settings, tmp_path: Path) -> None:
    # periodic checks far apart: only the pub/sub message can explain a quick reload
    settings = services.replace(model_store=str(tmp_path / "models"), model_check_s=600.0, redis_prefix="zhuge-reload-test:")
    store = ModelStore(settings.model_store)
    first = tiny_model(0)
    store.publish(first)
    metrics = Metrics()
    watcher = ModelWatcher(settings, store, first, metrics=metrics)
    await watcher.start()
    try:
        listening = await _until(lambda: notify_new_version(settings, first.version) >= 1)
        assert listening, "the watcher never subscribed to the models channel"

        second = store.publish(tiny_model(1), now=time.time() + 1)
        assert notify_new_version(settings, second) >= 1
        new = await _until(watcher.maybe_reload)
        assert new is not None and new.version == second and watcher.current() is new

        bad = store.publish(tiny_model(2), now=time.time() + 2)
        f = Path(settings.model_store) / bad / "cpu_pct.band0.ubj"
        f.write_bytes(b"\0" + f.read_bytes()[1:])
        notify_new_version(settings, bad)
        assert await _until(lambda: metrics.model_rejected.value == 1)
        assert watcher.maybe_reload() is None and watcher.current().version == second
    finally:
        await watcher.stop()
