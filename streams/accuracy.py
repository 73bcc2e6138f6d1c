"""Live accuracy: the realised error of the forecasts a worker served, and of the naive baselines.

For a deterministic sample of VMs (``accuracy_sample``: a VM is tracked when the
SipHash of its id, ``pandas.util.hash_array``, falls in that fraction, the same VMs in
every worker and every restart; at most ``accuracy_max_vms`` per worker), every time
the forecaster runs for a VM (once per VM per slot, ``Scorer._forecast``) this keeps,
for each grid horizon ``h`` of the model up to 24 h (the buckets'), the served median (q50), persistence
(``last``) and the seasonal naive forecast (``seasonal``) for target slot ``o + h``
(``o`` = the VM's newest slot). When a later forecast run of that VM finds its newest
slot past ``o + h`` (the slot is complete), the slot's mean from the window the model
is about to read is the realised value: the pair is measured with the shared measure
(``gpu_kernels.accuracy``: buckets, methods, NaN rule) and added to the worker's
``zhuge_forecast_abs_error`` summary (``app.metrics.ForecastErrors``). Definitions in
``gpu_kernels.accuracy`` and README "Metrics".

Cost: nothing more is read from the window store (the window the model runs on is
reused); the work is vectorised over the tracked VMs of a forecast run. Memory per
tracked VM: for each grid horizon ``h`` a ring of ``h + 1`` pending forecasts (origin
int32 + 3 methods x 3 targets float32 = 40 bytes each): 48 KB with the default grid
(24 h horizon, 1,212 cells), 1.7 KB for a 1 h horizon. The pool grows by doubling up
to ``accuracy_max_vms``; a slot whose VM was not forecast for ``vm_ttl_s`` (wall clock)
is reused when the pool is full (the window store has evicted that VM by then).

Not kept anywhere: pending forecasts are lost on a worker restart (nothing crashes;
the pairs of those forecasts are never counted). They survive a partition rebuild
(the tracker is per worker, keyed by VM id). A model with another horizon grid drops
the pending forecasts; a new model for the same grid replaces the pending forecast of
the current slot (the one served from then on). Samples that arrive for a slot after
it was realised do not change that pair.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from gpu_kernels.accuracy import METHODS, ErrorTally, bucket_index, error_sums, naive_forecasts
from gpu_kernels.features import DAY_S, TARGETS, WINDOW_CHANNELS
from gpu_kernels.xp import to_numpy

log = logging.getLogger(__name__)

_TARGET_CH = [WINDOW_CHANNELS.index(t) for t in TARGETS]
_M, _T = len(METHODS), len(TARGETS)
_HASH_SPAN = float(2**64)
Sink = Callable[[np.ndarray, np.ndarray], None]  # (sums (T, B, M), counts (T, B))


def sampled(vms: Any, fraction: float) -> np.ndarray:
    """Mask of the VM ids tracked at ``fraction`` (deterministic: SipHash of the UTF-8 id, fixed key)."""
    ids = np.asarray(vms, dtype=object).reshape(-1)
    if fraction >= 1.0:
        return np.ones(ids.shape[0], dtype=bool)
    if fraction <= 0.0 or ids.size == 0:
        return np.zeros(ids.shape[0], dtype=bool)
    h = pd.util.hash_array(ids, categorize=False)  # uint64, fixed hash key: the same in every process
    return h.astype(np.float64) < fraction * _HASH_SPAN


class LiveAccuracy:
    """Pending forecasts of the tracked VMs and the realised errors (see module doc). One per worker.

    ``sink(sums, counts)`` receives each forecast run's new pairs (``gpu_kernels.accuracy.error_sums``
    layout); ``tracked`` (optional) is told the number of tracked VMs. ``totals()`` gives the
    cumulative sums and counts (tests, benchmarks).
    """

    def __init__(
        self,
        sample: float,
        max_vms: int,
        slot_s: int,
        sink: Sink | None = None,
        tracked: Callable[[int], None] | None = None,
        idle_s: float = 6 * 3600,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sample, self.max_vms, self.slot_s = float(sample), int(max_vms), int(slot_s)
        self.season = max(1, DAY_S // self.slot_s)
        self.sink, self.tracked_cb, self.idle_s, self.clock = sink, tracked, float(idle_s), clock
        self.tally = ErrorTally()  # every pair realised so far
        self.horizons: np.ndarray | None = None
        self._errors_logged = 0.0
        self._reset(np.zeros(0, dtype=np.int64))

    @classmethod
    def from_settings(cls, settings: Any, metrics: Any = None) -> LiveAccuracy | None:
        """The worker's tracker (None when ``accuracy_sample`` or ``accuracy_max_vms`` is 0)."""
        if settings.accuracy_sample <= 0 or settings.accuracy_max_vms <= 0:
            return None
        errors = getattr(metrics, "forecast_errors", None)
        return cls(
            settings.accuracy_sample, settings.accuracy_max_vms, settings.slot_s,
            sink=None if errors is None else errors.add, tracked=None if errors is None else errors.set_tracked,
            idle_s=settings.vm_ttl_s,
        )  # fmt: skip

    # ------------------------------------------------------------------ layout
    def _reset(self, horizons: np.ndarray) -> None:
        """Lay the pending rings out for a horizon grid (drops whatever was pending)."""
        h = np.asarray(horizons, dtype=np.int64).reshape(-1)
        self.horizons = h
        self.kept = np.flatnonzero(bucket_index(h * self.slot_s) >= 0)  # grid points beyond 24 h: not measured
        self.ring = h[self.kept] + 1  # forecasts of horizon h stay pending for at most h + 1 origins
        self.offset = np.concatenate([[0], np.cumsum(self.ring)[:-1]]).astype(np.int64)
        self.n_cells = int(self.ring.sum())
        self.cell_h = np.repeat(h[self.kept], self.ring)
        self.cell_bucket = bucket_index(self.cell_h * self.slot_s)
        self.slot_of: dict[str, int] = {}
        self.vm_at: list[str | None] = []
        self.free: list[int] = []
        self.touched = np.zeros(0, dtype=np.float64)
        self.origin = np.zeros((0, self.n_cells), dtype=np.int32)
        self.fc = np.zeros((0, self.n_cells, _M, _T), dtype=np.float32)
        self._report_tracked()

    @property
    def bytes_per_vm(self) -> int:
        """Bytes one tracked VM costs with the current grid (pending rings)."""
        return self.n_cells * (4 + _M * _T * 4)

    @property
    def nbytes(self) -> int:
        return int(self.origin.nbytes + self.fc.nbytes + self.touched.nbytes)

    def __len__(self) -> int:
        return len(self.slot_of)

    def _report_tracked(self) -> None:
        if self.tracked_cb is not None:
            self.tracked_cb(len(self.slot_of))

    def _grow(self) -> bool:
        cap = self.origin.shape[0]
        if cap >= self.max_vms:
            return False
        new = min(self.max_vms, max(8, cap * 2))
        origin = np.full((new, self.n_cells), -1, dtype=np.int32)
        fc = np.zeros((new, self.n_cells, _M, _T), dtype=np.float32)
        touched = np.zeros(new, dtype=np.float64)
        origin[:cap], fc[:cap], touched[:cap] = self.origin, self.fc, self.touched
        self.origin, self.fc, self.touched = origin, fc, touched
        self.vm_at += [None] * (new - cap)
        self.free.extend(range(new - 1, cap - 1, -1))
        return True

    def _reclaim(self, now: float) -> None:
        """Free the slots of VMs not forecast for ``idle_s`` (the store evicted them)."""
        idle = np.flatnonzero(self.touched < now - self.idle_s)
        for p in idle.tolist():
            vm = self.vm_at[p]
            if vm is not None:
                del self.slot_of[vm]
                self.vm_at[p] = None
                self.origin[p] = -1
                self.free.append(p)

    def _slots(self, ids: Sequence[str], now: float) -> np.ndarray:
        """Pool slots of the (sampled) ids, allocated for new ones; -1 where the pool is full."""
        out = np.fromiter((self.slot_of.get(vm, -1) for vm in ids), dtype=np.int64, count=len(ids))
        self.touched[out[out >= 0]] = now  # never reclaimed below
        for i in np.flatnonzero(out < 0).tolist():  # new VMs only
            if not self.free and not self._grow():
                self._reclaim(now)
            if not self.free:
                continue  # the pool is full: this VM is not tracked
            p = self.free.pop()
            self.slot_of[ids[i]] = p
            self.vm_at[p] = ids[i]
            self.origin[p] = -1
            self.touched[p] = now
            out[i] = p
        return out

    # ------------------------------------------------------------------ the hot path
    def observe(self, vms: Sequence[str], rows: Any, last_slot: Any, win: Any, pred: Any, horizons: Any) -> None:
        """One forecast run: realise what became due, then keep the new forecasts. Never raises.

        ``vms`` ids of the chunk, ``rows`` indices into ``vms`` of the VMs the model ran for,
        ``last_slot (len(rows),)`` their newest slots, ``win (len(rows), S, C)`` the windows the
        model read and ``pred (len(rows), H, len(TARGETS), 2)`` its output (NumPy or CuPy).
        """
        try:
            self._observe(vms, rows, last_slot, win, pred, horizons)
        except Exception:  # accuracy is an observer: it must never stop scoring
            now = time.monotonic()
            if now - self._errors_logged > 60:
                self._errors_logged = now
                log.exception("live accuracy tracking failed (scoring goes on)")

    def _observe(self, vms: Sequence[str], rows: Any, last_slot: Any, win: Any, pred: Any, horizons: Any) -> None:
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            return
        h = np.asarray(horizons, dtype=np.int64).reshape(-1)
        if self.horizons is None or not np.array_equal(h, self.horizons):
            self._reset(h)
        if self.n_cells == 0:
            return
        ids = np.asarray(vms, dtype=object)[rows]
        pick = np.flatnonzero(sampled(ids, self.sample))
        if pick.size == 0:
            return
        now = self.clock()
        slots = self._slots(ids[pick].tolist(), now)
        pick, p = pick[slots >= 0], slots[slots >= 0]
        if pick.size == 0:
            self._report_tracked()
            return
        ls = np.asarray(last_slot, dtype=np.int64)[pick]
        xp_pick = pick if isinstance(win, np.ndarray) else _device_index(win, pick)
        tw = to_numpy(win[xp_pick][:, :, _TARGET_CH]).astype(np.float32, copy=False)  # (n, S, T)
        q50 = to_numpy(pred[xp_pick][:, :, :, 0]).astype(np.float32, copy=False)  # (n, H, T)
        self._realise(p, ls, tw)
        self._record(p, ls, tw, q50)
        self._report_tracked()

    def _realise(self, p: np.ndarray, ls: np.ndarray, tw: np.ndarray) -> None:
        """Pairs whose target slot the VMs' newest slots moved past: measured, then forgotten."""
        n, S, _ = tw.shape
        origin = self.origin[p].astype(np.int64)  # (n, cells)
        target = origin + self.cell_h[None, :]
        i, c = np.nonzero((origin >= 0) & (target < ls[:, None]))
        if i.size == 0:
            return
        pos = S - 1 - (ls[i] - target[i, c])  # window index of the target slot
        inside = pos >= 0
        actual = tw[i, np.clip(pos, 0, S - 1), :]  # (m, T)
        actual[~inside] = np.nan  # out of the window by now (the VM was silent): skipped
        f = self.fc[p[i], c]  # (m, M, T)
        sums, counts = error_sums(actual, [f[:, m, :] for m in range(_M)], self.cell_bucket[c])
        self.origin[p[i], c] = -1
        if counts.any():
            self.tally.add(sums, counts)
            if self.sink is not None:
                self.sink(sums, counts)

    def _record(self, p: np.ndarray, ls: np.ndarray, tw: np.ndarray, q50: np.ndarray) -> None:
        """Keep each VM's forecast at every grid horizon in its ring cell for this origin."""
        n, S, T = tw.shape
        hist = tw.transpose(0, 2, 1).reshape(n * T, S)
        last, seas = naive_forecasts(hist, self.horizons[self.kept], self.season)  # (n*T,), (n*T, K)
        last = last.reshape(n, T)
        seas = seas.reshape(n, T, -1).transpose(0, 2, 1)  # (n, K, T)
        cells = self.offset[None, :] + ls[:, None] % self.ring[None, :]  # (n, K)
        rows = p[:, None]
        self.origin[rows, cells] = ls[:, None].astype(np.int32)
        self.fc[rows, cells, 0, :] = q50[:, self.kept]
        self.fc[rows, cells, 1, :] = last[:, None, :]
        self.fc[rows, cells, 2, :] = seas

    def totals(self) -> tuple[np.ndarray, np.ndarray]:
        return self.tally.sums.copy(), self.tally.counts.copy()


def _device_index(win: Any, idx: np.ndarray) -> Any:
    from gpu_kernels.features import array_module

    return array_module(win).asarray(idx)
