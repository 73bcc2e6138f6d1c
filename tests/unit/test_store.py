"""The model store: versions sort by time, LATEST moves only once a version is complete."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from gpu_kernels.features import FEATURE_NAMES
from tests.model_support import tiny_model
from training.model import ForecastModel, ModelRejected
from training.store import LATEST, VERSION_RE, ModelStore, NoLoadableModel


@pytest.fixture(scope="module")
def models() -> list[ForecastModel]:
    return [tiny_model(s) for s in range(3)]


def test_empty_store(tmp_path: Path) -> None:
    store = ModelStore(str(tmp_path / "none"))
    assert store.latest_version() is None and store.list_versions() == []
    with pytest.raises(FileNotFoundError, match="empty"):
        store.load()


def test_publish_lists_versions_in_time_order_and_moves_latest(tmp_path: Path, models: list[ForecastModel]) -> None:
    store = ModelStore(str(tmp_path))
    t0 = 1_790_000_000.0
    published = [store.publish(m, now=t0 + 3600 * i) for i, m in enumerate(models)]
    assert all(VERSION_RE.match(v) for v in published)
    assert store.list_versions() == published == sorted(published)
    assert store.latest_version() == published[-1]
    X = np.random.default_rng(9).random((50, len(FEATURE_NAMES)), dtype=np.float32)
    np.testing.assert_array_equal(store.load().predict(X), models[-1].predict(X))
    assert store.load(published[0]).version == published[0]
    # nothing but the versions and LATEST is left behind (no temp files)
    assert sorted(os.listdir(tmp_path)) == sorted([*published, LATEST])


def test_latest_is_replaced_atomically(tmp_path: Path, models: list[ForecastModel], monkeypatch: pytest.MonkeyPatch) -> None:
    """LATEST changes by rename of a complete file: never opened for writing in place."""
    store = ModelStore(str(tmp_path))
    first = store.publish(models[0], now=1_790_000_000.0)
    replaced: list[tuple[str, str]] = []
    real_replace = os.replace

    def spy(src: str, dst: str) -> None:
        assert Path(src).read_text().strip() != "" and Path(dst).read_text().strip() == first
        replaced.append((src, dst))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    second = store.publish(models[1], now=1_790_000_060.0)
    assert replaced and Path(replaced[0][1]).name == LATEST
    assert store.latest_version() == second


def test_a_failed_publish_leaves_latest_alone(tmp_path: Path, models: list[ForecastModel], monkeypatch: pytest.MonkeyPatch) -> None:
    store = ModelStore(str(tmp_path))
    first = store.publish(models[0], now=1_790_000_000.0)

    def boom(*_: object, **__: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "rename", boom)
    with pytest.raises(OSError, match="disk full"):
        store.publish(models[1], now=1_790_000_060.0)
    assert store.latest_version() == first and store.list_versions() == [first]


def test_tampered_version_is_rejected_by_the_store(tmp_path: Path, models: list[ForecastModel]) -> None:
    store = ModelStore(str(tmp_path))
    v = store.publish(models[0], now=1_790_000_000.0)
    f = tmp_path / v / "cpu_pct.band1.ubj"
    f.write_bytes(f.read_bytes() + b"\0")
    with pytest.raises(ModelRejected, match="checksum"):
        store.load()
    with pytest.raises(ModelRejected, match="not a model version"):
        store.load("../etc")


def test_fsspec_url_form(tmp_path: Path, models: list[ForecastModel]) -> None:
    store = ModelStore(f"file://{tmp_path}")
    v = store.publish(models[0], now=1_790_000_000.0)
    assert ModelStore(str(tmp_path)).latest_version() == v
    assert store.load().version == v


# --- start-up fallback and fingerprints ------------------------------------------------------


def _publish_all(store: ModelStore, models: list[ForecastModel]) -> list[str]:
    return [store.publish(m, now=1_790_000_000.0 + 3600 * i) for i, m in enumerate(models)]


def _corrupt(store_dir: Path, version: str, name: str = "cpu_pct.band1.ubj") -> None:
    f = store_dir / version / name
    f.write_bytes(f.read_bytes()[:-1] + b"X")


def test_a_corrupt_latest_falls_back_to_the_newest_loadable(tmp_path: Path, models: list[ForecastModel]) -> None:
    store = ModelStore(str(tmp_path))
    v0, v1, v2 = _publish_all(store, models)
    _corrupt(tmp_path, v2)
    with pytest.raises(ModelRejected):
        store.load()  # what crash-looped the workers
    model, skipped = store.load_newest_loadable(slot_s=300)
    assert model.version == v1
    assert [v for v, _ in skipped] == [v2] and "checksum" in skipped[0][1]
    assert store.latest_version() == v2  # the store is only read, never repointed


def test_fallback_respects_a_rollback_before_newer_versions(tmp_path: Path, models: list[ForecastModel]) -> None:
    """LATEST moved back to v1: older versions are tried before the newer one it was rolled back from."""
    store = ModelStore(str(tmp_path))
    v0, v1, v2 = _publish_all(store, models)
    store._set_latest(v1)
    (tmp_path / v1 / "manifest.json").unlink()  # half-uploaded
    model, skipped = store.load_newest_loadable()
    assert model.version == v0 and [v for v, _ in skipped] == [v1]
    manifest = tmp_path / v0 / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"feature_hash": "', '"feature_hash": "0ld'))  # another build's
    model, skipped = store.load_newest_loadable()
    assert model.version == v2 and [v for v, _ in skipped] == [v1, v0] and "feature spec" in skipped[1][1]


def test_latest_naming_nothing_usable_falls_back_to_the_newest(tmp_path: Path, models: list[ForecastModel]) -> None:
    store = ModelStore(str(tmp_path))
    v0, v1 = _publish_all(store, models[:2])
    (tmp_path / LATEST).write_text("../etc\n")
    model, skipped = store.load_newest_loadable()
    assert model.version == v1 and [v for v, _ in skipped] == ["../etc"] and "not a model version" in skipped[0][1]
    (tmp_path / LATEST).unlink()
    assert store.load_newest_loadable()[0].version == v1


def test_no_loadable_version_is_distinct_from_an_empty_store(tmp_path: Path, models: list[ForecastModel]) -> None:
    with pytest.raises(FileNotFoundError, match="empty"):
        ModelStore(str(tmp_path / "none")).load_newest_loadable()
    store = ModelStore(str(tmp_path))
    versions = _publish_all(store, models[:2])
    for v in versions:
        _corrupt(tmp_path, v)
    with pytest.raises(NoLoadableModel, match="none of the 2 versions") as info:
        store.load_newest_loadable()
    assert isinstance(info.value, ModelRejected)
    assert [v for v, _ in info.value.skipped] == versions[::-1]


def test_fingerprint_follows_the_files_of_a_version(tmp_path: Path, models: list[ForecastModel]) -> None:
    store = ModelStore(str(tmp_path))
    v = store.publish(models[0], now=1_790_000_000.0)
    first = store.fingerprint(v)
    assert first and store.fingerprint(v) == first
    f = tmp_path / v / "cpu_pct.band1.ubj"
    st = f.stat()
    f.write_bytes(f.read_bytes())  # same name and size: only the file times tell
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    rewritten = store.fingerprint(v)
    assert rewritten != first
    (tmp_path / v / "extra").write_bytes(b"")
    assert store.fingerprint(v) not in (first, rewritten)
    assert store.fingerprint("20300101T000000Z-00000000") == ""  # not there (yet)
    assert store.fingerprint("../etc") == ""  # never lists outside the store
