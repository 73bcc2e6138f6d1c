"""Trace readers on the real files (skipped when ../shared/data is absent)."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sim.traces import DEFAULT_START_TS, iter_trace, parse_vm_spec

DATA = Path(os.environ.get("ZHUGE_DATA_DIR", Path(__file__).resolve().parents[2].parent / "shared" / "data"))
BB = DATA / "bitbrains-rnd-2013-08"
AZ = DATA / "azure-v1-100"
PL = DATA / "planetlab"
CONTRACT = {"ts", "cpu_pct", "mem_total_mb", "mem_used_mb", "disk_read_kbps", "disk_write_kbps",
            "net_rx_kbps", "net_tx_kbps", "vcpus", "host"}


def need(p: Path) -> None:
    if not p.exists():
        pytest.skip(f"{p} absent")


def data_lines(file: Path) -> list[str]:
    with gzip.open(file, "rt") as fh:
        return [ln for ln in fh.read().splitlines()[1:] if ln.strip()]


def test_parse_vm_spec():
    assert parse_vm_spec("1-5,9") == [1, 2, 3, 4, 5, 9]
    assert parse_vm_spec(" 3 , 1-2,2") == [3, 1, 2]
    for bad in ("", "a", "5-1", "1-"):
        with pytest.raises(ValueError):
            parse_vm_spec(bad)


def test_bitbrains_vm1_has_every_data_row():
    need(BB)
    [(vm, df)] = list(iter_trace("bitbrains", BB, "1"))
    assert vm == "bb-0001"
    assert len(df) == len(data_lines(BB / "1.csv.gz"))
    assert set(df.columns) == CONTRACT and df["ts"].dtype == np.float64
    assert df["ts"].is_monotonic_increasing and df["ts"].iloc[0] > 1.37e9  # epoch seconds despite the header
    assert df["host"].iloc[0] == "bb-host-01"
    assert (df["mem_used_mb"] <= df["mem_total_mb"]).all() and df["cpu_pct"].between(0, 100).all()


def test_bitbrains_duplicates_and_zero_capacity():
    need(BB)
    [(_, df)] = list(iter_trace("bitbrains", BB, "20"))
    raw = pd.read_csv(BB / "20.csv.gz", sep=";\t", engine="python")
    ts = raw.iloc[:, 0]
    assert df.attrs["duplicates"] == int(ts.duplicated().sum()) > 0
    assert len(df) == ts.nunique() and not df["ts"].duplicated().any()
    last = raw.drop_duplicates(raw.columns[0], keep="last").set_index(raw.columns[0])
    zero_mem = last.iloc[:, 5] == 0  # Memory capacity provisioned [KB]
    got = df.set_index("ts")
    assert got.loc[zero_mem.index[zero_mem].astype(float), "mem_total_mb"].isna().all()
    zero_cores = last.iloc[:, 1] == 0
    assert got.loc[zero_cores.index[zero_cores].astype(float), "vcpus"].isna().all()
    assert not (df["vcpus"] == 0).any() and not (df["mem_total_mb"] == 0).any()


def test_azure_columns_anchored_at_start():
    need(AZ)
    got = list(iter_trace("azure", AZ, "1-2,100", start_ts=1000.0 * 86400))
    assert len(got) == 3 and all(vm.startswith("az-") for vm, _ in got)
    wide = pd.read_csv(AZ / "microsoft_avg_100.csv.gz", usecols=[0, 1])
    vm, df = got[0]
    assert vm == f"az-{wide.columns[1]}" and len(df) == len(wide)
    assert df["ts"].iloc[0] == 1000.0 * 86400 and np.all(np.diff(df["ts"]) == 300)
    assert np.allclose(df["cpu_pct"], wide.iloc[:, 1].clip(0, 100))
    assert set(df.columns) == {"ts", "cpu_pct", "host"}


def test_planetlab_days_in_date_order():
    need(PL)
    [(vm, df)] = list(iter_trace("planetlab", PL, "1"))
    assert vm.startswith("pl-") and df["ts"].is_monotonic_increasing
    files = sorted(PL.glob("planetlab_*_wide.csv.gz"))
    name = vm[3:]
    days = [k for k, f in enumerate(files) if name in set(pd.read_csv(f, usecols=["vm"])["vm"])]
    assert len(df) == 288 * len(days)
    assert df["ts"].iloc[0] == DEFAULT_START_TS + days[0] * 86400


def test_unknown_format_and_missing_files():
    with pytest.raises(ValueError):
        list(iter_trace("nope", Path(__file__)))
    need(BB)
    with pytest.raises(FileNotFoundError):
        list(iter_trace("bitbrains", BB, "9999"))


def test_replay_rows_are_in_time_order_across_vms_with_duplicates_counted():
    need(BB)
    from sim.replay import ReplayStats, load_rows

    stats = ReplayStats()
    rows = load_rows("bitbrains", BB, "19-20", 0.0, stats)
    assert rows["ts"].is_monotonic_increasing and set(rows["vm"]) == {"bb-0019", "bb-0020"}
    assert stats.vms == 2 and stats.rows_read == len(rows) + stats.dropped["duplicate timestamp"]
