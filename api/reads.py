"""Reads of what the workers wrote to Redis, shaped for the HTTP API (``streams.sinks.redis_sink`` layout)."""

from __future__ import annotations

import math
import sys
from typing import Any

from streams.curve import Curve, decode_curve
from streams.redis_keys import RedisKeys
from streams.sinks.redis_sink import read_vm_with_curve, reply_text, top

# the VM score object of the API (the hash's fields, in this order)
SCORE_FIELDS = (
    "vm", "host", "now_downtime_ms", "now_p_ok", "now_total_s", "downtime_factor", "best_start", "best_end",
    "best_downtime_ms", "p_ok", "window_rule", "min_start", "min_end", "min_downtime_ms", "min_p_ok", "model",
    "last_ts", "updated",
)  # fmt: skip


def score_object(row: dict[str, Any]) -> dict[str, Any]:
    """A decoded score hash as the API's VM score object: contract fields only, non-finite numbers as null."""
    out: dict[str, Any] = {}
    for name in SCORE_FIELDS:
        value = row.get(name)
        out[name] = None if isinstance(value, float) and not math.isfinite(value) else value
    return out


class ScoreReads:
    """The API's view of Redis: one client, one key prefix (key names of the client's layout, ``RedisKeys``)."""

    def __init__(self, client: Any, prefix: str) -> None:
        self.client = client
        self.prefix = prefix
        self.keys = RedisKeys.for_client(client, prefix)

    async def ping(self) -> bool:
        return bool(await self.client.ping())

    async def vm_with_curve(self, vm: str) -> tuple[dict[str, Any] | None, Curve | None]:
        """Score and curve in one round trip (a VM scored by a worker without curves has none)."""
        row, blob = await read_vm_with_curve(self.client, self.prefix, vm)
        if row is None:
            return None, None
        return score_object(row), decode_curve(blob) if blob else None

    async def candidates(self, n: int, host: str | None = None) -> list[dict[str, Any]]:
        """The ``n`` best VMs to migrate now (lowest predicted downtime), optionally on one host."""
        return [score_object(r) for r in await top(self.client, self.prefix, n, host)]

    async def host_scores(self, host: str) -> list[dict[str, Any]]:
        """Every VM of the host with its score, best (lowest downtime now) first (one SMEMBERS, one ZMSCORE)."""
        return [score_object(r) for r in await top(self.client, self.prefix, sys.maxsize, host)]

    async def host_curves(self, host: str) -> tuple[list[dict[str, Any]], dict[str, Curve]]:
        """The host's score objects and the curves of those that have one."""
        rows = await self.host_scores(host)
        if not rows:
            return [], {}
        names = [self.keys.curve(r["vm"]) for r in rows]
        # a cluster's MGET takes one slot only: mget_nonatomic groups the keys by node
        blobs = await (self.client.mget_nonatomic(names) if self.keys.cluster else self.client.mget(names))
        return rows, {r["vm"]: decode_curve(b) for r, b in zip(rows, blobs) if b}

    async def hosts(self) -> list[dict[str, Any]]:
        """Every host with scored VMs and how many (``<prefix>hosts``; an expired host set reads 0 and is left out)."""
        names = sorted(reply_text(h) for h in await self.client.smembers(self.keys.hosts))
        if not names:
            return []
        pipe = self.client.pipeline(transaction=False)
        for host in names:
            pipe.scard(self.keys.host(host))
        sizes = await pipe.execute()
        return [{"host": h, "vms": int(n)} for h, n in zip(names, sizes) if n]

    async def fleet(self, target_ms: float) -> dict[str, Any]:
        """How many VMs fit the target now, only at their recommended window, not at all (two ZCOUNTs).

        One MULTI so the counts add up to ``vms`` even while workers write (on a cluster too:
        the ranks and the host list share the ``{fleet}`` slot).
        """
        pipe = self.client.pipeline(transaction=True)
        pipe.zcard(self.keys.rank_now)
        pipe.zcount(self.keys.rank_now, "-inf", target_ms)
        pipe.zcount(self.keys.rank_best, "-inf", target_ms)
        pipe.scard(self.keys.hosts)
        total, now_ok, best_ok, hosts = (int(v) for v in await pipe.execute())
        return {
            "vms": total,
            "hosts": hosts,
            "target_ms": target_ms,
            "now_within_target": now_ok,
            "window_within_target": max(best_ok - now_ok, 0),
            "not_at_all": max(total - max(best_ok, now_ok), 0),
        }

    async def stored_plan(self, host: str) -> dict[str, Any] | None:
        import msgspec

        raw = await self.client.get(self.keys.drain(host))
        return None if raw is None else msgspec.json.decode(raw)

    async def store_plan(self, plan: dict[str, Any], ttl_s: int) -> None:
        import msgspec

        await self.client.set(self.keys.drain(plan["host"]), msgspec.json.encode(plan), ex=ttl_s)
