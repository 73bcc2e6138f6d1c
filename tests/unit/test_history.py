"""History sink: samples land in date=/hour= partitions, readable with pyarrow, nothing lost."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from streams.sinks.history import HistorySink

METRICS = ("cpu_pct", "mem_used_mb", "dirty_mbps")
HOUR = 3600.0
T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z


@dataclass
class Batch:  # the columns of streams.schema.DecodedBatch the sink reads
    vm: list[str]
    host: list[str]
    ts: np.ndarray
    values: np.ndarray


def batch(ts: np.ndarray, start: int = 0) -> Batch:
    n = len(ts)
    values = np.arange(n * len(METRICS), dtype=np.float32).reshape(n, len(METRICS)) + start
    values[::4, 2] = np.nan  # optional field missing
    return Batch([f"vm-{start + i}" for i in range(n)], [f"h{i % 3}" for i in range(n)], np.asarray(ts, np.float64), values)


def test_flush_partitions_by_utc_date_and_hour(tmp_path: Path):
    sink = HistorySink(str(tmp_path), metrics=METRICS)
    ts = np.array([T0 - 1.0, T0 + 5.0, T0 + HOUR + 1, T0 + 5.0, T0 + 25 * HOUR])
    sink.write(batch(ts))
    paths = sink.flush()
    rel = sorted(str(Path(p).relative_to(tmp_path).parent) for p in paths)
    assert rel == ["date=2025-12-31/hour=23", "date=2026-01-01/hour=00", "date=2026-01-01/hour=01", "date=2026-01-02/hour=01"]
    files = sorted(tmp_path.rglob("*.parquet"))
    assert len(files) == 4 and all(f.name.startswith("part-") for f in files)
    assert not list(tmp_path.rglob("*.tmp"))
    hour0 = pq.read_table(tmp_path / "date=2026-01-01" / "hour=00").to_pydict()
    assert sorted(hour0["ts"]) == [T0 + 5.0, T0 + 5.0]
    assert hour0["host"] == ["h1", "h0"]


def test_rows_and_columns_roundtrip_through_the_dataset(tmp_path: Path):
    sink = HistorySink(str(tmp_path), metrics=METRICS)
    b1 = batch(T0 + np.linspace(0, 3 * HOUR, 40))
    b2 = batch(T0 + np.linspace(0, 2 * HOUR, 25), start=1000)
    sink.write(b1)
    sink.write(b2)
    assert sink.buffered_rows == 65
    sink.close()
    assert sink.buffered_rows == 0
    table = ds.dataset(str(tmp_path), format="parquet", partitioning="hive").to_table()
    assert table.num_rows == 65
    assert {"vm", "host", "ts", *METRICS, "date", "hour"} == set(table.column_names)
    assert table.schema.field("cpu_pct").type == "float"
    got = table.sort_by("vm").to_pydict()
    want_vm = sorted(b1.vm + b2.vm)
    assert got["vm"] == want_vm
    by_vm = {vm: i for i, vm in enumerate(b1.vm + b2.vm)}
    all_values = np.concatenate([b1.values, b2.values])
    order = [by_vm[v] for v in got["vm"]]
    np.testing.assert_array_equal(np.array(got["dirty_mbps"], dtype=np.float32), all_values[order, 2])


def test_write_reports_when_a_flush_is_due_by_rows_or_age(tmp_path: Path):
    now = [0.0]
    sink = HistorySink(str(tmp_path), metrics=METRICS, max_rows=10, max_age_s=30.0, clock=lambda: now[0])
    assert sink.write(batch(T0 + np.arange(4.0))) is False
    now[0] = 29.0
    assert sink.flush_due() is False
    now[0] = 30.0
    assert sink.flush_due() is True
    sink.flush()
    assert sink.write(batch(T0 + np.arange(10.0))) is True  # row limit reached


def test_flush_of_nothing_writes_nothing(tmp_path: Path):
    sink = HistorySink(str(tmp_path / "h"), metrics=METRICS)
    assert sink.close() == []
    assert not (tmp_path / "h").exists()


def test_writes_during_a_threaded_flush_are_kept(tmp_path: Path):
    sink = HistorySink(str(tmp_path), metrics=METRICS)
    sink.write(batch(T0 + np.arange(500.0)))
    t = threading.Thread(target=sink.flush)
    t.start()
    sink.write(batch(T0 + np.arange(7.0), start=9000))
    t.join()
    sink.flush()
    assert ds.dataset(str(tmp_path), format="parquet").count_rows() == 507


def test_shape_mismatch_is_a_clear_error(tmp_path: Path):
    sink = HistorySink(str(tmp_path), metrics=METRICS + ("extra",))
    with pytest.raises(ValueError, match="expected .*METRICS"):
        sink.write(batch(T0 + np.arange(3.0)))


def test_real_decoded_batch_is_archived_with_every_metric_column(tmp_path: Path):
    schema = pytest.importorskip("streams.schema")
    raws = [
        b'[{"vm":"a","ts":1767225600,"host":"h1","cpu_pct":12.5,"dirty_mbps":3},{"vm":"b","ts":1767225900,"cpu_pct":99}]',
        b'{"vm":"c","ts":1767229300,"host":"h2","mem_total_mb":4096,"mem_used_mb":1024}',
        b'{"vm":"bad","ts":"yesterday"}',  # rejected: never archived
    ]
    decoded = schema.decode_messages(raws, now=T0 + 2 * HOUR)
    sink = HistorySink(str(tmp_path))  # columns default to streams.schema.METRICS
    sink.write(decoded)
    sink.close()
    table = ds.dataset(str(tmp_path), format="parquet", partitioning="hive").to_table().sort_by("vm").to_pydict()
    assert table["vm"] == ["a", "b", "c"]
    assert table["host"] == ["h1", "", "h2"]
    assert table["hour"] == [0, 0, 1]
    assert table["cpu_pct"][:2] == [12.5, 99.0] and table["mem_used_mb"][2] == 1024.0
    assert set(schema.METRICS) <= set(table)
