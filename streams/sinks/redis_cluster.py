"""Redis sink on a Redis Cluster: the same scores, hash-tagged keys, two atomic steps per write.

``RedisSink(settings, client)`` with a ``RedisCluster`` client is this sink
(``streams.redis_keys`` for the key names). A single Redis script may only
touch keys of one slot, so a write is two steps, each a script with declared
keys, each newer-wins on ``last_ts``:

1. **the VM** (one EVALSHA per VM, ``KEYS``: its hash and curve, one slot by
   the ``{<vm>}`` tag): the stored ``last_ts`` is not newer -> HSET, EXPIRE,
   SET curve; returns whether it wrote. Pipelined through the cluster client,
   which sends each node its VMs' scripts in one round trip, the nodes in
   parallel.
2. **the fleet index** (one EVALSHA per 1000 written VMs, ``KEYS``: the ranks,
   ``{fleet}:vms``, ``{fleet}:hosts`` and the host sets written, one slot by
   the ``{fleet}`` tag): per VM, when ``{fleet}:vms`` holds no newer
   ``last_ts``, ZADD to the three ranks, move it between host sets (its old
   host comes from ``{fleet}:vms``; that set shares the slot), record
   ``"<last_ts> <host>"``; then EXPIRE the host sets and the host list.

What single-node Redis gives and this does not: one VM's hash and its rank
entries change in one step. Here a reader can see the hash a score ahead of
the ranks for the moment between the two steps (one round trip); each side is
newer-wins on its own, so two workers racing on one VM leave both sides at the
newest score, whatever the order their steps land in. A worker that dies
between the steps leaves the ranks one score behind until the VM's next write;
a failed step is retried by the worker with the whole write (both steps are
idempotent). ``forget`` and ``prune`` remove a VM from the index only while
``{fleet}:vms`` still holds the ``last_ts`` they saw, so they never drop a VM
that was written again meanwhile.

Scripts are loaded on every primary before the first write and again after a
NOSCRIPT (a failover to a node that never saw them).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import numpy as np
from redis.exceptions import NoScriptError

from streams.scores import ScoreBatch
from streams.sinks.redis_sink import _ENCODE, _PACKED, CHUNKS_PER_PIPELINE, RedisSink, WriteResult, _chunks, reply_text

# KEYS: the VM's hash, its curve. ARGV: model, updated, ONE JSON array of the VM's _PACKED strings, ttl[, curve].
_VM_WRITE_LUA = """
local a = cjson.decode(ARGV[3])
local old_ts = tonumber(redis.call('HGET', KEYS[1], 'last_ts'))
if old_ts and old_ts > tonumber(a[3]) then return 0 end
redis.call('HSET', KEYS[1],
  'best_start', a[4], 'best_end', a[5], 'best_downtime_ms', a[6], 'now_downtime_ms', a[7],
  'p_ok', a[8], 'window_rule', a[9], 'min_start', a[10], 'min_end', a[11],
  'min_downtime_ms', a[12], 'min_p_ok', a[13], 'now_p_ok', a[14], 'now_total_s', a[15], 'downtime_factor', a[16],
  'model', ARGV[1], 'last_ts', a[3], 'updated', ARGV[2], 'host', a[2])
redis.call('EXPIRE', KEYS[1], ARGV[4])
if #ARGV > 4 then redis.call('SET', KEYS[2], ARGV[5], 'EX', ARGV[4]) end
return 1
"""

# KEYS: the VM's hash, its curve. ARGV: the newest last_ts the evicting worker had. Returns 1 when deleted (or absent).
_VM_FORGET_LUA = """
local old_ts = tonumber(redis.call('HGET', KEYS[1], 'last_ts'))
if old_ts and old_ts > tonumber(ARGV[1]) then return 0 end
redis.call('DEL', KEYS[1], KEYS[2])
return 1
"""

# Reads the index record of ARGV vm: (last_ts, host) or nil. Shared by the index scripts below.
_RECORD_LUA = """
local function record(vm)
  local r = redis.call('HGET', KEYS[4], vm)
  if not r then return nil, nil end
  local sp = string.find(r, ' ', 1, true)
  return tonumber(string.sub(r, 1, sp - 1)), string.sub(r, sp + 1)
end
"""

# KEYS: rank:now, rank:window, rank:best, vms, hosts, then the host sets written (KEYS[5 + i] for host i).
# ARGV: ttl, ONE JSON array of strings per VM: vm, last_ts, now, window, best, host index (0: no host),
# then the JSON array of the host names, the host-set key prefix (the old host's set: same slot by the tag).
_INDEX_WRITE_LUA = _RECORD_LUA + """
local a, names, host_prefix = cjson.decode(ARGV[2]), cjson.decode(ARGV[3]), ARGV[4]
local written, touched = 0, {}
for i = 1, #a, 6 do
  local vm, ts, h = a[i], a[i + 1], tonumber(a[i + 5])
  local old_ts, old_host = record(vm)
  if not old_ts or old_ts <= tonumber(ts) then
    redis.call('ZADD', KEYS[1], a[i + 2], vm)
    redis.call('ZADD', KEYS[2], a[i + 3], vm)
    redis.call('ZADD', KEYS[3], a[i + 4], vm)
    local host = ''
    if h > 0 then host = names[h] end
    redis.call('HSET', KEYS[4], vm, ts .. ' ' .. host)
    if old_host and old_host ~= '' and old_host ~= host then
      redis.call('SREM', host_prefix .. old_host, vm)
    end
    if h > 0 then
      redis.call('SADD', KEYS[5 + h], vm)
      touched[h] = true
    end
    written = written + 1
  end
end
local any = false
for h in pairs(touched) do
  redis.call('EXPIRE', KEYS[5 + h], ARGV[1])
  redis.call('SADD', KEYS[5], names[h])
  any = true
end
if any then redis.call('EXPIRE', KEYS[5], ARGV[1]) end
return written
"""

# KEYS: rank:now, rank:window, rank:best, vms. ARGV: the host-set key prefix, ONE JSON array of strings:
# vm, last_ts (remove only while the index holds no newer score). Returns the rank and host-set entries removed.
_INDEX_FORGET_LUA = _RECORD_LUA + """
local host_prefix, a = ARGV[1], cjson.decode(ARGV[2])
local removed = 0
for i = 1, #a, 2 do
  local vm = a[i]
  local old_ts, old_host = record(vm)
  if not old_ts or old_ts <= tonumber(a[i + 1]) then
    removed = removed + redis.call('ZREM', KEYS[1], vm) + redis.call('ZREM', KEYS[2], vm) + redis.call('ZREM', KEYS[3], vm)
    if old_host and old_host ~= '' then removed = removed + redis.call('SREM', host_prefix .. old_host, vm) end
    redis.call('HDEL', KEYS[4], vm)
  end
end
return removed
"""

_SCRIPTS = {"vm_write": _VM_WRITE_LUA, "vm_forget": _VM_FORGET_LUA, "index_write": _INDEX_WRITE_LUA,
            "index_forget": _INDEX_FORGET_LUA}  # fmt: skip
_MARKER_TAG_SEARCH = 20_000  # tags tried for one slot per primary (~N ln N for N even primaries; a slotless one ends it)


class ClusterRedisSink(RedisSink):
    """``RedisSink`` for a ``RedisCluster`` client; see the module docstring for the two steps and their guarantees."""

    def _prepare_scripts(self) -> None:
        """Scripts with declared KEYS, called by sha (loaded on every primary on first use, ``_pipeline``)."""
        self._sha = {name: hashlib.sha1(text.encode()).hexdigest() for name, text in _SCRIPTS.items()}
        self._loaded = False
        self._markers: tuple[tuple[str, ...], list[str]] | None = None  # (primaries, one tag per primary)

    # --- plumbing -------------------------------------------------------------------
    def _eval(self, pipe: Any, script: str, keys: list[str], args: list[Any]) -> None:
        # redis-py's cluster pipeline has no evalsha(); the raw command is routed by its declared keys
        pipe.execute_command("EVALSHA", self._sha[script], len(keys), *keys, *args)

    async def _pipeline(self, build: Callable[[Any], None]) -> list[Any]:
        """Run the commands ``build(pipe)`` queues; scripts (re)loaded on every primary when missing.

        Everything queued here is idempotent, so after a NOSCRIPT the whole pipeline runs again.
        """
        for attempt in range(2):
            if not self._loaded:
                for text in _SCRIPTS.values():
                    await self.client.script_load(text)  # SCRIPT LOAD goes to every primary
                self._loaded = True
            try:
                async with self.client.pipeline(transaction=False) as pipe:  # reset also when a node is down
                    build(pipe)
                    return list(await pipe.execute())
            except NoScriptError:
                self._loaded = False
                if attempt:
                    raise
        raise AssertionError("unreachable")

    # --- writes ----------------------------------------------------------------------
    async def write_counts(self, batch: ScoreBatch) -> WriteResult:
        """Write the batch (VM step, then index step for the VMs written); Redis errors propagate."""
        n = len(batch)
        if n == 0:
            return WriteResult(0, 0)
        cols = self._columns(batch)
        rows = list(zip(*(cols[name] for name in _PACKED)))  # per VM: the _PACKED strings
        head = [batch.model, repr(float(batch.updated))]
        ttl = str(self.ttl_s)
        curves = batch.curves
        written_rows: list[int] = []
        step = self.chunk_vms * CHUNKS_PER_PIPELINE
        for start in range(0, n, step):
            stop = min(start + step, n)

            def vm_step(pipe: Any, lo: int = start, hi: int = stop) -> None:
                for i in range(lo, hi):
                    vm = rows[i][0]
                    args = [*head, _ENCODE(rows[i]), ttl]
                    if curves is not None:
                        args.append(curves[i])
                    self._eval(pipe, "vm_write", [self.keys.vm(vm), self.keys.curve(vm)], args)

            done = await self._pipeline(vm_step)
            written_rows.extend(i for i, w in zip(range(start, stop), done) if int(w))
        await self._index(written_rows, cols)
        return WriteResult(len(written_rows), n - len(written_rows))

    async def _index(self, rows: list[int], cols: dict[str, list[str]]) -> None:
        """Step 2: the ranks, host sets and host list of the VMs in ``rows`` (one script per chunk, one round trip)."""
        if not rows:
            return
        k = self.keys
        fixed = [k.rank_now, k.rank_window, k.rank_best, k.vms, k.hosts]
        vm, ts, host = cols["vm"], cols["last_ts"], cols["host"]
        now, window, best = cols["now_downtime_ms"], cols["best_start"], cols["best_downtime_ms"]
        calls: list[tuple[list[str], list[Any]]] = []
        for lo in range(0, len(rows), self.chunk_vms):
            names: dict[str, int] = {}
            flat: list[str] = []
            for i in rows[lo : lo + self.chunk_vms]:
                h = host[i]
                index = names.setdefault(h, len(names) + 1) if h else 0
                flat += (vm[i], ts[i], now[i], window[i], best[i], str(index))
            hosts = list(names)
            calls.append(([*fixed, *(k.host(h) for h in hosts)],
                          [str(self.ttl_s), _ENCODE(flat), _ENCODE(hosts), k.host_prefix]))  # fmt: skip
        await self._pipeline(lambda pipe: [self._eval(pipe, "index_write", keys, args) for keys, args in calls])

    async def forget(self, vms: list[str], last_ts: np.ndarray) -> int:
        """Delete evicted VMs' hash and curve, then take them out of the index; returns how many were forgotten."""
        if not vms:
            return 0
        ts = [repr(float(t)) for t in np.asarray(last_ts, dtype=np.float64).tolist()]
        k = self.keys
        done = await self._pipeline(lambda pipe: [
            self._eval(pipe, "vm_forget", [k.vm(vm), k.curve(vm)], [t]) for vm, t in zip(vms, ts)])  # fmt: skip
        gone = [(vm, t) for vm, t, d in zip(vms, ts, done) if int(d)]
        await self._unindex(gone)
        return len(gone)

    async def _unindex(self, pairs: list[tuple[str, str]]) -> int:
        """Remove (vm, last_ts) from the ranks and host sets unless the index holds a newer score; entries removed."""
        if not pairs:
            return 0
        k = self.keys
        fixed = [k.rank_now, k.rank_window, k.rank_best, k.vms]
        calls = []
        for lo in range(0, len(pairs), self.chunk_vms):
            calls.append([k.host_prefix, _ENCODE([x for pair in pairs[lo : lo + self.chunk_vms] for x in pair])])
        got = await self._pipeline(lambda pipe: [self._eval(pipe, "index_forget", fixed, args) for args in calls])
        return sum(int(r) for r in got)

    async def held_since_last_check(self, worker: str) -> bool:
        """``RedisSink.held_since_last_check`` with one marker per primary: any node that came back empty counts."""
        keys = [self.keys.worker(worker, tag) for tag in await self._marker_tags()]
        created = await self._pipeline(lambda pipe: [pipe.set(key, b"1", ex=self.ttl_s, nx=True) for key in keys])
        kept = [key for key, c in zip(keys, created) if not c]
        if kept:
            await self._pipeline(lambda pipe: [pipe.expire(key, self.ttl_s) for key in kept])
        return not any(created)

    async def lost_since_last_check(self, worker: str) -> bool:
        """``RedisSink.lost_since_last_check``: any primary without this worker's marker counts."""
        keys = [self.keys.worker(worker, tag) for tag in await self._marker_tags()]
        present = await self._pipeline(lambda pipe: [pipe.exists(key) for key in keys])
        return not all(int(p) for p in present)

    async def _marker_tags(self) -> list[str]:
        """One hash tag per primary (``m<i>`` hashing to a slot it serves), recomputed when the primaries change."""
        await self.client.initialize()
        primaries = tuple(sorted(node.name for node in self.client.get_primaries()))
        if self._markers is None or self._markers[0] != primaries:
            tags: dict[str, str] = {}
            for i in range(_MARKER_TAG_SEARCH):
                node = self.client.get_node_from_key(f"{{m{i}}}")
                if node is not None:
                    tags.setdefault(node.name, f"m{i}")
                if len(tags) == len(primaries):
                    break
            self._markers = (primaries, sorted(tags.values()))
        return self._markers[1]

    async def prune(self, count: int = 1000) -> int:
        """Index entries (ranks, host sets) of VMs whose hash expired are removed; returns how many entries.

        HSCAN over ``{fleet}:vms`` (every VM of the index: the cluster layout writes ranks and host
        sets only with it), one pipelined EXISTS per chunk across the nodes, then conditional
        removal; host names whose set is gone leave ``{fleet}:hosts``.
        """
        k = self.keys
        removed = 0
        async for chunk in _chunks(self.client.hscan_iter(k.vms, count=count), count):
            pairs = [(reply_text(vm), reply_text(rec).split(" ", 1)[0]) for vm, rec in chunk]
            alive = await self._pipeline(lambda pipe, p=pairs: [pipe.exists(k.vm(vm)) for vm, _ in p])
            removed += await self._unindex([pair for pair, a in zip(pairs, alive) if not int(a)])
        async for chunk in _chunks(self.client.sscan_iter(k.hosts, count=count), count):
            hosts = [reply_text(h) for h in chunk]
            exists = await self._pipeline(lambda pipe, hs=hosts: [pipe.exists(k.host(h)) for h in hs])
            gone = [h for h, e in zip(hosts, exists) if not int(e)]
            if gone:
                await self.client.srem(k.hosts, *gone)
        return removed
