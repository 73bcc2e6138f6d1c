"""The score record: what the scorer produces and every sink writes.

Columns are arrays of one length (one row per scored VM) so sinks can stay
vectorised; ``records()`` gives the per-VM dicts of the ``vm.scores`` contract.
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
    "now_downtime_ms",
    "p_ok",
    "model",
    "last_ts",
    "updated",
)


@dataclass
class ScoreBatch:
    vm: list[str]
    host: list[str]
    best_start: np.ndarray  # float64 epoch s, start of the best window
    best_end: np.ndarray  # float64 epoch s, end of the best window
    best_downtime_ms: np.ndarray  # float32, predicted (upper quantile) downtime in the best window
    now_downtime_ms: np.ndarray  # float32, predicted downtime if migrated now
    p_ok: np.ndarray  # float32 in [0, 1]: probability downtime stays under the target
    last_ts: np.ndarray  # float64 epoch s of the newest sample used
    model: str  # model version that produced the batch
    updated: float  # epoch s when the batch was scored

    def __len__(self) -> int:
        return len(self.vm)

    def records(self) -> list[dict[str, object]]:
        """Per-VM dicts with the contract's field names (plain Python types)."""
        cols = {
            "best_start": self.best_start.tolist(),
            "best_end": self.best_end.tolist(),
            "best_downtime_ms": np.round(self.best_downtime_ms.astype(np.float64), 3).tolist(),
            "now_downtime_ms": np.round(self.now_downtime_ms.astype(np.float64), 3).tolist(),
            "p_ok": np.round(self.p_ok.astype(np.float64), 4).tolist(),
            "last_ts": self.last_ts.tolist(),
        }
        return [
            {
                "vm": vm,
                "host": self.host[i],
                "best_start": cols["best_start"][i],
                "best_end": cols["best_end"][i],
                "best_downtime_ms": cols["best_downtime_ms"][i],
                "now_downtime_ms": cols["now_downtime_ms"][i],
                "p_ok": cols["p_ok"][i],
                "model": self.model,
                "last_ts": cols["last_ts"][i],
                "updated": self.updated,
            }
            for i, vm in enumerate(self.vm)
        ]
