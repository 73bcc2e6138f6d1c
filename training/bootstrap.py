"""A small default forecaster for a worker whose model store is empty.

A fresh deployment must score from its first sample, before any history exists to
retrain on: the worker fits a compact model on the simulated fleet (``sim.fleet``)
in a few seconds. It is deliberately small and logged loudly as a bootstrap model;
the first retrain on real history replaces it.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np

from gpu_kernels.features import FEATURE_SPEC_HASH, WINDOW_CHANNELS, training_examples
from training.fit import fit_forecaster
from training.model import ForecastModel, default_horizons

log = logging.getLogger(__name__)

# Fixed so every worker of a deployment bootstraps the very same model.
BOOTSTRAP_SEED = 20240601
BOOTSTRAP_START_TS = 1_700_006_400  # a Wednesday 00:00 UTC: some weekday and weekend-free days
BOOTSTRAP_VMS = 32
BOOTSTRAP_DAYS = 3
BOOTSTRAP_ORIGIN_EVERY = 12  # slots between training origins


def fleet_channels(fields: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``sim.fleet.series`` output -> ``(V, T, C)`` window channels + per-VM attributes.

    Same derivation as serving: ``net_mbps = (rx + tx) / 1024``; ``dirty_mbps`` measured,
    else ``gpu_kernels.downtime.dirty_rate_proxy``.
    """
    cpu = fields["cpu_pct"]
    dirty = np.asarray(fields.get("dirty_mbps", np.full_like(cpu, np.nan)), dtype=np.float64)
    if np.isnan(dirty).any():
        from gpu_kernels.downtime import dirty_rate_proxy

        proxy = dirty_rate_proxy(
            cpu_pct=cpu, vcpus=fields["vcpus"], mem_used_mb=fields["mem_used_mb"], disk_write_kbps=fields["disk_write_kbps"]
        )
        dirty = np.where(np.isnan(dirty), proxy, dirty)
    net = (np.nan_to_num(fields["net_rx_kbps"]) + np.nan_to_num(fields["net_tx_kbps"])) / 1024.0
    chans = {"cpu_pct": cpu, "dirty_mbps": dirty, "net_mbps": net, "mem_used_mb": fields["mem_used_mb"]}
    series = np.stack([chans[c] for c in WINDOW_CHANNELS], axis=-1).transpose(1, 0, 2).astype(np.float32)
    attrs = {"vcpus": fields["vcpus"][-1].astype(np.float32), "mem_total_mb": fields["mem_total_mb"][-1].astype(np.float32)}
    return series, attrs


def bootstrap_model(settings: Any, *, n_vms: int = BOOTSTRAP_VMS, days: int = BOOTSTRAP_DAYS) -> ForecastModel:
    """Fit the default model on simulated data; version ``bootstrap-<featurehash8>``."""
    from sim.fleet import series as fleet_series

    tic = time.perf_counter()
    slot_s = int(settings.slot_s)
    S = settings.window_slots
    horizons = default_horizons(settings.horizon_slots)
    n_steps = days * 86400 // slot_s + int(horizons[-1])
    fields = fleet_series(n_vms, max(1, n_vms // 8), BOOTSTRAP_START_TS, n_steps, slot_s, BOOTSTRAP_SEED)
    series, attrs = fleet_channels(fields)
    first_slot = BOOTSTRAP_START_TS // slot_s
    # origins from the second day on (a full window of history), labels up to the series end
    origins = np.arange(min(S, n_steps // 3), n_steps - 1, BOOTSTRAP_ORIGIN_EVERY)
    X, Y = training_examples(series, attrs, first_slot, origins, horizons, S, slot_s)
    nthread = max(1, min(4, (os.cpu_count() or 2) // 2))
    boosters = fit_forecaster(X, Y, n_estimators=40, max_depth=5, learning_rate=0.2, device="cpu", nthread=nthread)
    model = ForecastModel(
        version=f"bootstrap-{FEATURE_SPEC_HASH[:8]}",
        boosters=boosters,
        horizons=horizons,
        slot_s=slot_s,
        training_range=(int(first_slot * slot_s), int((first_slot + n_steps - 1) * slot_s)),
        metrics={"bootstrap": 1.0, "rows": float(X.shape[0]), "fit_s": round(time.perf_counter() - tic, 3)},
    )
    log.warning(
        "serving a BOOTSTRAP model %s fitted on simulated data (%d rows, %.1f s); "
        "retrain on real history (zhuge retrain) to replace it",
        model.version, X.shape[0], time.perf_counter() - tic,
    )
    return model
