"""The forecast model in service: XGBoost boosters + the manifest that makes them trustworthy.

Artifacts are one XGBoost UBJ file per target and horizon band plus ``manifest.json``
(version, feature-spec hash, horizon grid, band edges, slot length, targets, quantiles,
training range, metrics, creation time, sha256 of every file). Format 1 (one booster
per target, no bands) still loads as a single band. Loading verifies all of it and
raises ``ModelRejected`` rather than serving a model that could silently compute
the wrong thing. No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gpu_kernels.features import FEATURE_NAMES, FEATURE_SPEC_HASH, QUANTILES, TARGETS
from training.blend import WINDOW_QUANTILES, Blend, apply_blend
from training.fit import BAND_EDGES_H

MANIFEST = "manifest.json"
FORMAT_VERSION = 3  # 3: optional "blend" (training.blend); 2: horizon bands; 1: one booster per target
READABLE_FORMATS = frozenset({1, 2, FORMAT_VERSION})
#: Sparse horizon grid (slots of 5 min): dense near term, coarser far out; the scorer interpolates.
BASE_HORIZONS: tuple[int, ...] = (1, 2, 3, 4, 6, 9, 12, 18, 24, 36, 48, 72, 96, 144, 192, 240, 288)
#: Feature-spec hashes this build can compute; a model built on anything else is refused.
KNOWN_FEATURE_HASHES: frozenset[str] = frozenset({FEATURE_SPEC_HASH})


class ModelRejected(Exception):
    """A model artifact that must not be served (corrupt, tampered or incompatible)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def default_horizons(horizon_slots: int) -> np.ndarray:
    """The sparse grid up to ``horizon_slots`` (always ending exactly there)."""
    if horizon_slots < 1:
        raise ValueError("horizon_slots must be >= 1")
    grid = [h for h in BASE_HORIZONS if h < horizon_slots] + [horizon_slots]
    return np.asarray(grid, dtype=np.int64)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_name(target: str, band: int, n_bands: int) -> str:
    return f"{target}.ubj" if n_bands == 1 else f"{target}.band{band}.ubj"


@dataclass
class ForecastModel:
    """Quantile forecaster over ``FEATURE_NAMES`` rows -> ``(n, len(TARGETS), len(QUANTILES))``.

    ``boosters[target]`` holds one booster per horizon band (``band_edges_h``, see ``training.fit``).
    """

    version: str
    boosters: dict[str, list[Any]]
    horizons: np.ndarray
    slot_s: int
    band_edges_h: tuple[float, ...] = BAND_EDGES_H
    feature_hash: str = FEATURE_SPEC_HASH
    targets: tuple[str, ...] = TARGETS
    quantiles: tuple[float, ...] = QUANTILES
    training_range: tuple[int, int] | None = None  # epoch seconds of the first/last training slot
    metrics: dict[str, float] = field(default_factory=dict)
    created: float = field(default_factory=time.time)
    blend: Blend | None = None  # the combination with naive forecasts fitted on validation data (None: boosters alone)

    def __post_init__(self) -> None:
        self.horizons = np.asarray(self.horizons, dtype=np.int64).reshape(-1)
        missing = [t for t in self.targets if t not in self.boosters]
        if missing:
            raise ValueError(f"no booster for targets {missing}")
        self.band_edges_h = tuple(float(e) for e in self.band_edges_h)
        for t in self.targets:
            if len(self.boosters[t]) != self.n_bands:
                raise ValueError(f"{t}: {len(self.boosters[t])} boosters for {self.n_bands} horizon bands")

    @property
    def n_bands(self) -> int:
        return len(self.band_edges_h) + 1

    def use_threads(self, n: int) -> ForecastModel:
        """Cap the CPU threads of every booster's predictions at ``n`` (0: leave XGBoost's one per core).
        Why: two workers on two cores, each with one thread per core, stalled each other
        (README sizing guide)."""
        if n > 0:
            for boosters in self.boosters.values():
                for booster in boosters:
                    booster.set_param({"nthread": int(n)})
        return self

    @property
    def window_quantile(self) -> float:
        """The dirty-rate quantile the migration-window search reads (chosen with the blend)."""
        return self.blend.window_quantile if self.blend is not None else WINDOW_QUANTILES[0]

    def predict(self, X: Any, device: str | None = None) -> Any:
        """Raw-scale quantiles ``(n, 3, 2)`` float32 on ``X``'s device, q90 >= q50 >= 0: the boosters'
        combined with the naive forecasts by ``blend`` when the model has one.

        ``device`` ('cpu' or 'gpu') defaults to where ``X`` lives; the engine (nvforest or
        XGBoost) is chosen by ``gpu_kernels.inference``.
        """
        q = self.predict_boosters(X, device)
        return q if self.blend is None else apply_blend(q, X, self.blend, self.slot_s, self.band_edges_h)

    def predict_boosters(self, X: Any, device: str | None = None) -> Any:
        """The boosters' quantiles alone (what ``training.blend.fit_blend`` combines)."""
        from training.fit import predict_boosters

        if X.shape[1] != len(FEATURE_NAMES):
            raise ValueError(f"X has {X.shape[1]} columns, the model expects {len(FEATURE_NAMES)} features")
        return predict_boosters(self.boosters, X, device, self.band_edges_h)

    # --- artifacts -------------------------------------------------------------
    def manifest(self, files: dict[str, str]) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "version": self.version,
            "feature_hash": self.feature_hash,
            "feature_names": list(FEATURE_NAMES),
            "horizons": [int(h) for h in self.horizons],
            "band_edges_h": list(self.band_edges_h),
            "slot_s": int(self.slot_s),
            "targets": list(self.targets),
            "quantiles": list(self.quantiles),
            "training_range": list(self.training_range) if self.training_range else None,
            "metrics": self.metrics,
            "created": self.created,
            "blend": self.blend.as_dict() if self.blend is not None else None,
            "files": files,
        }

    def artifact_bytes(self) -> dict[str, bytes]:
        """File name -> bytes, the manifest last (it seals the others by checksum)."""
        blobs = {
            _file_name(t, b, self.n_bands): bytes(booster.save_raw("ubj"))
            for t in self.targets
            for b, booster in enumerate(self.boosters[t])
        }
        files = {name: _sha256(data) for name, data in blobs.items()}
        blobs[MANIFEST] = json.dumps(self.manifest(files), indent=1, sort_keys=True).encode()
        return blobs

    def save(self, url: str) -> None:
        """Write the artifacts to a local dir or fsspec URL (manifest written last)."""
        import fsspec

        fs, root = fsspec.core.url_to_fs(url)
        fs.makedirs(root, exist_ok=True)
        for name, data in self.artifact_bytes().items():
            fs.pipe_file(f"{root.rstrip('/')}/{name}", data)

    @classmethod
    def load(
        cls,
        url: str,
        *,
        known_hashes: Iterable[str] = KNOWN_FEATURE_HASHES,
        slot_s: int | None = None,
    ) -> ForecastModel:
        """Read and verify a model; ``ModelRejected(reason)`` when it must not be served."""
        import fsspec

        fs, root = fsspec.core.url_to_fs(url)
        root = root.rstrip("/")
        try:
            raw = fs.cat_file(f"{root}/{MANIFEST}")
        except FileNotFoundError as exc:
            raise ModelRejected(f"{url}: no {MANIFEST}") from exc
        try:
            man = json.loads(raw)
            if not isinstance(man, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            raise ModelRejected(f"{url}: {MANIFEST} is not valid JSON ({exc})") from exc
        _check_manifest(man, url, frozenset(known_hashes), slot_s)
        edges = tuple(float(e) for e in man.get("band_edges_h", ()))
        n_bands = len(edges) + 1
        boosters = {
            target: [_load_booster(fs, root, url, _file_name(target, b, n_bands), man["files"]) for b in range(n_bands)]
            for target in man["targets"]
        }
        tr = man.get("training_range")
        return cls(
            version=man["version"],
            boosters=boosters,
            horizons=np.asarray(man["horizons"], dtype=np.int64),
            band_edges_h=edges,
            slot_s=int(man["slot_s"]),
            feature_hash=man["feature_hash"],
            targets=tuple(man["targets"]),
            quantiles=tuple(man["quantiles"]),
            training_range=(int(tr[0]), int(tr[1])) if tr else None,
            metrics=dict(man.get("metrics") or {}),
            created=float(man.get("created", 0.0)),
            blend=_blend_of(man, url),
        )


def _load_booster(fs: Any, root: str, url: str, name: str, checksums: dict[str, str]) -> Any:
    """One verified booster file (checksum, loadable, feature count) or ``ModelRejected``."""
    import xgboost as xgb

    try:
        data = fs.cat_file(f"{root}/{name}")
    except FileNotFoundError as exc:
        raise ModelRejected(f"{url}: missing {name}") from exc
    if _sha256(data) != checksums.get(name):
        raise ModelRejected(f"{url}: checksum mismatch for {name} (corrupt or tampered)")
    booster = xgb.Booster()
    try:
        booster.load_model(bytearray(data))
    except xgb.core.XGBoostError as exc:
        raise ModelRejected(f"{url}: {name} is not a loadable XGBoost model ({exc})") from exc
    if booster.num_features() != len(FEATURE_NAMES):
        raise ModelRejected(f"{url}: {name} expects {booster.num_features()} features, not {len(FEATURE_NAMES)}")
    return booster


def _blend_of(man: dict[str, Any], url: str) -> Blend | None:
    raw = man.get("blend")
    if raw is None:
        return None
    try:
        blend = Blend.from_dict(raw)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelRejected(f"{url}: manifest blend is invalid ({exc})") from exc
    if list(blend.horizons) != [int(h) for h in man["horizons"]]:
        raise ModelRejected(f"{url}: blend horizons {list(blend.horizons)} != model horizons {man['horizons']}")
    return blend


def _check_manifest(man: dict[str, Any], url: str, known: frozenset[str], slot_s: int | None) -> None:
    if man.get("format") not in READABLE_FORMATS:
        raise ModelRejected(f"{url}: manifest format {man.get('format')!r}, this build reads {sorted(READABLE_FORMATS)}")
    for key in ("version", "feature_hash", "horizons", "slot_s", "targets", "quantiles", "files"):
        if key not in man:
            raise ModelRejected(f"{url}: manifest lacks {key!r}")
    if man["feature_hash"] not in known:
        raise ModelRejected(
            f"{url}: feature spec {str(man['feature_hash'])[:12]} is unknown to this worker "
            f"(it computes {FEATURE_SPEC_HASH[:12]}); upgrade the worker or retrain"
        )
    if tuple(man["targets"]) != TARGETS or tuple(man["quantiles"]) != QUANTILES:
        raise ModelRejected(f"{url}: targets/quantiles {man['targets']}/{man['quantiles']} != {TARGETS}/{QUANTILES}")
    h = np.asarray(man["horizons"])
    if h.ndim != 1 or h.size == 0 or not np.issubdtype(h.dtype, np.integer) or (h < 1).any() or (np.diff(h) <= 0).any():
        raise ModelRejected(f"{url}: horizons must be increasing positive slot counts, got {man['horizons']}")
    edges = man.get("band_edges_h", [])
    if man["format"] == 1 and edges:
        raise ModelRejected(f"{url}: a format-1 manifest cannot have horizon bands")
    numeric = isinstance(edges, list) and all(isinstance(e, (int, float)) and e > 0 for e in edges)
    if not numeric or (np.diff(edges) <= 0).any():
        raise ModelRejected(f"{url}: band_edges_h must be increasing positive hours, got {edges!r}")
    if slot_s is not None and int(man["slot_s"]) != int(slot_s):
        raise ModelRejected(f"{url}: model slot is {man['slot_s']} s, this worker uses {slot_s} s")
