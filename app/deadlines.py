"""Waits around services that may be gone: bounded ones for shutdown, patient ones for start-up.

``asyncio.wait_for`` cancels on timeout and then *waits for the cancelled task
to finish*; a client stuck on a dead connection (or one that swallows the
cancellation) keeps it waiting, and the bound is lost. ``within`` gives up on
the task instead: it is cancelled and left behind. ``until_done`` is the
start-up side: a client that cannot connect yet is tried again, with a log line
now and then, instead of crashing the worker (start order must not matter).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)


async def within(aw: Awaitable[Any], seconds: float, what: str) -> bool:
    """Await ``aw`` for at most ``seconds``; True when it finished without error, False otherwise (logged)."""
    task = asyncio.ensure_future(aw)
    done, _ = await asyncio.wait({task}, timeout=max(0.0, seconds))
    if not done:
        task.cancel()
        log.warning("%s did not finish within %.1f s; left behind", what, seconds)
        return False
    if task.cancelled():
        return False
    exc = task.exception()
    if exc is not None:
        log.warning("%s failed: %s: %s", what, type(exc).__name__, exc)
        return False
    return True


async def until_done(attempt: Callable[[], Awaitable[Any]], what: str, *, log_every_s: float = 10.0) -> Any:
    """Call ``attempt`` until it succeeds (1 s apart), logging the failure at most every ``log_every_s``."""
    loop = asyncio.get_running_loop()
    last_log = -log_every_s
    while True:
        try:
            return await attempt()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if loop.time() - last_log >= log_every_s:
                log.warning("waiting for %s (%s: %s)", what, type(exc).__name__, exc)
                last_log = loop.time()
            await asyncio.sleep(1.0)
