"""A Kafka broker and a Redis of the fault suite's own, so tests can stop, kill and restart them.

Started once per session by the same code as ``zhuge services up`` (on free
loopback ports, state in a temp dir), never shared with tests/integration: a
test that takes the broker away must not break anyone else's. Each test leaves
both services running when it ends (``FaultStack.ensure_up`` in a finalizer).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from app.settings import Settings
from tests.faults.support import FaultStack
from tests.integration.conftest import IN_CI, unique_topic_settings


@pytest.fixture(scope="session")
def fault_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultStack]:
    stack = FaultStack.create(tmp_path_factory.mktemp("zhuge-faults"))
    missing = stack.missing_tools()
    if missing:
        reason = "fault suite services unavailable: " + "; ".join(missing)
        if IN_CI:
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    stack.up()
    try:
        yield stack
    finally:
        stack.down()


@pytest.fixture
def fault_settings(fault_stack: FaultStack, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Settings]:
    """The fault stack's settings with this test's own topics, group, Redis prefix and snapshot dir."""
    settings = unique_topic_settings(fault_stack.settings, request.node.name)
    settings = settings.replace(
        redis_prefix=f"f{settings.consumer_group[-8:]}:",
        snapshot_dir=str(tmp_path / "snapshots"),
        history_url=str(tmp_path / "history"),
    )
    try:
        yield settings
    finally:
        fault_stack.ensure_up()
