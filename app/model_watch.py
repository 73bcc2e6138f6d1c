"""Hot reload of the forecast model, without stopping the stream.

A retrainer publishes to the model store, then announces it on the Redis pub/sub
channel ``<prefix>models`` (``notify_new_version``). Each worker runs a
``ModelWatcher``: a background asyncio task listens on that channel and also checks
the store's ``LATEST`` every ``model_check_s`` (pub/sub messages are fire-and-forget,
so the periodic check is what guarantees convergence). ``LATEST`` is the truth: a
message only triggers an early check. Loading and verification happen off the event
loop; the swap happens only in ``maybe_reload()``, which the worker calls between
batches, so a batch is never scored by two models. A rejected artifact (corrupt,
tampered, incompatible) is logged and counted once, and the current model keeps serving.
A refused version is looked at again only when its files change (``store.fingerprint``):
files still being copied when it was first seen must not keep it out forever, and an
unchanged broken one must not be reloaded every check.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any

from streams.redis_keys import RedisKeys, is_cluster_client
from training.model import ForecastModel, ModelRejected

log = logging.getLogger(__name__)

RejectCallback = Callable[[str, str], None]


def models_channel(settings: Any) -> str:
    """``<prefix>models``; on a Redis Cluster, PUBLISH reaches the subscribers of every node."""
    return RedisKeys(settings.redis_prefix).models_channel


def notify_new_version(settings: Any, version: str) -> int:
    """Announce a published version to the workers (synchronous); returns how many listened."""
    client = settings.redis_client(asyncio=False)
    try:
        return int(client.publish(models_channel(settings), version))
    finally:
        client.close()


async def anotify_new_version(settings: Any, version: str) -> int:
    """``notify_new_version`` for asyncio callers."""
    client = settings.redis_client()
    try:
        return int(await client.publish(models_channel(settings), version))
    finally:
        await client.aclose()


class ModelWatcher:
    """Keeps the model in service current with the store; see the module docstring."""

    def __init__(
        self,
        settings: Any,
        store: Any,
        current_model: ForecastModel,
        metrics: Any = None,
        on_rejected: RejectCallback | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self._current = current_model
        self._pending: ForecastModel | None = None
        self._rejected: dict[str, tuple[str | None, str]] = {}  # version -> (fingerprint when refused, reason)
        self._lock = threading.Lock()
        self._metrics = metrics
        self._on_rejected = on_rejected
        self._wake: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []

    # --- called by the worker ---------------------------------------------------
    def current(self) -> ForecastModel:
        """The model in service."""
        return self._current

    def maybe_reload(self) -> ForecastModel | None:
        """Swap in a verified newer model if one is ready (never blocks); returns it, else None."""
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is None or pending.version == self._current.version:
            return None
        old, self._current = self._current, pending
        log.info("model %s replaces %s", pending.version, old.version)
        return pending

    @property
    def rejected(self) -> dict[str, str]:
        """Versions refused (and not loaded since) -> reason."""
        return {version: reason for version, (_, reason) in self._rejected.items()}

    # --- background ------------------------------------------------------------
    async def start(self) -> None:
        """Start listening on pub/sub and checking ``LATEST`` periodically."""
        if self._tasks:
            return
        self._wake = asyncio.Event()
        self._tasks = [
            asyncio.create_task(self._poll_loop(), name="model-watch-poll"),
            asyncio.create_task(self._listen_loop(), name="model-watch-pubsub"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []

    async def check(self) -> None:
        """One look at ``LATEST``; a new version, or a refused one whose files changed, is loaded off-loop."""
        try:
            version = await asyncio.to_thread(self.store.latest_version)
        except Exception as exc:  # store unreachable: keep serving, try again later
            log.warning("model store %s unreadable: %s", getattr(self.store, "url", self.store), exc)
            return
        if version is None or version == self._current.version or self._is_pending(version):
            return
        # taken before loading: any change after it, even mid-load, earns a refused version another look
        fingerprint = await self._fingerprint(version)
        refused = self._rejected.get(version)
        if refused is not None:
            if fingerprint is None or fingerprint == refused[0]:
                return
            log.info("refused model %s changed in the store; checking it again", version)
        try:
            model = await asyncio.to_thread(self.store.load, version, slot_s=self.settings.slot_s)
        except ModelRejected as exc:
            self._reject(version, fingerprint, exc.reason)
            return
        except Exception as exc:  # transient (I/O, half-visible object store): retried next check
            log.warning("model %s could not be loaded yet: %s", version, exc)
            return
        self._rejected.pop(version, None)
        model.use_threads(self.settings.predict_threads)
        with self._lock:
            self._pending = model
        log.info("model %s verified, swapping in at the next batch boundary", version)

    def _is_pending(self, version: str) -> bool:
        with self._lock:
            return self._pending is not None and self._pending.version == version

    async def _fingerprint(self, version: str) -> str | None:
        """The version's file listing digest; None when it cannot be listed (loading needs reads only)."""
        try:
            return await asyncio.to_thread(self.store.fingerprint, version)
        except Exception as exc:
            log.warning("model %s: cannot list its files (%s); a refused version stays refused", version, exc)
            return None

    def _reject(self, version: str, fingerprint: str | None, reason: str) -> None:
        """Log every refusal; count and report a version only the first time it is refused."""
        first = version not in self._rejected
        self._rejected[version] = (fingerprint, reason)
        log.error("model %s REFUSED, keeping %s in service: %s", version, self._current.version, reason)
        if not first:
            return
        counter = getattr(self._metrics, "model_rejected", None)
        if counter is not None:
            counter.inc()
        if self._on_rejected is not None:
            self._on_rejected(version, reason)

    async def _poll_loop(self) -> None:
        assert self._wake is not None
        while True:
            await self.check()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.settings.model_check_s)
            self._wake.clear()

    async def _listen_loop(self) -> None:
        """Pub/sub messages wake the poll loop early; Redis trouble only delays, never stops, reloads."""
        assert self._wake is not None
        backoff = 1.0
        channel = models_channel(self.settings)
        while True:
            client = self.settings.redis_client()
            pubsub = None
            try:
                if is_cluster_client(client):
                    await client.initialize()  # a cluster pub/sub picks its node from the slot map: load it first
                pubsub = client.pubsub()
                await pubsub.subscribe(channel)
                backoff = 1.0
                while True:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5.0)
                    if msg is not None and msg.get("type") == "message":
                        log.info("model store announced %r", _text(msg.get("data")))
                        self._wake.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("model pub/sub on %s unavailable (%s); relying on periodic checks", channel, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 60.0)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        await pubsub.aclose()
                with contextlib.suppress(Exception):
                    await client.aclose()


def _text(data: Any) -> str:
    return data.decode("utf-8", "replace") if isinstance(data, bytes | bytearray) else str(data)
