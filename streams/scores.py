"""The score record: what the scorer produces and every sink writes.

Columns are arrays of one length (one row per scored VM) so sinks can stay
vectorised; ``records()`` gives the per-VM dicts of the ``vm.scores`` contract.

Two windows per VM (``gpu_kernels.window``): ``best_*``/``p_ok`` are the window a
scheduler should take (the earliest one nearly as good as the minimum that fits
the target with enough confidence; ``window_rule`` says which rule chose it);
``min_*`` are the strict minimum of predicted downtime, however late. Until
``min_*`` existed, ``best_*`` meant the strict minimum.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SCORE_FIELDS = (
    "vm",
    "host",
    "best_start",
    "best_end",
    "best_downtime_ms",
    "p_ok",
    "window_rule",
    "min_start",
    "min_end",
    "min_downtime_ms",
    "min_p_ok",
    "now_downtime_ms",
    "now_p_ok",
    "now_total_s",
    "downtime_factor",
    "model",
    "last_ts",
    "updated",
)


@dataclass
class ScoreBatch:
    vm: list[str]
    host: list[str]
    best_start: np.ndarray  # float64 epoch s, start of the recommended window
    best_end: np.ndarray  # float64 epoch s, predicted end of a migration started there
    best_downtime_ms: np.ndarray  # float32, predicted (upper quantile) downtime in the recommended window
    p_ok: np.ndarray  # float32 in [0, 1]: probability the recommended window's downtime stays under the target
    window_rule: np.ndarray  # str per VM, which rule chose the recommended window: "now", "fits" or "minimum"
    min_start: np.ndarray  # float64 epoch s, start of the strict-minimum window
    min_end: np.ndarray  # float64 epoch s, predicted end of a migration started there
    min_downtime_ms: np.ndarray  # float32, predicted downtime in the strict-minimum window
    min_p_ok: np.ndarray  # float32 in [0, 1], p_ok of the strict-minimum window
    now_downtime_ms: np.ndarray  # float32, predicted downtime if migrated now
    now_p_ok: np.ndarray  # float32 in [0, 1], p_ok if migrated now
    now_total_s: np.ndarray  # float32, predicted duration (pre-copy + pause) of a migration started now, s
    downtime_factor: np.ndarray  # float32, the learned correction (streams.migrations) in these downtimes; 1: none
    last_ts: np.ndarray  # float64 epoch s of the newest sample used
    model: str  # model version that produced the batch
    updated: float  # epoch s when the batch was scored
    curves: list[bytes] | None = None  # per VM, the ``streams.curve`` blob (None: not stored)

    def __len__(self) -> int:
        return len(self.vm)

    def records(self) -> list[dict[str, object]]:
        """Per-VM dicts with the contract's field names in ``SCORE_FIELDS`` order (plain Python types)."""
        n = len(self.vm)

        def rounded(a: np.ndarray, decimals: int) -> list[float]:
            return np.round(np.asarray(a, dtype=np.float64), decimals).tolist()

        cols: dict[str, list[object]] = {
            "vm": self.vm,
            "host": self.host,
            "best_start": self.best_start.tolist(),
            "best_end": self.best_end.tolist(),
            "best_downtime_ms": rounded(self.best_downtime_ms, 3),
            "p_ok": rounded(self.p_ok, 4),
            "window_rule": np.asarray(self.window_rule, dtype=str).tolist(),
            "min_start": self.min_start.tolist(),
            "min_end": self.min_end.tolist(),
            "min_downtime_ms": rounded(self.min_downtime_ms, 3),
            "min_p_ok": rounded(self.min_p_ok, 4),
            "now_downtime_ms": rounded(self.now_downtime_ms, 3),
            "now_p_ok": rounded(self.now_p_ok, 4),
            "now_total_s": rounded(self.now_total_s, 3),
            "downtime_factor": rounded(self.downtime_factor, 4),
            "model": [self.model] * n,
            "last_ts": self.last_ts.tolist(),
            "updated": [self.updated] * n,
        }
        return [dict(zip(SCORE_FIELDS, row)) for row in zip(*(cols[name] for name in SCORE_FIELDS))]
