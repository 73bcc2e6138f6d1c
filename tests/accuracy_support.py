"""Live-accuracy tests' shared parts: a replay with one sample per VM and slot, a model, and an
offline computation of the realised errors that shares nothing with ``streams.accuracy``.

The replay: ``VMS`` VMs with a daily cycle on hourly slots (so "one day earlier" is inside a
short replay), one sample per VM and slot (a slot mean is that sample, whatever the batches),
vm-2 silent for two slots (gaps: NaN actuals), vm-3 without network fields (``net_mbps`` NaN:
no net pair). The offline side builds each forecast's window with the *training* path
(``gpu_kernels.features.windows_at``) and runs ``build_features`` + ``ForecastModel.predict``
on it, then measures every (origin, grid horizon) pair with plain loops.
"""

from __future__ import annotations

import json
import math
import time

import numpy as np

from gpu_kernels.features import FEATURE_NAMES, TARGETS, WINDOW_CHANNELS, build_features, windows_at
from streams.schema import decode_messages
from streams.window_store import derive_channels

SLOT_S = 3600
HORIZON_S = 6 * 3600  # grid 1, 2, 3, 4, 6 slots: buckets 1h and 6h
WINDOW_S = 48 * 3600  # longer than the replay: no slot leaves the window (no daily profile yet)
SLOTS = 40
VMS = 4
GAPS = {"vm-2": (17, 18, 30)}
NO_NET = {"vm-3"}
BUCKETS = {"1h": (0, 3600), "6h": (3600, 21600), "24h": (21600, 86400)}  # stated again on purpose
METHODS = ("model", "last", "seasonal")


def t0() -> int:
    """First slot's start: two days before now, on a day boundary (samples are old, never future)."""
    return (int(time.time()) // 86400 - 3) * 86400


def slot_messages(start: int, s: int) -> list[tuple[bytes, bytes]]:
    """The contract messages (key, JSON) of slot ``s``: one sample per VM present in it."""
    out = []
    for v in range(VMS):
        vm = f"vm-{v}"
        if s in GAPS.get(vm, ()):
            continue
        rng = np.random.default_rng(1000 * v + s)
        hour = (start // SLOT_S + s) % 24
        cpu = float(np.clip(40 + 25 * math.sin(2 * math.pi * hour / 24 + v) + rng.normal(0, 6), 0, 100))
        msg = {
            "vm": vm, "ts": float(start + s * SLOT_S + 1800), "host": f"h{v % 2}", "cpu_pct": round(cpu, 3),
            "mem_total_mb": 8192.0, "mem_used_mb": 3000.0 + 20 * cpu, "vcpus": 4.0,
            "dirty_mbps": round(5 + 0.8 * cpu + float(rng.normal(0, 2)) ** 2, 3),
        }  # fmt: skip
        if vm not in NO_NET:
            msg["net_rx_kbps"] = round(2000 + 60 * cpu + float(rng.uniform(0, 500)), 1)
            msg["net_tx_kbps"] = 800.0
        out.append((vm.encode(), json.dumps(msg).encode()))
    return out


def series(start: int) -> dict[str, np.ndarray]:
    """Each VM's slot means ``(SLOTS, C)`` float32 (NaN gaps), through the serving channel derivation."""
    out = {f"vm-{v}": np.full((SLOTS, len(WINDOW_CHANNELS)), np.nan, np.float32) for v in range(VMS)}
    for s in range(SLOTS):
        msgs = slot_messages(start, s)
        d = decode_messages([m for _, m in msgs], [k for k, _ in msgs], now=time.time())
        assert not d.rejected, d.rejected
        ch = derive_channels(d.values)
        for i, vm in enumerate(d.vm):
            out[vm][s] = ch[i]
    return out


def test_model(seed: int = 3):
    """A small real forecaster on the replay's grid and slot (hourly slots, 6 h horizon)."""
    from tests.model_support import on_horizon_grid
    from training.fit import fit_forecaster
    from training.model import ForecastModel, default_horizons

    rng = np.random.default_rng(seed)
    X = on_horizon_grid(rng.random((600, len(FEATURE_NAMES)), dtype=np.float32) * 50, rng)
    Y = (rng.random((600, len(TARGETS))) * 60).astype(np.float32)
    boosters = fit_forecaster(X, Y, n_estimators=4, max_depth=3, nthread=1)
    return ForecastModel("accuracy-test", boosters, default_horizons(HORIZON_S // SLOT_S), SLOT_S)


def offline_errors(start: int, model, window_slots: int = WINDOW_S // SLOT_S) -> dict[tuple[str, str, str], tuple[float, int]]:
    """``{(target, bucket, method): (abs error sum, pairs)}`` of every forecast the worker makes.

    A VM is forecast at every slot it has a sample in; a pair (origin o, grid horizon h) is
    realised at the VM's next forecast with a newest slot past o + h, if any, and counted when
    the actual and all three methods are finite.
    """
    data = series(start)
    first_slot = start // SLOT_S
    horizons = np.asarray(model.horizons, dtype=np.int64)
    season = 86400 // SLOT_S
    out = {(t, b, m): [0.0, 0] for t in TARGETS for b in BUCKETS for m in METHODS}
    for vm, ser in data.items():
        origins = np.flatnonzero(~np.isnan(ser).all(axis=1))
        win = windows_at(ser[None], origins, window_slots)  # (n_o, S, C), training's windows
        attrs = {"mem_total_mb": np.full(origins.size, 8192.0, np.float32), "vcpus": np.full(origins.size, 4.0, np.float32)}
        X = build_features(win, attrs, first_slot + origins, horizons, SLOT_S)
        pred = np.asarray(model.predict(X), dtype=np.float32).reshape(origins.size, horizons.size, len(TARGETS), 2)
        for a, o in enumerate(origins.tolist()):
            for k, h in enumerate(horizons.tolist()):
                tau = o + h
                later = origins[origins > tau]
                if later.size == 0 or later[0] - tau >= window_slots:
                    continue  # never realised (replay over), or out of the window by then
                bucket = next((b for b, (lo, hi) in BUCKETS.items() if lo < h * SLOT_S <= hi), None)
                if bucket is None:
                    continue
                for j, t in enumerate(TARGETS):
                    c = WINDOW_CHANNELS.index(t)
                    y = float(ser[tau, c])
                    hist = ser[max(0, o - window_slots + 1) : o + 1, c]
                    seen = hist[~np.isnan(hist)]
                    last = float(seen[-1]) if seen.size else math.nan
                    lag = season * math.ceil(h / season)
                    back = tau - lag
                    seas = float(ser[back, c]) if back >= max(0, o - window_slots + 1) else math.nan
                    seas = last if math.isnan(seas) else seas
                    f = {"model": float(pred[a, k, j, 0]), "last": last, "seasonal": seas}
                    if math.isnan(y) or any(math.isnan(v) for v in f.values()):
                        continue
                    for m in METHODS:
                        cell = out[(t, bucket, m)]
                        cell[0] += abs(f[m] - y)
                        cell[1] += 1
    return {key: (s, n) for key, (s, n) in out.items()}
