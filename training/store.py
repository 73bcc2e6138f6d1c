"""Versioned model store on fsspec: ``<url>/<version>/`` artifacts plus a ``LATEST`` pointer.

Readers only ever follow ``LATEST``, and it is replaced atomically after the version
directory is complete, so a worker never sees a half-published model: locally the
version is written to a hidden temp dir and renamed, and ``LATEST`` is written to a
temp file and ``os.replace``d; on object stores (``s3://`` via s3fs) every object is
one PUT and ``LATEST`` is written last.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import time
import uuid
from typing import Any

from training.model import KNOWN_FEATURE_HASHES, ForecastModel, ModelRejected

LATEST = "LATEST"
#: ``20261127T034500Z-1a2b3c4d``: sorts by publication time.
VERSION_RE = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{8}$")


def new_version(model: ForecastModel, now: float | None = None) -> str:
    """Time-sortable version id: UTC publication time + short hash of the model bytes."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
    h = hashlib.sha256()
    for t in model.targets:
        for booster in model.boosters[t]:
            h.update(bytes(booster.save_raw("ubj")))
    return f"{stamp}-{h.hexdigest()[:8]}"


class ModelStore:
    """Publish, list and load models under one fsspec URL (local dir by default)."""

    def __init__(self, url: str) -> None:
        import fsspec

        self.url = url.rstrip("/")
        self.fs, root = fsspec.core.url_to_fs(self.url)
        self.root = root.rstrip("/")
        self._local = "file" in _protocols(self.fs)

    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def _url(self, version: str) -> str:
        return f"{self.url}/{version}"

    # --- write ---------------------------------------------------------------
    def publish(self, model: ForecastModel, *, now: float | None = None) -> str:
        """Store ``model`` under a new time-sorted version and point ``LATEST`` at it; returns the version."""
        version = new_version(model, now)
        stored = dataclasses.replace(model, version=version)
        blobs = stored.artifact_bytes()
        if self._local:
            os.makedirs(self.root, exist_ok=True)
            tmp = self._path(f".{version}.tmp-{uuid.uuid4().hex[:8]}")
            os.makedirs(tmp)
            for name, data in blobs.items():
                with open(os.path.join(tmp, name), "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            os.rename(tmp, self._path(version))
        else:
            self.fs.makedirs(self._path(version), exist_ok=True)
            for name, data in blobs.items():  # manifest last: it seals the others
                self.fs.pipe_file(self._path(version, name), data)
        self._set_latest(version)
        model.version = version
        return version

    def _set_latest(self, version: str) -> None:
        data = (version + "\n").encode()
        if self._local:
            tmp = self._path(f".{LATEST}.tmp-{uuid.uuid4().hex[:8]}")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._path(LATEST))
        else:
            self.fs.pipe_file(self._path(LATEST), data)  # a single PUT is atomic on object stores

    # --- read ----------------------------------------------------------------
    def latest_version(self) -> str | None:
        """The version ``LATEST`` names, or None for an empty store."""
        try:
            raw = self.fs.cat_file(self._path(LATEST))
        except FileNotFoundError:
            return None
        version = raw.decode("utf-8", "replace").strip()
        return version or None

    def list_versions(self) -> list[str]:
        """Published versions, oldest first (half-written temp dirs excluded)."""
        try:
            entries = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        names = (e.rstrip("/").rsplit("/", 1)[-1] for e in entries)
        return sorted(n for n in names if VERSION_RE.match(n))

    def load(self, version: str | None = None, *, slot_s: int | None = None) -> ForecastModel:
        """Load ``version`` (default ``LATEST``), verified; ``ModelRejected`` if it must not be served."""
        version = version or self.latest_version()
        if version is None:
            raise FileNotFoundError(f"model store {self.url} is empty (no {LATEST})")
        if not VERSION_RE.match(version):
            raise ModelRejected(f"{self.url}: {version!r} is not a model version")
        model = ForecastModel.load(self._url(version), known_hashes=KNOWN_FEATURE_HASHES, slot_s=slot_s)
        if model.version != version:
            raise ModelRejected(f"{self._url(version)}: manifest says version {model.version!r}")
        return model


def _protocols(fs: Any) -> tuple[str, ...]:
    p = fs.protocol
    return (p,) if isinstance(p, str) else tuple(p)
