"""Bounded waits that stay bounded: for shutdown paths that talk to a broker or Redis that may be gone.

``asyncio.wait_for`` cancels on timeout and then *waits for the cancelled task
to finish*; a client stuck on a dead connection (or one that swallows the
cancellation) keeps it waiting, and the bound is lost. ``within`` gives up on
the task instead: it is cancelled and left behind.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
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
