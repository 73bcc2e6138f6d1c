"""`zhuge retrain` end to end on a tiny Parquet history: Dask LocalCluster, real Redis, gated publication."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # ~40-90 s: Kafka start + Dask fits (two validation folds, refit)


def _write_history(root, n_vms: int = 6, days: int = 5, slot_s: int = 300) -> None:
    """A hive-partitioned archive (date=/hour=) of daily-cycle VMs, as the worker's sink writes it."""
    import pyarrow as pa
    import pyarrow.dataset as ds

    rng = np.random.default_rng(7)
    t0 = 1_700_006_400
    ts = t0 + np.arange(days * 86400 // slot_s) * slot_s
    frames = []
    for v in range(n_vms):
        phase = 2 * np.pi * ((ts % 86400) / 86400 + v / n_vms)
        cpu = np.clip(30 + 20 * np.sin(phase) + rng.normal(0, 3, ts.size), 0, 100)
        frames.append(pd.DataFrame({
            "vm": f"vm-{v}", "host": f"h{v % 2}", "ts": ts.astype(float), "cpu_pct": cpu,
            "mem_total_mb": 4096.0, "mem_used_mb": 1500 + 10 * cpu, "net_rx_kbps": 200 + 5 * cpu,
            "net_tx_kbps": 100.0, "disk_write_kbps": 50.0, "vcpus": 2.0,
        }))  # fmt: skip
    df = pd.concat(frames, ignore_index=True)
    when = pd.to_datetime(df["ts"], unit="s", utc=True)
    df["date"] = when.dt.strftime("%Y-%m-%d")
    df["hour"] = when.dt.strftime("%H")
    ds.write_dataset(pa.Table.from_pandas(df, preserve_index=False), str(root), format="parquet",
                     partitioning=["date", "hour"], partitioning_flavor="hive")  # fmt: skip


def test_retrain_publishes_into_an_empty_store_then_gates_on_the_held_out_day(services, tmp_path):
    from training.retrain import RetrainConfig, open_client, retrain_once
    from training.store import ModelStore

    history = tmp_path / "history"
    _write_history(history)
    settings = services.replace(history_url=str(history), model_store=str(tmp_path / "models"))
    sub = settings.redis_client(asyncio=False).pubsub()
    sub.subscribe(f"{settings.redis_prefix}models")
    cfg = RetrainConfig(n_workers=2, max_rows=20_000, n_estimators=20, vm_groups=2)
    client, cluster = open_client(cfg, "cpu")
    try:
        first = retrain_once(settings, client, cfg, history=str(history))
        assert first.published and first.reason == "store empty"
        assert ModelStore(settings.model_store).latest_version() == first.version
        assert first.n_vms == 6 and first.rows > 0
        # four days before the held-out one: two validation folds chose a blend, served with the model
        blend = ModelStore(settings.model_store).load(first.version, slot_s=settings.slot_s).blend
        assert blend is not None and max(blend.weight["cpu_pct"]) > 0
        deadline = time.monotonic() + 5
        got = None
        while time.monotonic() < deadline and got is None:
            msg = sub.get_message(timeout=0.5)
            if msg and msg["type"] == "message":
                got = msg["data"].decode()
        assert got == first.version  # workers were told

        second = retrain_once(settings, client, cfg, history=str(history))
        assert second.champion == first.version and second.champion_loss is not None
        # the gate is live accuracy's measure: MAE per target and bucket vs the champion and the naive baselines
        assert set(second.mae["cpu_pct"]) == {"1h", "6h", "24h"}
        assert set(second.mae["cpu_pct"]["1h"]) == {"challenger", "champion", "last", "seasonal"}
        assert second.champion_score is not None and np.isfinite(second.challenger_score)
        assert second.published == (second.challenger_score <= second.champion_score)
        expected = second.version if second.published else first.version
        assert ModelStore(settings.model_store).latest_version() == expected
    finally:
        sub.close()
        client.close()
        cluster.close()
