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
#: Listing fields that change when a file is rewritten: local (size, mtime, ctime, inode), s3fs (ETag,
#: LastModified), gcsfs (etag, updated, generation), memory (created).
FINGERPRINT_KEYS = ("size", "mtime", "created", "ino", "ETag", "etag", "LastModified", "updated", "generation")


class NoLoadableModel(ModelRejected):
    """The store has versions but none of them may be served (unlike an empty store: ``FileNotFoundError``)."""

    def __init__(self, reason: str, skipped: list[tuple[str, str]]) -> None:
        super().__init__(reason)
        self.skipped = skipped


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
        names = (_name(e) for e in self._ls(self.root, detail=False))
        return sorted(n for n in names if VERSION_RE.match(n))

    def fingerprint(self, version: str) -> str:
        """A cheap digest of ``version``'s directory listing (names, sizes, times or etags); "" when absent.

        It changes when any file of the version is added, removed or rewritten, which is what tells a
        watcher that a refused version (say, seen while still being copied) deserves another look.
        """
        if not VERSION_RE.match(version):
            return ""  # never list outside the store; load() refuses such a name anyway
        lines = sorted(
            "\t".join([_name(e["name"]), *(f"{k}={e[k]}" for k in FINGERPRINT_KEYS if k in e)])
            for e in self._ls(self._path(version), detail=True)
        )
        return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16] if lines else ""

    def _ls(self, path: str, *, detail: bool) -> list[Any]:
        """A fresh listing (s3fs and gcsfs cache listings for the life of the process); [] when absent."""
        self.fs.invalidate_cache(path)
        try:
            return list(self.fs.ls(path, detail=detail))
        except FileNotFoundError:
            return []

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

    def load_newest_loadable(self, slot_s: int | None = None) -> tuple[ForecastModel, list[tuple[str, str]]]:
        """The model a starting worker should serve, and the ``(version, reason)`` of those refused first.

        A broken ``LATEST`` (corrupt, half-uploaded, incompatible) must not crash-loop workers, so
        every version is tried: ``LATEST`` first, then the older ones newest first, then those newer
        than ``LATEST`` oldest first (a rollback put them aside). Only ``ModelRejected`` skips a
        version; other errors (store unreachable) propagate. Raises ``FileNotFoundError`` for an
        empty store and ``NoLoadableModel`` when versions exist but none loads. Nothing is written.
        """
        latest = self.latest_version()
        candidates = self._fallback_order(latest)
        if not candidates:
            raise FileNotFoundError(f"model store {self.url} is empty (no {LATEST}, no versions)")
        skipped: list[tuple[str, str]] = []
        for version in candidates:
            try:
                return self.load(version, slot_s=slot_s), skipped
            except ModelRejected as exc:
                skipped.append((version, exc.reason))
        more = f" (and {len(skipped) - 1} more refused)" if len(skipped) > 1 else ""
        summary = f"{self.url}: none of the {len(skipped)} versions loads (LATEST: {latest or 'none'})"
        raise NoLoadableModel(f"{summary}; {skipped[0][1]}{more}", skipped)

    def _fallback_order(self, latest: str | None) -> list[str]:
        """``latest``, then older versions newest first, then newer ones oldest first."""
        versions = self.list_versions()
        anchor = latest if latest and VERSION_RE.match(latest) else None  # a garbage LATEST orders nothing
        older = [v for v in versions if anchor is None or v < anchor]
        newer = [v for v in versions if anchor is not None and v > anchor]
        return ([latest] if latest else []) + older[::-1] + newer


def _name(entry: str) -> str:
    """The last component of a listed path (local paths, ``bucket/prefix/x`` and URLs alike)."""
    return entry.rstrip("/").rsplit("/", 1)[-1]


def _protocols(fs: Any) -> tuple[str, ...]:
    p = fs.protocol
    return (p,) if isinstance(p, str) else tuple(p)
