"""The model store: versions sort by time, LATEST moves only once a version is complete."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from gpu_kernels.features import FEATURE_NAMES
from tests.model_support import tiny_model
from training.model import ForecastModel, ModelRejected
from training.store import LATEST, VERSION_RE, ModelStore


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
