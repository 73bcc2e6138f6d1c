"""Per-partition sliding windows of slot means: ring buffers, one row per VM.

Layout: ``sums`` and ``counts`` of shape ``(capacity, n_slots, C)`` (C =
``WINDOW_CHANNELS``) live on the compute device (NumPy or CuPy ``xp``); slot
``s`` (absolute, ``floor(ts / slot_s)``) sits at ring position ``s % n_slots``.
Beside them, ``profile (capacity, P, len(TARGETS))`` float32 (P =
``features.slots_per_day(slot_s)``, NaN = nothing yet) holds each VM's daily
profile: per time-of-day slot ``j = s % P``, the EWMA (``features.folded``,
weight ``PROFILE_ALPHA`` on the newest) of the target means of the slots with
that time of day that have *left* the window, folded in slot order when their
ring position is reused (``update``); training rebuilds the same state from a
series with ``features.profiles_at``. Likewise ``week (capacity, W, len(TARGETS))`` (W =
``features.week_buckets``, 168 hours at 5-min slots) holds the weekly profile: per hour of
the week, the EWMA (weight ``WEEK_ALPHA``) of the hour's target means, folded when the hour's
first slot leaves the window (``features.weeklies_at`` in training).
Row metadata (newest slot, newest sample time, when the VM was last heard
from, memory size, vCPUs, host code, latest network rate, last scoring) stays in
NumPy on the host: it is small and the VM -> row mapping needs it. ``update`` is
vectorised over the batch; ids are factorised by hash (``pandas.factorize``, no
fixed-width string arrays: one 256-character id must not slow a whole batch),
and the only Python loop is the vm -> row dict lookup, once per distinct VM of
the batch (and once per distinct host).

Two clocks per VM: ``last_ts`` is the newest *sample* time (what the window and
the scores are about; replays of old traces keep old times) and ``last_seen``
is the *wall-clock* time a sample for it last arrived (what eviction uses: a VM
is gone when nothing has arrived for ``ttl_s``, whatever its samples claim).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pandas as pd

from gpu_kernels.downtime import dirty_rate_proxy
from gpu_kernels.features import (
    PROFILE_ALPHA,
    TARGETS,
    WEEK_ALPHA,
    WINDOW_CHANNELS,
    folded,
    slots_per_day,
    week_bucket_slots,
    week_buckets,
)
from gpu_kernels.xp import to_numpy

from streams.schema import METRICS

C = len(WINDOW_CHANNELS)
_M = {name: i for i, name in enumerate(METRICS)}
_CH = {name: i for i, name in enumerate(WINDOW_CHANNELS)}
_TARGET_CH = [_CH[t] for t in TARGETS]  # the profile's channels, in TARGETS order
# 4: plus the weekly profile; 3: plus the daily profile; 2: counts in the smallest unsigned dtype that
# holds their maximum; 1: counts int32. 1-3 still restore (the profiles they lack start empty and
# refill as slots leave the window).
SNAPSHOT_VERSION = 4
RESTORES_VERSIONS = (1, 2, 3, 4)
SNAPSHOT_CHUNK_ROWS = 4096  # rows copied at a time (bounded temporaries; the copying thread yields the GIL between)


def derive_channels(values: np.ndarray) -> np.ndarray:
    """Samples ``(n, len(METRICS))`` -> window channels ``(n, C)`` float32 (NaN = not observed).

    ``dirty_mbps`` is the measured rate, else the documented proxy; ``net_mbps``
    is ``(rx + tx) / 1024`` (a missing direction counts as 0 when the other is there).
    """
    v = np.asarray(values, dtype=np.float32)
    if v.ndim != 2 or v.shape[1] != len(METRICS):
        raise ValueError(f"values must be (n, {len(METRICS)}) in streams.schema.METRICS order, got {v.shape}")
    out = np.empty((v.shape[0], C), dtype=np.float32)
    out[:, _CH["cpu_pct"]] = v[:, _M["cpu_pct"]]
    measured = v[:, _M["dirty_mbps"]]
    proxy = dirty_rate_proxy(v[:, _M["cpu_pct"]], v[:, _M["vcpus"]], v[:, _M["mem_used_mb"]], v[:, _M["disk_write_kbps"]], np)
    out[:, _CH["dirty_mbps"]] = np.where(np.isnan(measured), proxy, measured)
    rx, tx = v[:, _M["net_rx_kbps"]], v[:, _M["net_tx_kbps"]]
    net = (np.nan_to_num(rx) + np.nan_to_num(tx)) / 1024
    out[:, _CH["net_mbps"]] = np.where(np.isnan(rx) & np.isnan(tx), np.nan, net)
    out[:, _CH["mem_used_mb"]] = v[:, _M["mem_used_mb"]]
    return out


def _last_per_group(order: np.ndarray, group: np.ndarray, key: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per group, the non-NaN value of the member with the largest ``key``.

    ``order`` sorts the samples by (group, key) (``np.lexsort((key, group))``, computed
    once per batch). Returns ``(groups, values, keys)`` of the groups with a value.
    """
    v = values[order]
    ok = ~np.isnan(v)
    g, k, v = group[order][ok], key[order][ok], v[ok]
    last = np.ones(g.shape[0], dtype=bool)
    last[:-1] = g[1:] != g[:-1]
    return g[last], v[last], k[last]


class WindowStore:
    """Ring buffers of per-slot sums/counts for the VMs of one partition."""

    def __init__(self, n_slots: int, slot_s: int, ttl_s: float, xp: Any = np, capacity: int = 64) -> None:
        if n_slots < 2 or slot_s <= 0 or capacity < 1:
            raise ValueError("need n_slots >= 2, slot_s > 0 and capacity >= 1")
        self.n_slots, self.slot_s, self.ttl_s, self.xp = int(n_slots), int(slot_s), float(ttl_s), xp
        self.slots_per_day = slots_per_day(self.slot_s)
        self.week_buckets, self.week_bucket_slots = week_buckets(self.slot_s), week_bucket_slots(self.slot_s)
        self.capacity = 0
        self.sums = xp.zeros((0, self.n_slots, C), dtype=xp.float32)
        self.counts = xp.zeros((0, self.n_slots, C), dtype=xp.int32)
        self.profile = xp.full((0, self.slots_per_day, len(TARGETS)), np.nan, dtype=xp.float32)
        self.week = xp.full((0, self.week_buckets, len(TARGETS)), np.nan, dtype=xp.float32)
        self.last_slot = np.zeros(0, dtype=np.int64)
        self.last_ts = np.zeros(0, dtype=np.float64)
        self.last_seen = np.zeros(0, dtype=np.float64)
        self.mem_total_mb = np.zeros(0, dtype=np.float32)
        self.vcpus = np.zeros(0, dtype=np.float32)
        self.latest_net = np.zeros(0, dtype=np.float32)
        self.latest_mem = np.zeros(0, dtype=np.float32)
        self.latest_wss = np.zeros(0, dtype=np.float32)
        self.host_code = np.zeros(0, dtype=np.int32)
        self.scored_at = np.zeros(0, dtype=np.float64)
        self.scored_slot = np.zeros(0, dtype=np.int64)
        # forecast cache (see Scorer): model output on its horizon grid, valid while the
        # row's newest slot equals forecast_slot and the model key is unchanged
        self.forecast: Any = None
        self.forecast_key = ""
        self.forecast_slot = np.zeros(0, dtype=np.int64)
        self.vm_of_row: list[str] = []
        self.row_of: dict[str, int] = {}
        self.free: list[int] = []
        self.hosts: list[str] = []
        self.host_index: dict[str, int] = {}
        self.dropped_old = 0
        self._grow(int(capacity))

    # ------------------------------------------------------------------ rows
    def __len__(self) -> int:
        return len(self.row_of)

    def _grow(self, new_cap: int) -> None:
        xp, old = self.xp, self.capacity
        sums = xp.zeros((new_cap, self.n_slots, C), dtype=xp.float32)
        counts = xp.zeros((new_cap, self.n_slots, C), dtype=xp.int32)
        profile = xp.full((new_cap, self.slots_per_day, len(TARGETS)), np.nan, dtype=xp.float32)
        week = xp.full((new_cap, self.week_buckets, len(TARGETS)), np.nan, dtype=xp.float32)
        sums[:old], counts[:old], profile[:old], week[:old] = self.sums, self.counts, self.profile, self.week
        self.sums, self.counts, self.profile, self.week = sums, counts, profile, week
        pad = new_cap - old
        self.last_slot = np.concatenate([self.last_slot, np.full(pad, -1, np.int64)])
        self.last_ts = np.concatenate([self.last_ts, np.full(pad, -np.inf)])
        self.last_seen = np.concatenate([self.last_seen, np.full(pad, -np.inf)])
        self.mem_total_mb = np.concatenate([self.mem_total_mb, np.full(pad, np.nan, np.float32)])
        self.vcpus = np.concatenate([self.vcpus, np.full(pad, np.nan, np.float32)])
        self.latest_net = np.concatenate([self.latest_net, np.full(pad, np.nan, np.float32)])
        self.latest_mem = np.concatenate([self.latest_mem, np.full(pad, np.nan, np.float32)])
        self.latest_wss = np.concatenate([self.latest_wss, np.full(pad, np.nan, np.float32)])
        self.host_code = np.concatenate([self.host_code, np.full(pad, -1, np.int32)])
        self.scored_at = np.concatenate([self.scored_at, np.full(pad, -np.inf)])
        self.scored_slot = np.concatenate([self.scored_slot, np.full(pad, -1, np.int64)])
        self.forecast_slot = np.concatenate([self.forecast_slot, np.full(pad, -1, np.int64)])
        if self.forecast is not None:
            grown = xp.zeros((new_cap, *self.forecast.shape[1:]), dtype=xp.float32)
            grown[:old] = self.forecast
            self.forecast = grown
        self.vm_of_row += [""] * pad
        self.free.extend(range(new_cap - 1, old - 1, -1))  # pop() hands out low rows first
        self.capacity = new_cap

    def _reset_rows(self, rows: np.ndarray) -> None:
        r_dev = self.xp.asarray(rows)
        self.sums[r_dev] = 0
        self.counts[r_dev] = 0
        self.profile[r_dev] = np.nan
        self.week[r_dev] = np.nan
        self.last_slot[rows] = -1
        self.last_ts[rows] = -np.inf
        self.last_seen[rows] = -np.inf
        for a in (self.mem_total_mb, self.vcpus, self.latest_net, self.latest_mem, self.latest_wss):
            a[rows] = np.nan
        self.host_code[rows] = -1
        self.scored_at[rows] = -np.inf
        self.scored_slot[rows] = -1
        self.forecast_slot[rows] = -1

    def _rows_for(self, vms: Any) -> np.ndarray:
        """Rows of distinct VM ids, allocating (and growing) for new ones."""
        rows = np.empty(len(vms), dtype=np.int64)
        for i, vm in enumerate(vms.tolist() if isinstance(vms, np.ndarray) else list(vms)):
            r = self.row_of.get(vm)
            if r is None:
                if not self.free:
                    self._grow(self.capacity * 2)
                r = self.free.pop()
                self.row_of[vm] = r
                self.vm_of_row[r] = vm
            rows[i] = r
        return rows

    def rows_of(self, vms: Any) -> np.ndarray:
        """Rows of the given VM ids that the store holds (unknown ids are skipped)."""
        return np.fromiter((r for vm in vms if (r := self.row_of.get(vm)) is not None), dtype=np.int64)

    def _host_codes(self, hosts: Any) -> np.ndarray:
        """Codes of distinct host names (new ones registered); "" (no host) is -1."""
        codes = np.empty(len(hosts), dtype=np.int32)
        for i, h in enumerate(hosts.tolist() if isinstance(hosts, np.ndarray) else list(hosts)):
            if h == "":
                codes[i] = -1
                continue
            c = self.host_index.get(h)
            if c is None:
                c = self.host_index[h] = len(self.hosts)
                self.hosts.append(h)
            codes[i] = c
        return codes

    # ------------------------------------------------------------------ update
    def update(
        self, vm: list[str], host: list[str], ts: np.ndarray, values: np.ndarray, seen: Any = None
    ) -> np.ndarray:
        """Add a batch of samples; returns the (distinct) rows touched.

        Samples average into their slot; a VM moving to a newer slot clears the
        slots in between (gaps stay NaN), folding the slots that leave the window
        into the daily and weekly profiles first (``_fold_leaving``, ``_fold_weekly``); samples older than the
        window are dropped and counted in ``dropped_old``. ``seen``: when each sample arrived
        (wall clock, epoch s; one number or one per sample; default now), kept
        per VM as ``last_seen`` for eviction.
        """
        ts = np.asarray(ts, dtype=np.float64)
        n = ts.shape[0]
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        if len(vm) != n or len(host) != n or len(values) != n:
            raise ValueError("vm, host, ts and values must have one entry per sample")
        chans = derive_channels(values)
        inv, uvm = pd.factorize(np.asarray(vm, dtype=object))
        inv = inv.astype(np.int64)
        urows = self._rows_for(uvm)
        seen_at = np.broadcast_to(np.asarray(time.time() if seen is None else seen, dtype=np.float64), (n,))
        batch_seen = np.full(len(uvm), -np.inf)
        np.maximum.at(batch_seen, inv, seen_at)
        self.last_seen[urows] = np.maximum(self.last_seen[urows], batch_seen)
        S = self.n_slots
        slot = np.floor(ts / self.slot_s).astype(np.int64)

        # newest slot per VM: advance and clear the slots skipped over
        batch_max = np.full(len(uvm), np.iinfo(np.int64).min, dtype=np.int64)
        np.maximum.at(batch_max, inv, slot)
        old = self.last_slot[urows]
        new = np.maximum(old, batch_max)
        fresh = old < 0
        gap = np.where(fresh, 0, np.minimum(new - old, S))  # fresh rows were zeroed on release
        if gap.any():
            rep_rows = np.repeat(urows, gap)
            offs = np.arange(int(gap.sum())) - np.repeat(np.cumsum(gap) - gap, gap)
            slot_in = np.repeat(old, gap) + 1 + offs  # the slot that takes the position over
            pos = slot_in % S
            self._fold_leaving(rep_rows, pos, slot_in - S, offs)
            self._fold_weekly(rep_rows, slot_in - S, np.repeat(old, gap))
            r_dev, p_dev = self.xp.asarray(rep_rows), self.xp.asarray(pos)
            self.sums[r_dev, p_dev] = 0
            self.counts[r_dev, p_dev] = 0
        self.last_slot[urows] = new

        # aggregate the samples still inside the window into (row, slot) cells
        keep = slot > new[inv] - S
        self.dropped_old += int(n - keep.sum())
        if keep.any():
            rows_k = urows[inv[keep]]
            cell = rows_k * S + slot[keep] % S
            ucell, cinv = np.unique(cell, return_inverse=True)
            ck = chans[keep]
            valid = ~np.isnan(ck)
            agg_s = np.zeros((len(ucell), C), dtype=np.float32)
            agg_n = np.zeros((len(ucell), C), dtype=np.int32)
            np.add.at(agg_s, cinv, np.where(valid, ck, 0))
            np.add.at(agg_n, cinv, valid.astype(np.int32))
            xp = self.xp
            flat_s = self.sums.reshape(-1, C)
            flat_n = self.counts.reshape(-1, C)
            uc = xp.asarray(ucell)
            flat_s[uc] += xp.asarray(agg_s)
            flat_n[uc] += xp.asarray(agg_n)

        # newest-sample attributes (only from samples at least as new as what we had)
        prev_ts = self.last_ts[urows]
        batch_ts = np.full(len(uvm), -np.inf)
        np.maximum.at(batch_ts, inv, ts)
        self.last_ts[urows] = np.maximum(prev_ts, batch_ts)
        order = np.lexsort((ts, inv))
        for target, column in (
            (self.mem_total_mb, values_col(values, "mem_total_mb")),
            (self.vcpus, values_col(values, "vcpus")),
            (self.latest_net, chans[:, _CH["net_mbps"]]),
            (self.latest_mem, values_col(values, "mem_used_mb")),
            (self.latest_wss, values_col(values, "wss_mb")),
        ):
            g, v, k = _last_per_group(order, inv, ts, column)
            newer = k >= prev_ts[g]
            target[urows[g[newer]]] = v[newer]
        hinv, uhost = pd.factorize(np.asarray(host, dtype=object))
        codes = self._host_codes(uhost)[hinv]
        if (codes >= 0).any():
            g, code, k = _last_per_group(order, inv, ts, np.where(codes >= 0, codes, np.nan))
            newer = k >= prev_ts[g]
            self.host_code[urows[g[newer]]] = code[newer].astype(np.int32)
        return urows

    def _fold_leaving(self, rows: np.ndarray, pos: np.ndarray, slots: np.ndarray, offs: np.ndarray) -> None:
        """Fold the slots about to leave the window into the profile (before their positions are cleared).

        ``rows``/``pos``/``slots``: one entry per leaving slot (row, ring position, absolute
        slot), each row's run in increasing slot order; ``offs`` numbers the entries of a run
        from 0. A run longer than a day (``n_slots`` > slots per day) holds the same time of
        day more than once: it is folded in rounds of at most one day, oldest first, so every
        (row, time of day) is written once per round and the EWMA sees the slots in order.
        Empty slots (no count) leave the profile as it was.
        """
        xp, P = self.xp, self.slots_per_day
        if offs.size == 0:
            return
        rounds = offs // P
        n_rounds = int(rounds.max()) + 1
        for r in range(n_rounds):
            pick = slice(None) if n_rounds == 1 else np.flatnonzero(rounds == r)
            r_dev, p_dev = xp.asarray(rows[pick]), xp.asarray(pos[pick])
            j_dev = xp.asarray(slots[pick] % P)
            s = self.sums[r_dev, p_dev][:, _TARGET_CH]
            c = self.counts[r_dev, p_dev][:, _TARGET_CH]
            mean = xp.where(c > 0, s / xp.maximum(c, 1).astype(xp.float32), xp.float32(np.nan)).astype(xp.float32)
            self.profile[r_dev, j_dev] = folded(self.profile[r_dev, j_dev], mean, PROFILE_ALPHA, xp)

    def _fold_weekly(self, rows: np.ndarray, slots: np.ndarray, newest: np.ndarray) -> None:
        """Fold each hour whose first slot is about to leave into the weekly profile: the mean over
        the hour's first ``min(hour, window)`` slots that the window holds (up to ``newest``, the
        row's newest slot before this update). Slots after it are skipped over (no sample) or come
        with this very update, which only happens when one update moves a VM on by nearly a
        whole window: those are left out (training counts them, ``features.weeklies_at``).

        One entry per leaving slot (row, absolute slot); a run is at most a window long, so
        under a week: every (row, hour of the week) is written at most once per call.
        """
        xp, B, S = self.xp, self.week_bucket_slots, self.n_slots
        first = slots % B == 0
        if not first.any():
            return
        rows, slots, newest = rows[first], slots[first], newest[first]
        span = np.arange(min(B, S))
        cells = slots[:, None] + span[None, :]  # (n, span) absolute slots of the hour
        held = cells <= newest[:, None]
        r_dev, p_dev = xp.asarray(np.repeat(rows, span.size)), xp.asarray((cells % S).reshape(-1))
        s = self.sums[r_dev, p_dev][:, _TARGET_CH].reshape(rows.size, span.size, len(TARGETS))
        c = self.counts[r_dev, p_dev][:, _TARGET_CH].reshape(rows.size, span.size, len(TARGETS))
        has = (c > 0) & xp.asarray(held)[:, :, None]
        slot_mean = xp.where(has, s / xp.maximum(c, 1).astype(xp.float32), xp.float32(0))
        n = has.sum(axis=1)  # the mean of the slot means, as ``features.bucket_means`` takes it
        mean = xp.where(n > 0, slot_mean.sum(axis=1) / xp.maximum(n, 1).astype(xp.float32), xp.float32(np.nan))
        r_dev, b_dev = xp.asarray(rows), xp.asarray((slots // B) % self.week_buckets)
        self.week[r_dev, b_dev] = folded(self.week[r_dev, b_dev], mean.astype(xp.float32), WEEK_ALPHA, xp)

    # ------------------------------------------------------------------ reads
    def windows(self, rows: Any) -> tuple[Any, dict[str, Any]]:
        """Window tensor ``(k, n_slots, C)`` float32 oldest -> newest (NaN gaps) and attributes,
        with ``attrs["profile"]`` and ``attrs["week"]`` the rows' daily and weekly profiles
        (:meth:`profiles`, :meth:`weeklies`, on the device)."""
        attrs = self.attrs(rows)
        attrs["profile"] = self.profiles(rows)
        attrs["week"] = self.weeklies(rows)
        return self.window(rows), attrs

    def profiles(self, rows: Any) -> Any:
        """Daily profiles ``(k, slots_per_day, len(TARGETS))`` float32 raw scale (NaN: nothing folded
        yet), indexed by ``absolute slot % slots_per_day``, on the store's device (a copy)."""
        return self.profile[self.xp.asarray(np.asarray(rows, dtype=np.int64))]

    def weeklies(self, rows: Any) -> Any:
        """Weekly profiles ``(k, week_buckets, len(TARGETS))`` float32 raw scale (NaN: nothing folded
        yet), indexed by ``(absolute slot // week_bucket_slots) % week_buckets``, on the device (a copy)."""
        return self.week[self.xp.asarray(np.asarray(rows, dtype=np.int64))]

    def window(self, rows: Any) -> Any:
        """Window tensor ``(k, n_slots, C)`` float32 oldest -> newest (NaN gaps), on the store's device."""
        xp, S = self.xp, self.n_slots
        rows = np.asarray(rows, dtype=np.int64)
        pos = (self.last_slot[rows][:, None] - S + 1 + np.arange(S)[None, :]) % S
        r_dev, p_dev = xp.asarray(rows[:, None]), xp.asarray(pos)
        s = self.sums[r_dev, p_dev]
        c = self.counts[r_dev, p_dev]
        return xp.where(c > 0, s / xp.maximum(c, 1).astype(xp.float32), xp.float32(np.nan)).astype(xp.float32)

    def attrs(self, rows: Any) -> dict[str, Any]:
        """Per-row attributes (host-side): ids, newest slot and sample, VM size, newest memory used."""
        rows = np.asarray(rows, dtype=np.int64)
        return {
            "vm": [self.vm_of_row[r] for r in rows.tolist()],
            "host": [self.hosts[c] if c >= 0 else "" for c in self.host_code[rows].tolist()],
            "last_slot": self.last_slot[rows].copy(),
            "last_ts": self.last_ts[rows].copy(),
            "mem_total_mb": self.mem_total_mb[rows].copy(),
            "vcpus": self.vcpus[rows].copy(),
            "mem_used_mb": self.latest_mem[rows].copy(),
            "wss_mb": self.latest_wss[rows].copy(),
        }

    def active_rows(self) -> np.ndarray:
        return np.fromiter(sorted(self.row_of.values()), dtype=np.int64)

    def host_traffic_mbps(self, rows: Any, exclude_self: bool = False) -> np.ndarray:
        """Per row: sum of the latest observed net (MB/s) of every VM in the store on its host.

        A VM with no known host counts alone. ``exclude_self`` leaves the VM's own rate out.
        """
        rows = np.asarray(rows, dtype=np.int64)
        active = self.active_rows()
        net = np.nan_to_num(self.latest_net[active])
        code = self.host_code[active]
        known = code >= 0
        per_host = np.bincount(code[known], weights=net[known], minlength=len(self.hosts)).astype(np.float32)
        own = np.nan_to_num(self.latest_net[rows])
        c = self.host_code[rows]
        total = np.where(c >= 0, per_host[np.maximum(c, 0)] if len(per_host) else 0, own)
        return (total - own if exclude_self else total).astype(np.float32)

    def idle_rows(self, now: float) -> np.ndarray:
        """Rows from which nothing arrived for more than ``ttl_s`` before ``now`` (wall clock)."""
        active = self.active_rows()
        return active[self.last_seen[active] < now - self.ttl_s]

    def evict_idle(self, now: float) -> list[str]:
        """Release VMs from which nothing arrived for more than ``ttl_s`` (wall clock); returns their ids."""
        return self.release(self.idle_rows(now))

    def release(self, rows: Any) -> list[str]:
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            return []
        self._reset_rows(rows)
        gone = [self.vm_of_row[r] for r in rows.tolist()]
        for r, vm in zip(rows.tolist(), gone):
            del self.row_of[vm]
            self.vm_of_row[r] = ""
            self.free.append(r)
        return gone

    def mark_scored(self, rows: Any, now: float) -> None:
        rows = np.asarray(rows, dtype=np.int64)
        self.scored_at[rows] = now
        self.scored_slot[rows] = self.last_slot[rows]

    # ------------------------------------------------------------------ forecast cache
    def cached_forecast(self, rows: Any, key: str) -> np.ndarray:
        """Mask of ``rows`` whose cached forecast is current (same model key, same newest slot)."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.forecast is None or key != self.forecast_key:
            return np.zeros(rows.shape[0], dtype=bool)
        return self.forecast_slot[rows] == self.last_slot[rows]

    def put_forecast(self, rows: Any, pred: Any, key: str) -> None:
        """Cache ``pred`` (rows x model grid x targets x quantiles) for the rows' current slot."""
        rows = np.asarray(rows, dtype=np.int64)
        xp = self.xp
        if self.forecast is None or key != self.forecast_key or self.forecast.shape[1:] != pred.shape[1:]:
            self.forecast = xp.zeros((self.capacity, *pred.shape[1:]), dtype=xp.float32)
            self.forecast_slot[:] = -1
            self.forecast_key = key
        self.forecast[xp.asarray(rows)] = pred
        self.forecast_slot[rows] = self.last_slot[rows]

    def get_forecast(self, rows: Any) -> Any:
        return self.forecast[self.xp.asarray(np.asarray(rows, dtype=np.int64))]

    # ------------------------------------------------------------------ size
    @property
    def nbytes(self) -> int:
        """Bytes held by the store's arrays (device and host)."""
        host = sum(a.nbytes for a in self._host_arrays().values())
        cache = 0 if self.forecast is None else self.forecast.nbytes + self.forecast_slot.nbytes
        return int(self.sums.nbytes + self.counts.nbytes + self.profile.nbytes + self.week.nbytes + host + cache)

    @property
    def nbytes_per_vm(self) -> int:
        """Bytes one row costs (slot sums and counts, the daily and weekly profiles, metadata)."""
        per_row_device = self.n_slots * C * (4 + 4) + (self.slots_per_day + self.week_buckets) * len(TARGETS) * 4
        per_row_host = sum(a.itemsize for a in self._host_arrays().values())
        return per_row_device + per_row_host

    def _host_arrays(self) -> dict[str, np.ndarray]:
        return {
            "last_slot": self.last_slot,
            "last_ts": self.last_ts,
            "last_seen": self.last_seen,
            "mem_total_mb": self.mem_total_mb,
            "vcpus": self.vcpus,
            "latest_net": self.latest_net,
            "latest_mem": self.latest_mem,
            "latest_wss": self.latest_wss,
            "host_code": self.host_code,
            "scored_at": self.scored_at,
            "scored_slot": self.scored_slot,
        }

    # ------------------------------------------------------------------ snapshots
    def snapshot(self) -> dict[str, np.ndarray]:
        """The active rows as plain NumPy arrays (``np.savez``-able, no pickle needed): a copy.

        The copy of 100k VMs takes a few hundred ms: call it in a thread, with the
        store kept still meanwhile (the pipeline holds its lock), never on the event
        loop. ``counts`` come in the smallest unsigned dtype that holds their
        maximum (uint8 for up to 255 samples per slot), ``sums``, ``profile`` and ``week``
        as they are (the file's byte planes shrink a young VM's all-NaN profiles to little).
        """
        rows = self.active_rows()
        n, xp = rows.shape[0], self.xp
        out = {name: a[rows] for name, a in self._host_arrays().items()}
        top = int(self.counts.max()) if self.capacity else 0  # released rows are zeroed: the active rows' max
        sums = np.empty((n, self.n_slots, C), dtype=np.float32)
        counts = np.empty((n, self.n_slots, C), dtype=np.min_scalar_type(top))
        profile = np.empty((n, self.slots_per_day, len(TARGETS)), dtype=np.float32)
        week = np.empty((n, self.week_buckets, len(TARGETS)), dtype=np.float32)
        dense = n > 0 and int(rows[-1]) == n - 1  # rows 0..n-1 (sorted, distinct): plain slices
        for lo in range(0, n, SNAPSHOT_CHUNK_ROWS):
            hi = min(n, lo + SNAPSHOT_CHUNK_ROWS)
            pick = slice(lo, hi) if dense else xp.asarray(rows[lo:hi])
            sums[lo:hi] = to_numpy(self.sums[pick])
            counts[lo:hi] = to_numpy(self.counts[pick])  # exact: every count is <= top
            profile[lo:hi] = to_numpy(self.profile[pick])
            week[lo:hi] = to_numpy(self.week[pick])
        out["sums"], out["counts"], out["profile"], out["week"] = sums, counts, profile, week
        out["vm"] = np.array([self.vm_of_row[r] for r in rows.tolist()], dtype=np.str_)
        out["hosts"] = np.array(self.hosts, dtype=np.str_)
        out["config"] = np.array([SNAPSHOT_VERSION, self.n_slots, self.slot_s, self.ttl_s, self.dropped_old], dtype=np.float64)
        return out

    @classmethod
    def restore(cls, arrays: dict[str, np.ndarray], xp: Any = np) -> WindowStore:
        """Rebuild a store from :meth:`snapshot` output (e.g. loaded from ``np.load``), of any version in ``RESTORES_VERSIONS``.

        Versions 1 and 2 hold no profile, 1-3 no weekly profile: what is missing starts empty (NaN)
        and refills as slots leave the window.
        """
        version, n_slots, slot_s, ttl_s, dropped = np.asarray(arrays["config"]).tolist()
        version = int(version)
        if version not in RESTORES_VERSIONS:
            raise ValueError(f"window snapshot version {version} is not one of {RESTORES_VERSIONS}")
        vms = [str(v) for v in np.asarray(arrays["vm"]).tolist()]
        cap = 64
        while cap < len(vms):
            cap *= 2
        store = cls(int(n_slots), int(slot_s), ttl_s, xp=xp, capacity=cap)
        store.dropped_old = int(dropped)
        store.hosts = [str(h) for h in np.asarray(arrays["hosts"]).tolist()]
        store.host_index = {h: i for i, h in enumerate(store.hosts)}
        rows = store._rows_for(np.asarray(vms, dtype=np.str_)) if vms else np.zeros(0, np.int64)
        for name, a in store._host_arrays().items():
            if name in arrays:  # snapshots from before an attribute existed leave it NaN/-1
                a[rows] = np.asarray(arrays[name], dtype=a.dtype)
        if "last_seen" not in arrays:  # older snapshots: count silence from the restore on
            store.last_seen[rows] = time.time()
        sums, counts = np.asarray(arrays["sums"]), np.asarray(arrays["counts"])
        if sums.shape != (len(vms), store.n_slots, C) or counts.shape != sums.shape:
            raise ValueError(f"window snapshot arrays of shape {sums.shape}/{counts.shape}, expected {(len(vms), store.n_slots, C)}")
        if counts.dtype.kind not in "ui" or (counts.dtype.kind == "i" and counts.size and int(counts.min()) < 0):
            raise ValueError(f"window snapshot counts must be non-negative integers, got {counts.dtype}")
        profile = _profile_array(arrays, "profile", (len(vms), store.slots_per_day, len(TARGETS))) if version >= 3 else None
        week = _profile_array(arrays, "week", (len(vms), store.week_buckets, len(TARGETS))) if version >= 4 else None
        n = len(vms)  # a fresh store hands out rows 0..n-1 in order
        dense = n == 0 or (int(rows[0]) == 0 and int(rows[-1]) == n - 1)
        for lo in range(0, n, SNAPSHOT_CHUNK_ROWS):  # chunks: no whole-store int32/float32 temporaries
            hi = min(n, lo + SNAPSHOT_CHUNK_ROWS)
            pick = slice(lo, hi) if dense else xp.asarray(rows[lo:hi])
            store.sums[pick] = xp.asarray(sums[lo:hi], dtype=xp.float32)
            store.counts[pick] = xp.asarray(counts[lo:hi])  # cast to int32 on assignment
            if profile is not None:
                store.profile[pick] = xp.asarray(profile[lo:hi], dtype=xp.float32)
            if week is not None:
                store.week[pick] = xp.asarray(week[lo:hi], dtype=xp.float32)
        return store


def _profile_array(arrays: dict[str, np.ndarray], name: str, want: tuple[int, ...]) -> np.ndarray:
    """A snapshot's daily or weekly profile, checked for shape and a float dtype."""
    a = np.asarray(arrays[name])
    if a.shape != want or a.dtype.kind != "f":
        raise ValueError(f"window snapshot {name} of shape {a.shape} ({a.dtype}), expected {want} float")
    return a


def values_col(values: np.ndarray, name: str) -> np.ndarray:
    """One metric column of a samples array, float32."""
    return np.asarray(values, dtype=np.float32)[:, _M[name]]
