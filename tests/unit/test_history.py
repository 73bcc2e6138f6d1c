"""History sink: samples land in date=/hour= partitions, readable with pyarrow, nothing lost."""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from app.settings import Settings
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


# --- failures: bounded buffer, partial flushes, settings ---------------------------------------


def archived_vms(root: Path) -> list[str]:
    files = sorted(str(p) for p in root.rglob("*.parquet"))
    return ds.dataset(files, format="parquet").to_table().column("vm").to_pylist() if files else []


def test_buffer_stays_bounded_while_the_archive_is_unwritable(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """A file where the archive's directory should be: every flush fails, memory stays bounded."""
    root = tmp_path / "archive"
    root.write_text("not a directory")
    sink = HistorySink(str(root), metrics=METRICS, max_rows=10, max_buffer_rows=25)
    with caplog.at_level("WARNING", logger="streams.sinks.history"):
        for k in range(4):  # 40 rows offered, each write followed by a failed flush (what the pipeline does)
            assert sink.write(batch(T0 + np.arange(10.0), start=10 * k)) is True
            with pytest.raises(OSError):
                sink.flush()
            assert sink.buffered_rows <= 25
    assert sink.buffered_rows == 25 and sink.dropped_rows == 15
    assert len([r for r in caplog.records if "unwritable" in r.getMessage()]) == 1  # one per outage, not per write
    root.unlink()  # the archive is writable again: the newest 25 rows land, the oldest 15 are gone
    sink.flush()
    assert sorted(archived_vms(root)) == sorted(f"vm-{i}" for i in range(15, 40))
    assert sink.buffered_rows == 0 and sink.dropped_rows == 15


def test_a_new_outage_warns_again(tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch):
    sink = HistorySink(str(tmp_path), metrics=METRICS, max_rows=5, max_buffer_rows=5)
    real = sink._write_one

    def disk_full(*_: object) -> str:
        raise OSError("No space left on device")

    with caplog.at_level("WARNING", logger="streams.sinks.history"):
        for _ in range(2):  # outage, recovery, outage
            monkeypatch.setattr(sink, "_write_one", disk_full)
            for _ in range(3):
                sink.write(batch(T0 + np.arange(5.0)))
                with pytest.raises(OSError, match="No space"):
                    sink.flush()
            monkeypatch.setattr(sink, "_write_one", real)
            sink.flush()
    assert sink.dropped_rows == 20
    assert len([r for r in caplog.records if "unwritable" in r.getMessage()]) == 2


def test_one_write_larger_than_the_bound_keeps_its_newest_rows(tmp_path: Path):
    sink = HistorySink(str(tmp_path), metrics=METRICS, max_rows=3, max_buffer_rows=4)
    sink.write(batch(T0 + np.arange(10.0)))
    assert sink.buffered_rows == 4 and sink.dropped_rows == 6
    sink.flush()
    assert sorted(archived_vms(tmp_path)) == [f"vm-{i}" for i in range(6, 10)]


def test_a_partial_flush_retries_only_the_hours_not_written(tmp_path: Path):
    """Hour 3 of 5 cannot be written: hours 1-2 are written once, 3-5 stay buffered, nothing is duplicated."""
    blocker = tmp_path / "date=2026-01-01" / "hour=02"
    blocker.parent.mkdir()
    blocker.write_text("in the way")
    sink = HistorySink(str(tmp_path), metrics=METRICS)
    sink.write(batch(T0 + np.repeat(np.arange(5) * HOUR, 7)))  # 7 rows in each of 5 hours
    with pytest.raises(OSError):
        sink.flush()
    assert sink.buffered_rows == 3 * 7
    assert len(archived_vms(tmp_path)) == 2 * 7
    blocker.unlink()
    sink.flush()
    vms = archived_vms(tmp_path)
    assert len(vms) == 35 and sorted(vms) == sorted(f"vm-{i}" for i in range(35))
    hours = ds.dataset(str(tmp_path), format="parquet", partitioning="hive").to_table().column("hour").to_pylist()
    assert sorted(hours) == sorted(np.repeat(np.arange(5), 7).tolist())


def test_a_failed_local_write_leaves_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    sink = HistorySink(str(tmp_path), metrics=METRICS)
    sink.write(batch(T0 + np.arange(3.0)))

    def broken_rename(*_: object, **__: object) -> None:
        raise OSError("rename failed")

    monkeypatch.setattr(sink._fs, "mv", broken_rename)
    with pytest.raises(OSError, match="rename failed"):
        sink.flush()
    assert not [p for p in tmp_path.rglob("*") if p.is_file()] and sink.buffered_rows == 3


def test_object_store_path_writes_whole_files():
    """Non-local filesystems get each file in one PUT (fsspec's memory filesystem stands in for s3)."""
    root = f"/hist-{uuid.uuid4().hex}"
    sink = HistorySink(f"memory://{root}", metrics=METRICS)
    sink.write(batch(T0 + np.arange(0.0, 2 * HOUR, 600.0)))
    paths = sink.flush()
    fs = fsspec.filesystem("memory")
    try:
        assert len(paths) == 2
        table = ds.dataset(root, filesystem=fs, format="parquet", partitioning="hive").to_table()
        assert table.num_rows == 12
    finally:
        fs.rm(root, recursive=True)


def test_from_settings_uses_the_history_settings(tmp_path: Path):
    settings = Settings.from_env(
        {}, history_url=str(tmp_path), history_flush_rows=123, history_flush_s=7.5, history_buffer_rows=4567
    )
    sink = HistorySink.from_settings(settings)
    assert (sink.url, sink.max_rows, sink.max_age_s, sink.max_buffer_rows) == (str(tmp_path), 123, 7.5, 4567)
    assert sink.dropped_rows == 0


def test_buffer_bound_below_the_flush_threshold_is_refused(tmp_path: Path):
    with pytest.raises(ValueError, match="max_buffer_rows"):
        HistorySink(str(tmp_path), max_rows=10, max_buffer_rows=9)


def test_offset_marks_move_forward_with_each_flush_and_never_back(tmp_path: Path):
    sink = HistorySink(str(tmp_path), metrics=METRICS, marks="vm.metrics")
    assert sink.archived_until(0) is None
    sink.write(batch(T0 + np.arange(3.0)), {0: 10, 1: 4})
    assert sink.archived_until(0) is None  # buffered, not yet written
    sink.flush()
    assert (sink.archived_until(0), sink.archived_until(1)) == (10, 4)
    late = HistorySink(str(tmp_path), metrics=METRICS, marks="vm.metrics")  # a former owner flushing late
    late.write(batch(T0 + np.arange(2.0)), {0: 7})
    late.flush()
    assert sink.archived_until(0) == 10
    # readers of the archive skip the marks
    assert ds.dataset(str(tmp_path), format="parquet", partitioning="hive").count_rows() == 5
    import dask.dataframe as dd

    assert len(dd.read_parquet(str(tmp_path)).compute()) == 5


def test_a_mark_is_written_only_with_its_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    sink = HistorySink(str(tmp_path), metrics=METRICS, marks="m")
    sink.write(batch(T0 + np.arange(3.0)), {0: 3})
    monkeypatch.setattr(sink, "_write_one", lambda hour, rows: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        sink.flush()
    assert sink.archived_until(0) is None and sink.buffered_rows == 3
    monkeypatch.undo()
    sink.flush()
    assert sink.archived_until(0) == 3


def test_an_archive_holding_only_offset_marks_is_a_clear_error_for_its_readers(tmp_path: Path):
    """A worker marks a partition as soon as it takes it, before its first flush."""
    from training.dataset import grid_tasks_from_history, read_history

    HistorySink(str(tmp_path), metrics=METRICS, marks="vm.metrics").mark_start(0, 0)
    for read in (read_history, grid_tasks_from_history):
        with pytest.raises(FileNotFoundError, match="no Parquet file yet"):
            read(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_history(str(tmp_path / "nowhere"))
