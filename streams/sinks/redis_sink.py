"""Redis sink: per-VM score hash, ranked sets and host sets, newer-wins.

Layout (DESIGN.md contract, prefix default ``zhuge:``):

- ``<prefix>vm:<vm>`` hash: best_start, best_end, best_downtime_ms, p_ok
  (the recommended window), window_rule, min_start, min_end, min_downtime_ms,
  min_p_ok (the strict minimum), now_downtime_ms, now_p_ok, now_total_s,
  downtime_factor, model, last_ts, updated, host (``streams.scores`` says what each means)
- ``<prefix>rank:now`` sorted set: vm -> predicted downtime if migrated now (ms)
- ``<prefix>rank:window`` sorted set: vm -> best_start (the recommended window)
- ``<prefix>rank:best`` sorted set: vm -> best_downtime_ms (the recommended window's pause;
  ``zhuge api``'s fleet counts are two ZCOUNTs)
- ``<prefix>curve:<vm>`` string: the VM's downtime per future slot and forecast
  (``streams.curve``), written with its score, same TTL
- ``<prefix>host:<host>`` set of vm ids (a VM that moves is removed from the old set)
- ``<prefix>hosts`` set of host names (``prune`` drops those whose set is gone)

Redis holds the VMs that are alive: every write refreshes a TTL
(``redis_ttl_s``) on the VM's hash and its host set; a worker that evicts a VM
(nothing arrived for ``vm_ttl_s``) removes it from the ranks, its host set and
deletes its hash (``forget``, newer-wins too: a VM another worker scored since
is left alone); ``prune`` sweeps rank and host-set members whose hash expired
(a VM whose worker died before it could forget it).

Why a Lua script: two workers (or a replay behind a live stream) can race on
the same VM; the check "stored last_ts <= new last_ts" and the writes must be
one atomic step server-side, and one EVALSHA per chunk of VMs (all fields
flattened into one JSON argument) keeps round trips to a handful per batch.

Keys are built inside the script from the prefix (names in ``streams.redis_keys``),
so this targets a single Redis (or a managed one without cluster mode). With a
``RedisCluster`` client, ``RedisSink(settings, client)`` is the cluster sink
(``streams.sinks.redis_cluster``): hash-tagged keys, scripts with declared KEYS,
two atomic steps per write.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import msgspec
import numpy as np

from app.settings import Settings
from streams.redis_keys import RedisKeys, is_cluster_client
from streams.scores import ScoreBatch

CHUNK_VMS = 1000  # VMs per EVALSHA: one ~150 KB JSON argument, a ~10 ms script (short Redis stalls)
CHUNKS_PER_PIPELINE = 5  # pipeline of up to 5k VMs per round trip

# ARGV: prefix, model, updated, then ONE JSON array of strings holding, per VM,
# the _PACKED fields in that order (the script's step is PER_VM; its a[i + j] offsets follow the order),
# the TTL, then optionally one binary curve per VM of the chunk (ARGV[6 ..], in VM order).
# One packed argument instead of 8 per VM cut a 10k-VM write from ~0.6 s to
# ~0.15 s (client-side argument encoding dominated); numbers travel as strings
# so Lua never rounds them (its tostring keeps only 14 digits).
_PACKED = (
    "vm", "host", "last_ts", "best_start", "best_end", "best_downtime_ms", "now_downtime_ms", "p_ok",
    "window_rule", "min_start", "min_end", "min_downtime_ms", "min_p_ok", "now_p_ok", "now_total_s", "downtime_factor",
)  # fmt: skip
PER_VM = len(_PACKED)
_ROUNDED_3 = (  # times (s), downtimes (ms), durations (s): 3 decimals, NaN as inf
    "best_start", "best_end", "best_downtime_ms", "now_downtime_ms", "min_start", "min_end", "min_downtime_ms", "now_total_s",
)  # fmt: skip
_ROUNDED_4 = ("p_ok", "min_p_ok", "now_p_ok", "downtime_factor")  # probabilities and the factor: 4 decimals, NaN kept
_WRITE_LUA = f"local step = {PER_VM}\n" + """
local prefix, model, updated = ARGV[1], ARGV[2], ARGV[3]
local a = cjson.decode(ARGV[4])
local ttl = tonumber(ARGV[5])
local rank_now, rank_window, rank_best = prefix .. 'rank:now', prefix .. 'rank:window', prefix .. 'rank:best'
local with_curves = #ARGV > 5
local written, skipped = 0, 0
for i = 1, #a, step do
  local vm, host, last_ts = a[i], a[i + 1], a[i + 2]
  local key = prefix .. 'vm:' .. vm
  local old = redis.call('HMGET', key, 'last_ts', 'host')
  local old_ts = tonumber(old[1])
  if old_ts and old_ts > tonumber(last_ts) then
    skipped = skipped + 1
  else
    redis.call('HSET', key,
      'best_start', a[i + 3], 'best_end', a[i + 4],
      'best_downtime_ms', a[i + 5], 'now_downtime_ms', a[i + 6],
      'p_ok', a[i + 7], 'window_rule', a[i + 8],
      'min_start', a[i + 9], 'min_end', a[i + 10],
      'min_downtime_ms', a[i + 11], 'min_p_ok', a[i + 12],
      'now_p_ok', a[i + 13], 'now_total_s', a[i + 14], 'downtime_factor', a[i + 15],
      'model', model, 'last_ts', last_ts, 'updated', updated, 'host', host)
    redis.call('EXPIRE', key, ttl)
    redis.call('ZADD', rank_now, a[i + 6], vm)
    redis.call('ZADD', rank_window, a[i + 3], vm)
    redis.call('ZADD', rank_best, a[i + 5], vm)
    if with_curves then
      redis.call('SET', prefix .. 'curve:' .. vm, ARGV[6 + (i - 1) / step], 'EX', ttl)
    end
    local old_host = old[2]
    if old_host and old_host ~= host then
      redis.call('SREM', prefix .. 'host:' .. old_host, vm)
    end
    if host ~= '' then
      redis.call('SADD', prefix .. 'host:' .. host, vm)
      redis.call('EXPIRE', prefix .. 'host:' .. host, ttl)
      redis.call('SADD', prefix .. 'hosts', host)
      redis.call('EXPIRE', prefix .. 'hosts', ttl)
    end
    written = written + 1
  end
end
return {written, skipped}
"""

# ARGV: prefix, then ONE JSON array of strings: vm, last_ts (newest sample the evicting worker had).
# A VM whose stored score came from a newer sample belongs to someone else now: left alone.
_FORGET_LUA = """
local prefix = ARGV[1]
local a = cjson.decode(ARGV[2])
local forgotten = 0
for i = 1, #a, 2 do
  local vm, last_ts = a[i], tonumber(a[i + 1])
  local key = prefix .. 'vm:' .. vm
  local old = redis.call('HMGET', key, 'last_ts', 'host')
  local old_ts = tonumber(old[1])
  if not old_ts or old_ts <= last_ts then
    redis.call('ZREM', prefix .. 'rank:now', vm)
    redis.call('ZREM', prefix .. 'rank:window', vm)
    redis.call('ZREM', prefix .. 'rank:best', vm)
    redis.call('DEL', prefix .. 'curve:' .. vm)
    if old[2] and old[2] ~= '' then
      redis.call('SREM', prefix .. 'host:' .. old[2], vm)
    end
    redis.call('DEL', key)
    forgotten = forgotten + 1
  end
end
return forgotten
"""

# KEYS[1]: a rank (sorted set) or a host set; ARGV: prefix, 'z' or 's', members. Members whose hash
# is gone (expired or deleted) are removed.
_PRUNE_LUA = """
local prefix, kind = ARGV[1], ARGV[2]
local removed = 0
for i = 3, #ARGV do
  if redis.call('EXISTS', prefix .. 'vm:' .. ARGV[i]) == 0 then
    if kind == 'z' then redis.call('ZREM', KEYS[1], ARGV[i]) else redis.call('SREM', KEYS[1], ARGV[i]) end
    removed = removed + 1
  end
end
return removed
"""

_NUMERIC = (
    "best_start", "best_end", "best_downtime_ms", "p_ok", "min_start", "min_end", "min_downtime_ms", "min_p_ok",
    "now_downtime_ms", "now_p_ok", "now_total_s", "downtime_factor", "last_ts", "updated",
)  # fmt: skip


class WriteResult(NamedTuple):
    written: int
    skipped: int  # stale: the stored score came from a newer sample


def _nan_to_inf(a: np.ndarray, decimals: int) -> np.ndarray:
    """Rounded floats; NaN (unknown) becomes +inf so it ranks last and ZADD accepts it."""
    a = np.round(np.asarray(a, dtype=np.float64), decimals)
    return np.where(np.isnan(a), np.inf, a)


def _strings(a: np.ndarray) -> list[str]:
    """Shortest round-trip text of each float ('inf' for infinity, which ZADD accepts)."""
    return list(map(repr, a.tolist()))


_ENCODE = msgspec.json.Encoder().encode


def reply_text(value: Any) -> str:
    """A Redis reply (bytes, the clients here do not decode) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisSink:
    """Writes ``ScoreBatch`` rows to Redis atomically per VM, never letting an older sample win.

    Given a ``RedisCluster`` client, the instance is a ``ClusterRedisSink`` (same methods, cluster layout).
    """

    def __new__(cls, settings: Settings, client: Any, **kwargs: Any) -> RedisSink:
        if cls is RedisSink and is_cluster_client(client):
            from streams.sinks.redis_cluster import ClusterRedisSink

            return super().__new__(ClusterRedisSink)
        return super().__new__(cls)

    def __init__(self, settings: Settings, client: Any, *, chunk_vms: int = CHUNK_VMS) -> None:
        if chunk_vms < 1:
            raise ValueError("chunk_vms must be >= 1")
        self.prefix = settings.redis_prefix
        self.keys = RedisKeys.for_client(client, self.prefix)
        self.client = client
        self.chunk_vms = chunk_vms
        self.ttl_s = int(settings.redis_ttl_s)
        self._prepare_scripts()

    def _prepare_scripts(self) -> None:
        """The Lua this layout runs (single node: prefix-built keys, registered on the client)."""
        self._script = self.client.register_script(_WRITE_LUA)
        self._forget = self.client.register_script(_FORGET_LUA)
        self._prune = self.client.register_script(_PRUNE_LUA)

    def _argv(self, batch: ScoreBatch, lo: int, hi: int, cols: dict[str, list[Any]]) -> list[Any]:
        flat: list[Any] = [None] * (PER_VM * (hi - lo))
        for j, name in enumerate(_PACKED):
            flat[j::PER_VM] = cols[name][lo:hi]  # interleave columns without a per-VM Python loop
        argv = [self.prefix, batch.model, repr(float(batch.updated)), _ENCODE(flat), str(self.ttl_s)]
        return argv + batch.curves[lo:hi] if batch.curves is not None else argv

    async def write(self, batch: ScoreBatch) -> int:
        """Write the batch; returns how many VMs were written (stale ones skipped)."""
        return (await self.write_counts(batch)).written

    async def write_counts(self, batch: ScoreBatch) -> WriteResult:
        """Write the batch; returns written and stale-skipped counts. Redis errors propagate."""
        n = len(batch)
        if n == 0:
            return WriteResult(0, 0)
        cols = self._columns(batch)
        written = skipped = 0
        step = self.chunk_vms * CHUNKS_PER_PIPELINE
        for start in range(0, n, step):
            async with self.client.pipeline(transaction=False) as pipe:  # closed also when Redis is down
                for lo in range(start, min(start + step, n), self.chunk_vms):
                    hi = min(lo + self.chunk_vms, n)
                    await self._script(keys=[], args=self._argv(batch, lo, hi, cols), client=pipe)
                results = await pipe.execute()
            for w, s in results:
                written += int(w)
                skipped += int(s)
        return WriteResult(written, skipped)

    @staticmethod
    def _columns(batch: ScoreBatch) -> dict[str, list[str]]:
        """The batch's columns as the strings Redis stores (checked: one host per VM, a curve each if any)."""
        n = len(batch)
        if len(batch.host) != n or (batch.curves is not None and len(batch.curves) != n):
            raise ValueError(f"ScoreBatch has {n} VMs but {len(batch.host)} hosts and "
                             f"{'no' if batch.curves is None else len(batch.curves)} curves")  # fmt: skip
        cols: dict[str, list[str]] = {
            "vm": batch.vm,
            "host": batch.host,
            "last_ts": _strings(np.asarray(batch.last_ts, dtype=np.float64)),
            "window_rule": np.asarray(batch.window_rule, dtype=str).tolist(),
        }
        for name in _ROUNDED_4:
            cols[name] = _strings(np.round(np.asarray(getattr(batch, name), dtype=np.float64), 4))
        for name in _ROUNDED_3:
            cols[name] = _strings(_nan_to_inf(getattr(batch, name), 3))
        if np.isnan(np.asarray(batch.last_ts, dtype=np.float64)).any():
            raise ValueError("ScoreBatch.last_ts has NaN: every score needs the timestamp of its newest sample")
        return cols

    async def forget(self, vms: list[str], last_ts: np.ndarray) -> int:
        """Remove evicted VMs from the ranks, their host set and delete their hash; returns how many.

        ``last_ts``: the newest sample the evicting worker held per VM; a VM whose
        stored score is newer is kept (another worker owns it now). Redis errors propagate.
        """
        if not vms:
            return 0
        ts = _strings(np.asarray(last_ts, dtype=np.float64))
        forgotten = 0
        for lo in range(0, len(vms), self.chunk_vms):
            flat: list[str] = [""] * (2 * len(vms[lo : lo + self.chunk_vms]))
            flat[0::2], flat[1::2] = vms[lo : lo + self.chunk_vms], ts[lo : lo + self.chunk_vms]
            forgotten += int(await self._forget(keys=[], args=[self.prefix, _ENCODE(flat)]))
        return forgotten

    async def held_since_last_check(self, worker: str) -> bool:
        """True when Redis still holds what this worker wrote; False right after it came back empty.

        A per-worker marker key with the hash TTL: absent means Redis restarted without
        persistence, failed over to an empty replica, or was flushed (or this is the
        worker's first check), and the worker should write its VMs' scores again.
        """
        key = self.keys.worker(worker)
        created = await self.client.set(key, b"1", ex=self.ttl_s, nx=True)
        if not created:
            await self.client.expire(key, self.ttl_s)
        return not created

    async def lost_since_last_check(self, worker: str) -> bool:
        """True when this worker's marker is gone: Redis lost what it held since the last check.

        Unlike ``held_since_last_check`` it sets nothing, so the check that re-scores
        the worker's VMs still sees the loss. Readers of shared state use it to tell a
        key an operator deleted from one that went with everything else.
        """
        return not await self.client.exists(self.keys.worker(worker))

    async def prune(self, count: int = 1000) -> int:
        """One sweep over the ranks and host sets: members whose hash expired are removed; returns how many.

        Incremental (ZSCAN/SSCAN/SCAN with ``count``), so a million VMs cost Redis many small
        steps rather than one long one.
        """
        removed = 0
        for key in self.keys.ranks:
            async for chunk in _chunks(self.client.zscan_iter(key, count=count), count):
                removed += int(await self._prune(keys=[key], args=[self.prefix, "z", *(m for m, _ in chunk)]))
        async for host_key in self.client.scan_iter(match=glob_escape(self.keys.host_prefix) + "*", count=count):
            async for chunk in _chunks(self.client.sscan_iter(host_key, count=count), count):
                removed += int(await self._prune(keys=[host_key], args=[self.prefix, "s", *chunk]))
        hosts_key = self.keys.hosts
        async for chunk in _chunks(self.client.sscan_iter(hosts_key, count=count), count):
            pipe = self.client.pipeline(transaction=False)
            for host in chunk:
                pipe.exists(self.keys.host(host.decode() if isinstance(host, bytes) else host))
            gone = [h for h, alive in zip(chunk, await pipe.execute()) if not alive]
            if gone:
                await self.client.srem(hosts_key, *gone)
        return removed


async def _chunks(items: Any, size: int) -> Any:
    """Group an async iterator into lists of ``size``."""
    chunk: list[Any] = []
    async for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def glob_escape(text: str) -> str:
    """``text`` as a literal inside a Redis SCAN MATCH pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def decode_hash(vm: str, raw: dict[Any, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"vm": vm}
    for k, v in raw.items():
        key = k.decode() if isinstance(k, bytes) else k
        val = v.decode() if isinstance(v, bytes) else v
        out[key] = float(val) if key in _NUMERIC else val
    return out


async def read_vm(client: Any, prefix: str, vm: str) -> dict[str, Any] | None:
    """The VM's score hash with numbers as floats, or None when the VM is unknown."""
    raw = await client.hgetall(RedisKeys.for_client(client, prefix).vm(vm))
    return decode_hash(vm, raw) if raw else None


async def read_vm_with_curve(client: Any, prefix: str, vm: str) -> tuple[dict[str, Any] | None, bytes | None]:
    """The VM's score hash (as :func:`read_vm`) and its curve blob, in one round trip; (None, None) when unknown."""
    keys = RedisKeys.for_client(client, prefix)
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(keys.vm(vm))
    pipe.get(keys.curve(vm))
    raw, blob = await pipe.execute()
    return (decode_hash(vm, raw), blob or None) if raw else (None, None)


async def top(client: Any, prefix: str, n: int, host: str | None = None) -> list[dict[str, Any]]:
    """The ``n`` best VMs to migrate now (lowest predicted downtime), optionally on one host."""
    if n <= 0:
        return []
    keys = RedisKeys.for_client(client, prefix)
    if host is None:
        vms = [v.decode() if isinstance(v, bytes) else v for v in await client.zrange(keys.rank_now, 0, n - 1)]
    else:
        members = [m.decode() if isinstance(m, bytes) else m for m in await client.smembers(keys.host(host))]
        if not members:
            return []
        scores = await client.zmscore(keys.rank_now, members)
        ranked = sorted((s, m) for m, s in zip(members, scores) if s is not None)
        vms = [m for _, m in ranked[:n]]
    if not vms:
        return []
    pipe = client.pipeline(transaction=False)
    for vm in vms:
        pipe.hgetall(keys.vm(vm))
    hashes = await pipe.execute()
    return [decode_hash(vm, raw) for vm, raw in zip(vms, hashes) if raw]
