"""Readers of the real public VM traces (Bitbrains, Azure V1, PlanetLab).

Each reader turns one trace format into the input contract's fields, one
DataFrame per VM, so replay, training and evaluation all see the same clean
series. Column mapping and cleaning rules (documented in README "Simulator and
replay"):

- duplicated timestamps: the last row wins; the count is in ``df.attrs["duplicates"]``;
- zero capacity (Bitbrains rows with 0 cores or 0 memory capacity): the fields
  measured against that capacity become NaN (omitted when sent), never 0;
- values outside the contract (Bitbrains CPU % above 100, memory used above
  capacity) are clipped; the count is in ``df.attrs["clipped"]``;
- gaps are left as they are.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

# 2024-01-01T00:00:00Z: where traces without absolute time (Azure, PlanetLab) start.
DEFAULT_START_TS: float = 1704067200.0
STEP_S = 300.0
BITBRAINS_PSEUDO_HOSTS = 25
PSEUDO_HOSTS = 25
FORMATS = ("bitbrains", "azure", "planetlab")

_BB_COLUMNS = {
    "Timestamp [ms]": "ts",  # the header lies: the values are epoch seconds
    "CPU cores": "vcpus",
    "CPU capacity provisioned [MHZ]": "cpu_capacity_mhz",
    "CPU usage [%]": "cpu_pct",
    "Memory capacity provisioned [KB]": "mem_total_kb",
    "Memory usage [KB]": "mem_used_kb",
    "Disk read throughput [KB/s]": "disk_read_kbps",
    "Disk write throughput [KB/s]": "disk_write_kbps",
    "Network received throughput [KB/s]": "net_rx_kbps",
    "Network transmitted throughput [KB/s]": "net_tx_kbps",
}
_BB_OUT = ["ts", "cpu_pct", "mem_total_mb", "mem_used_mb", "disk_read_kbps", "disk_write_kbps",
           "net_rx_kbps", "net_tx_kbps", "vcpus", "host"]


def parse_vm_spec(spec: str) -> list[int]:
    """``"1-5,9"`` -> ``[1, 2, 3, 4, 5, 9]`` (order kept, duplicates dropped)."""
    out: list[int] = []
    seen: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if not m:
            raise ValueError(f"bad VM spec {part!r} in {spec!r}: use numbers and ranges like 1-5,9")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) else lo
        if hi < lo:
            raise ValueError(f"bad VM range {part!r}: end before start")
        for i in range(lo, hi + 1):
            if i not in seen:
                seen.add(i)
                out.append(i)
    if not out:
        raise ValueError(f"empty VM spec {spec!r}")
    return out


def iter_trace(
    fmt: str, path: Path | str, vms: str | None = None, start_ts: float = DEFAULT_START_TS
) -> Iterator[tuple[str, pd.DataFrame]]:
    """Yield ``(vm_id, df)`` per VM: df sorted by ``ts`` with contract columns (see module doc)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"trace path {path} does not exist")
    if fmt == "bitbrains":
        yield from _iter_bitbrains(path, vms)
    elif fmt == "azure":
        yield from _iter_azure(path, vms, start_ts)
    elif fmt == "planetlab":
        yield from _iter_planetlab(path, vms, start_ts)
    else:
        raise ValueError(f"unknown trace format {fmt!r}; expected one of {', '.join(FORMATS)}")


# --- Bitbrains ----------------------------------------------------------------

def bitbrains_files(path: Path, vms: str | None = None) -> list[tuple[int, Path]]:
    """(number, file) of the Bitbrains VMs selected by ``vms`` (all when None), by number."""
    if path.is_file():
        return [(int(path.name.split(".")[0]), path)]
    found = {int(p.name.split(".")[0]): p for p in path.glob("*.csv*") if p.name.split(".")[0].isdigit()}
    if not found:
        raise FileNotFoundError(f"no Bitbrains <n>.csv[.gz] files in {path}")
    if vms is None:
        return sorted(found.items())
    wanted = parse_vm_spec(vms)
    missing = [n for n in wanted if n not in found]
    if missing:
        raise FileNotFoundError(f"Bitbrains VM file(s) {missing[:10]} not found in {path}")
    return [(n, found[n]) for n in wanted]


def read_bitbrains_raw(file: Path) -> pd.DataFrame:
    """The file as published (`;` + tab separated), columns renamed, rows unchanged."""
    # sep=';' with skipinitialspace parses the ';\t' separator with the fast C engine.
    df = pd.read_csv(file, sep=";", skipinitialspace=True, engine="c")
    df.columns = [c.strip() for c in df.columns]
    missing = [c for c in _BB_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{file}: not a Bitbrains trace, missing columns {missing}")
    return df.rename(columns=_BB_COLUMNS)


def _iter_bitbrains(path: Path, vms: str | None) -> Iterator[tuple[str, pd.DataFrame]]:
    for n, file in bitbrains_files(path, vms):
        raw = read_bitbrains_raw(file)
        out = pd.DataFrame({"ts": raw["ts"].to_numpy(np.float64)})
        cores = raw["vcpus"].to_numpy(np.float64)
        cpu_cap = raw["cpu_capacity_mhz"].to_numpy(np.float64)
        mem_cap = raw["mem_total_kb"].to_numpy(np.float64) / 1024.0
        mem_used = raw["mem_used_kb"].to_numpy(np.float64) / 1024.0
        cpu = raw["cpu_pct"].to_numpy(np.float64)
        no_cpu = (cores <= 0) | (cpu_cap <= 0)
        no_mem = mem_cap <= 0
        clipped = int(np.count_nonzero((cpu > 100) & ~no_cpu) + np.count_nonzero((mem_used > mem_cap) & ~no_mem))
        out["cpu_pct"] = np.where(no_cpu, np.nan, np.clip(cpu, 0.0, 100.0))
        out["mem_total_mb"] = np.where(no_mem, np.nan, mem_cap)
        out["mem_used_mb"] = np.where(no_mem, np.nan, np.minimum(mem_used, mem_cap))
        for col in ("disk_read_kbps", "disk_write_kbps", "net_rx_kbps", "net_tx_kbps"):
            out[col] = np.clip(raw[col].to_numpy(np.float64), 0.0, None)
        out["vcpus"] = np.where(cores <= 0, np.nan, cores)
        out["host"] = f"bb-host-{n % BITBRAINS_PSEUDO_HOSTS:02d}"
        yield f"bb-{n:04d}", _finish(out[_BB_OUT], clipped=clipped, zero_capacity=int(np.count_nonzero(no_cpu | no_mem)))


# --- Azure V1 -----------------------------------------------------------------

def _azure_file(path: Path) -> Path:
    if path.is_file():
        return path
    files = sorted(path.glob("microsoft_avg_*.csv*")) or sorted(path.glob("*.csv*"))
    if not files:
        raise FileNotFoundError(f"no microsoft_avg_<N>.csv[.gz] in {path}")
    return files[0]


def _iter_azure(path: Path, vms: str | None, start_ts: float) -> Iterator[tuple[str, pd.DataFrame]]:
    wide = pd.read_csv(_azure_file(path))
    if "step_5min" not in wide.columns:
        raise ValueError(f"{path}: not an Azure V1 wide CSV (no step_5min column)")
    ts = start_ts + wide["step_5min"].to_numpy(np.float64) * STEP_S
    cols = [c for c in wide.columns if c != "step_5min"]
    for i in _select(len(cols), vms):
        col = cols[i - 1]
        cpu = wide[col].to_numpy(np.float64)
        df = pd.DataFrame({"ts": ts, "cpu_pct": np.clip(cpu, 0.0, 100.0), "host": f"az-host-{i % PSEUDO_HOSTS:02d}"})
        yield f"az-{col}", _finish(df, clipped=int(np.count_nonzero(cpu > 100)), zero_capacity=0)


# --- PlanetLab ----------------------------------------------------------------

def _planetlab_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(path.glob("planetlab_*_wide.csv*"), key=lambda p: p.name)  # yyyymmdd sorts by date
    if not files:
        raise FileNotFoundError(f"no planetlab_<date>_wide.csv[.gz] in {path}")
    return files


def _iter_planetlab(path: Path, vms: str | None, start_ts: float) -> Iterator[tuple[str, pd.DataFrame]]:
    """Days in file-date order, day k of the list anchored at ``start_ts + k * 86400``."""
    frames = []
    for day, file in enumerate(_planetlab_files(path)):
        wide = pd.read_csv(file)
        steps = [c for c in wide.columns if c != "vm"]
        long = wide.melt(id_vars="vm", value_vars=steps, var_name="t", value_name="cpu_pct")
        long["ts"] = start_ts + day * 86400.0 + long["t"].str[1:].astype(np.float64) * STEP_S
        frames.append(long[["vm", "ts", "cpu_pct"]])
    allrows = pd.concat(frames, ignore_index=True)
    names = sorted(allrows["vm"].astype(str).unique())
    groups = dict(tuple(allrows.groupby("vm", sort=False)))
    for i in _select(len(names), vms):
        name = names[i - 1]
        g = groups[name]
        cpu = g["cpu_pct"].to_numpy(np.float64)
        df = pd.DataFrame({"ts": g["ts"].to_numpy(np.float64), "cpu_pct": np.clip(cpu, 0.0, 100.0),
                           "host": f"pl-host-{i % PSEUDO_HOSTS:02d}"})
        yield f"pl-{name}", _finish(df, clipped=int(np.count_nonzero(cpu > 100)), zero_capacity=0)


# --- shared -------------------------------------------------------------------

def _select(n: int, vms: str | None) -> list[int]:
    """1-based indices chosen by the spec (all when None), checked against ``n``."""
    if vms is None:
        return list(range(1, n + 1))
    wanted = parse_vm_spec(vms)
    bad = [i for i in wanted if not 1 <= i <= n]
    if bad:
        raise ValueError(f"VM index(es) {bad[:10]} out of range 1..{n}")
    return wanted


def _finish(df: pd.DataFrame, *, clipped: int, zero_capacity: int) -> pd.DataFrame:
    """Sort by time (stable), keep the last row of each duplicated timestamp, attach counts."""
    n = len(df)
    df = df.sort_values("ts", kind="stable")
    df = df.drop_duplicates("ts", keep="last").reset_index(drop=True)
    df["host"] = df["host"].astype(str)
    df.attrs.update(rows_read=n, duplicates=n - len(df), clipped=clipped, zero_capacity=zero_capacity)
    return df
