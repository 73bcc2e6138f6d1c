"""The simulator's and replay's sender: an outage holds it back, it loses nothing and does not crash."""

from __future__ import annotations

import asyncio
import logging

from aiokafka.errors import KafkaTimeoutError, NodeNotReadyError

from sim.produce import Sender


class FlakyProducer:
    """aiokafka-like: ``send`` raises for the first ``refuse`` calls (buffer full, no metadata), then
    returns futures of which the first ``fail`` fail (the broker away), then acknowledges."""

    def __init__(self, refuse: int = 0, fail: int = 0) -> None:
        self.refuse, self.fail = refuse, fail
        self.acked: list[bytes] = []

    async def send(self, topic, value, key=None, headers=None):  # noqa: ANN001
        if self.refuse > 0:
            self.refuse -= 1
            raise KafkaTimeoutError()
        fut = asyncio.get_running_loop().create_future()
        if self.fail > 0:
            self.fail -= 1
            fut.set_exception(NodeNotReadyError("broker away"))
        else:
            self.acked.append(value)
            fut.set_result(None)
        return fut


def test_records_that_failed_while_the_broker_was_away_are_sent_again_until_acknowledged(caplog) -> None:
    records = [(f"vm{i}".encode(), f"{{\"i\": {i}}}".encode()) for i in range(50)]
    producer = FlakyProducer(refuse=3, fail=20)

    async def main() -> None:
        sender = Sender(producer, "metrics", max_pending=16)
        await sender.send(records)
        await sender.flush()

    with caplog.at_level(logging.WARNING):
        asyncio.run(main())
    assert sorted(producer.acked) == sorted(v for _, v in records)  # each one, once
    assert "sending them again" in caplog.text
