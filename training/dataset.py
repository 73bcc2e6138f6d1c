"""Samples -> per-VM regular slot grids -> training examples at many origins.

The channel derivation is the serving one (ARCHITECTURE.md, window tensor):
``cpu_pct``, ``dirty_mbps`` (measured, else ``dirty_rate_proxy``),
``net_mbps = (rx + tx) / 1024``, ``mem_used_mb``; samples are averaged into
``slot_s`` slots and empty slots are NaN, exactly what the window store keeps.
A model trained here therefore sees the same inputs as the scorer.

Sources: the trace readers (``sim.traces.iter_trace``) or the worker's Parquet
history archive (hive-partitioned ``date=/hour=``, columns ``vm, host, ts`` +
contract fields). ``grids_from_history_dask`` builds grids on Dask workers, one
task per VM group; with cuDF installed, ``dask.config.set({"dataframe.backend":
"cudf"})`` makes the archive read land on the GPU (not testable on CPU boxes).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

CHANNELS = ("cpu_pct", "dirty_mbps", "net_mbps", "mem_used_mb")  # == features.WINDOW_CHANNELS


@dataclass(frozen=True)
class SlotGrid:
    """One VM's history on a regular slot grid.

    ``values[t]`` is slot ``first_slot + t`` (absolute slot ``floor(ts / slot_s)``),
    channels in ``CHANNELS`` order, NaN where the slot had no sample.
    """

    vm: str
    first_slot: int
    values: np.ndarray  # (T, C) float32
    mem_total_mb: float
    vcpus: float
    host: str = ""

    @property
    def n_slots(self) -> int:
        return int(self.values.shape[0])

    @property
    def last_slot(self) -> int:
        return self.first_slot + self.n_slots - 1


def _col(df: pd.DataFrame, name: str) -> np.ndarray:
    if name in df.columns:
        return pd.to_numeric(df[name], errors="coerce").to_numpy(dtype=np.float64)
    return np.full(len(df), np.nan)


def _last_valid(a: np.ndarray) -> float:
    ok = np.flatnonzero(np.isfinite(a) & (a > 0))
    return float(a[ok[-1]]) if ok.size else float("nan")


def sample_channels(df: pd.DataFrame) -> np.ndarray:
    """Per-sample channel values ``(n, C)`` from contract columns (serving derivation)."""
    cpu = _col(df, "cpu_pct")
    mem_used = _col(df, "mem_used_mb")
    rx, tx = _col(df, "net_rx_kbps"), _col(df, "net_tx_kbps")
    net = np.where(np.isnan(rx) & np.isnan(tx), np.nan, (np.nan_to_num(rx) + np.nan_to_num(tx)) / 1024.0)
    dirty = _col(df, "dirty_mbps")
    missing = np.isnan(dirty)
    if missing.any():
        from gpu_kernels.downtime import dirty_rate_proxy

        proxy = np.asarray(
            dirty_rate_proxy(
                cpu_pct=cpu,
                vcpus=_col(df, "vcpus"),
                mem_used_mb=mem_used,
                disk_write_kbps=_col(df, "disk_write_kbps"),
            ),
            dtype=np.float64,
        )
        dirty = np.where(missing, proxy, dirty)
    return np.stack([cpu, dirty, net, mem_used], axis=1)


def slot_grid(vm: str, df: pd.DataFrame, slot_s: int = 300) -> SlotGrid:
    """Average one VM's samples into regular slots; duplicated timestamps keep the last sample."""
    if "ts" not in df.columns:
        raise ValueError(f"VM {vm!r}: samples need a 'ts' column (epoch seconds)")
    df = df[np.isfinite(pd.to_numeric(df["ts"], errors="coerce"))]
    if df.empty:
        raise ValueError(f"VM {vm!r}: no samples with a valid timestamp")
    df = df.sort_values("ts", kind="stable").drop_duplicates("ts", keep="last")
    slots = np.floor(df["ts"].to_numpy(dtype=np.float64) / slot_s).astype(np.int64)
    first = int(slots[0])
    rel = slots - first
    n = int(rel[-1]) + 1
    chans = sample_channels(df)
    ok = ~np.isnan(chans)
    values = np.empty((n, chans.shape[1]), dtype=np.float32)
    for c in range(chans.shape[1]):  # C = 4 channels; the work is the vectorised bincount
        total = np.bincount(rel[ok[:, c]], weights=chans[ok[:, c], c], minlength=n)
        count = np.bincount(rel[ok[:, c]], minlength=n)
        values[:, c] = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    host = str(df["host"].iloc[-1]) if "host" in df.columns else ""
    return SlotGrid(
        vm=str(vm),
        first_slot=first,
        values=values,
        mem_total_mb=_last_valid(_col(df, "mem_total_mb")),
        vcpus=_last_valid(_col(df, "vcpus")),
        host=host,
    )


def grids_from_frames(frames: Iterable[tuple[str, pd.DataFrame]], slot_s: int = 300) -> list[SlotGrid]:
    """Slot grids for ``(vm, samples)`` pairs; VMs without a valid sample are skipped."""
    out = []
    for vm, df in frames:
        if len(df):
            try:
                out.append(slot_grid(vm, df, slot_s))
            except ValueError:
                continue
    return out


def grids_from_trace(fmt: str, path: str, vms: str | None = None, slot_s: int = 300) -> list[SlotGrid]:
    """Slot grids from a public trace (``sim.traces.iter_trace``; ``vms`` like ``"1-5,9"``)."""
    from sim.traces import iter_trace

    return grids_from_frames(iter_trace(fmt, path, vms=vms), slot_s)


# --- Parquet history archive ---------------------------------------------------------


def _archive_root(url: str) -> tuple[Any, str]:
    """``(filesystem, root)`` of a history archive that holds Parquet files; FileNotFoundError otherwise.

    Why the second check: a worker writes its offset marks (``_offsets/``) into the archive as
    soon as it takes a partition, so an archive can exist before its first flush."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    if not fs.exists(root):
        raise FileNotFoundError(f"history archive {url!r} does not exist")
    if not fs.glob(f"{root.rstrip('/')}/date=*/hour=*/*.parquet"):
        raise FileNotFoundError(f"history archive {url!r} holds no Parquet file yet (workers flush every ZHUGE_HISTORY_FLUSH_S)")
    return fs, root


def read_history(url: str, since_ts: float | None = None) -> pd.DataFrame:
    """The worker's Parquet archive (hive ``date=/hour=``) as one pandas frame, oldest first."""
    import pyarrow.dataset as ds

    fs, root = _archive_root(url)
    dataset = ds.dataset(root, filesystem=fs, format="parquet", partitioning="hive")
    flt = ds.field("ts") >= since_ts if since_ts is not None else None
    table = dataset.to_table(filter=flt)
    df = table.to_pandas()
    return df.drop(columns=[c for c in ("date", "hour") if c in df.columns]).sort_values(["vm", "ts"])


def grids_from_history(url: str, slot_s: int = 300, since_ts: float | None = None) -> list[SlotGrid]:
    """Slot grids for every VM of the archive (in this process)."""
    return _grids_by_vm(read_history(url, since_ts), slot_s)


def _grids_by_vm(df: pd.DataFrame, slot_s: int) -> list[SlotGrid]:
    return grids_from_frames(((str(vm), g) for vm, g in df.groupby("vm", sort=True)), slot_s)


def grid_tasks_from_history(url: str, slot_s: int = 300, n_groups: int = 8) -> list:
    """Dask delayed tasks, one per VM group, each returning that group's slot grids.

    The archive is read with ``dask.dataframe`` (cuDF when that backend is set)
    and shuffled by VM so each group holds whole VMs.
    """
    import dask
    import dask.dataframe as dd

    _archive_root(url)
    ddf = dd.read_parquet(url)
    keep = [c for c in ddf.columns if c not in ("date", "hour")]
    ddf = ddf[keep]
    ddf = ddf.shuffle("vm", npartitions=max(1, n_groups))
    parts = ddf.to_delayed()
    fn = dask.delayed(_grids_by_vm, pure=True)
    return [fn(p, slot_s) for p in parts]


# --- slicing helpers ---------------------------------------------------------------


def window_at(grid: SlotGrid, origins: np.ndarray, span: int) -> np.ndarray:
    """Windows ``(n, span, C)`` ending at grid rows ``origins`` (inclusive); NaN before the start."""
    origins = np.asarray(origins, dtype=np.int64)
    idx = origins[:, None] - span + 1 + np.arange(span)[None, :]
    out = np.full((origins.size, span, grid.values.shape[1]), np.nan, dtype=np.float32)
    ok = (idx >= 0) & (idx < grid.n_slots)
    out[ok] = grid.values[idx[ok]]
    return out


def future_at(grid: SlotGrid, origins: np.ndarray, horizons: np.ndarray) -> np.ndarray:
    """Actual values ``(n, H, C)`` at rows ``origins + horizons``; NaN past the end."""
    idx = np.asarray(origins, dtype=np.int64)[:, None] + np.asarray(horizons, dtype=np.int64)[None, :]
    out = np.full(idx.shape + (grid.values.shape[1],), np.nan, dtype=np.float32)
    ok = (idx >= 0) & (idx < grid.n_slots)
    out[ok] = grid.values[idx[ok]]
    return out


# --- aligned panel and training examples --------------------------------------------


@dataclass(frozen=True)
class Panel:
    """Grids aligned on one slot axis: ``series[v, t]`` is slot ``first_slot + t`` of VM v."""

    vms: list[str]
    first_slot: int
    series: np.ndarray  # (V, T, C) float32, NaN outside each VM's life and in gaps
    mem_total_mb: np.ndarray  # (V,) float32
    vcpus: np.ndarray  # (V,) float32

    @property
    def n_slots(self) -> int:
        return int(self.series.shape[1])

    def attrs(self, idx: np.ndarray | slice = slice(None)) -> dict[str, np.ndarray]:
        return {"mem_total_mb": self.mem_total_mb[idx], "vcpus": self.vcpus[idx]}

    def subset(self, idx: np.ndarray) -> Panel:
        idx = np.asarray(idx)
        return Panel([self.vms[i] for i in idx], self.first_slot, self.series[idx], self.mem_total_mb[idx], self.vcpus[idx])


def panel_from_grids(
    grids: Sequence[SlotGrid], default_mem_mb: float | None = None, zero_unmeasured_net: bool = False
) -> Panel:
    """Align grids on the union of their slot ranges (NaN padding).

    ``default_mem_mb`` fills an unknown ``mem_total_mb`` (CPU-only traces), so
    the downtime model has a memory size to work with. ``zero_unmeasured_net``
    sets ``net_mbps`` to 0 where a VM has CPU samples when no VM of the source ever
    reported network (CPU-only traces): the model then has a label for every target
    and the whole link is free for the migration. Both are documented where used.
    """
    if not grids:
        raise ValueError("no VM with usable samples")
    first = min(g.first_slot for g in grids)
    last = max(g.last_slot for g in grids)
    series = np.full((len(grids), last - first + 1, len(CHANNELS)), np.nan, dtype=np.float32)
    for v, g in enumerate(grids):  # one block copy per VM
        series[v, g.first_slot - first : g.last_slot - first + 1] = g.values
    c_net, c_cpu = CHANNELS.index("net_mbps"), CHANNELS.index("cpu_pct")
    if zero_unmeasured_net and np.isnan(series[:, :, c_net]).all():
        series[:, :, c_net] = np.where(np.isnan(series[:, :, c_cpu]), np.nan, np.float32(0.0))
    mem = np.array([g.mem_total_mb for g in grids], dtype=np.float32)
    if default_mem_mb is not None:
        mem = np.where(np.isfinite(mem) & (mem > 0), mem, np.float32(default_mem_mb))
    vcpus = np.array([g.vcpus for g in grids], dtype=np.float32)
    return Panel([g.vm for g in grids], first, series, mem, vcpus)


def sample_origins(
    n_slots: int, lo: int, hi: int, every: int, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Origins ``lo, lo + every, ...`` below ``hi`` (with a random phase when ``rng`` is given)."""
    lo = max(0, lo)
    hi = min(hi, n_slots)
    phase = int(rng.integers(0, every)) if rng is not None and every > 1 else 0
    return np.arange(lo + phase, hi, every, dtype=np.int64)


def panel_examples(
    panel: Panel,
    origins: np.ndarray,
    horizons: np.ndarray,
    window_slots: int,
    slot_s: int,
    end: int | None = None,
    chunk_vms: int = 32,
    with_index: bool = False,
) -> tuple[np.ndarray, ...]:
    """(X, Y) at ``origins`` for every VM, labels only from slots before ``end`` (exclusive).

    Uses ``gpu_kernels.features.training_examples`` (the serving feature code);
    VMs go in chunks so the stacked windows stay small in memory. ``with_index`` adds each
    row's VM (index into ``panel.vms``) and origin slot: ``(X, Y, vm, origin)``.
    """
    from gpu_kernels.features import FEATURE_NAMES, TARGETS, training_examples

    end = panel.n_slots if end is None else end
    origins = np.asarray(origins, dtype=np.int64)
    origins = origins[origins < end - 1]
    parts: list[tuple[np.ndarray, ...]] = []
    for lo in range(0, len(panel.vms), chunk_vms):
        idx = np.arange(lo, min(lo + chunk_vms, len(panel.vms)))
        if origins.size == 0:
            break
        X, Y, vm, origin = training_examples(
            panel.series[idx, :end], panel.attrs(idx), panel.first_slot, origins, horizons, window_slots, slot_s, with_index=True
        )
        # drop rows whose window holds no observation at all (VM not alive yet)
        keep = ~np.isnan(X[:, FEATURE_NAMES.index("cpu_last")])
        parts.append((X[keep], Y[keep], idx[vm[keep]], origin[keep]))
    if parts:
        out = tuple(np.concatenate(a) for a in zip(*parts))
    else:
        out = (np.empty((0, len(FEATURE_NAMES)), np.float32), np.empty((0, len(TARGETS)), np.float32),
               np.empty(0, np.int64), np.empty(0, np.int64))  # fmt: skip
    return out if with_index else out[:2]
