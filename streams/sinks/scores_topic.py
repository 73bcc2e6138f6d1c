"""``vm.scores`` records: (key, value) pairs ready for any Kafka producer.

Key = VM id (UTF-8) so a VM's scores stay ordered on one partition; value =
one JSON object with the contract's fields (``streams.scores.SCORE_FIELDS``).
The whole batch is encoded in one msgspec call (newline-delimited, then split:
JSON escapes newlines inside strings, so the split is exact). Non-finite
numbers (a migration that never converges) are encoded as JSON ``null``.
Transport (producer, retries, acks) is the worker's.
"""

from __future__ import annotations

import msgspec

from streams.scores import ScoreBatch

_ENCODER = msgspec.json.Encoder()


def score_records(batch: ScoreBatch) -> list[tuple[bytes, bytes]]:
    """One (key, value) per scored VM, in batch order."""
    if len(batch) == 0:
        return []
    values = _ENCODER.encode_lines(batch.records()).split(b"\n")[:-1]  # trailing newline -> empty tail
    keys = [vm.encode("utf-8") for vm in batch.vm]
    return list(zip(keys, values))
