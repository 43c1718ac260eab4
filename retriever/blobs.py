"""Content-addressed blob store for image originals and thumbnails (local directory; S3 later).

A key is ``<2 hex>/<62 hex><suffix>`` where the hex is the sha256 of the bytes, e.g.
``ab/cdef….png``: putting the same bytes twice is a no-op and returns the same key. Keys are
validated against that exact shape, so a key can never name a path outside the store.
The interface is small and synchronous; async callers wrap calls in ``asyncio.to_thread``.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol, runtime_checkable

from retriever.errors import InvalidInput, NotFound

_KEY = re.compile(r"^[0-9a-f]{2}/[0-9a-f]{62}(\.[a-z0-9]{1,10})?$")
_SUFFIX = re.compile(r"^(\.[a-z0-9]{1,10})?$")
_HEX2 = re.compile(r"^[0-9a-f]{2}$")


def blob_key(data: bytes, suffix: str) -> str:
    """The content-addressed key of ``data`` with a file suffix such as ``.png`` (or ``""``)."""
    suffix = suffix.lower()
    if not _SUFFIX.match(suffix):
        raise InvalidInput(f"invalid blob suffix {suffix!r}")
    digest = hashlib.sha256(data).hexdigest()
    return f"{digest[:2]}/{digest[2:]}{suffix}"


def validate_key(key: str) -> str:
    """Return ``key`` if it has the exact content-addressed shape, else raise ``InvalidInput``."""
    if not isinstance(key, str) or not _KEY.match(key):
        raise InvalidInput(f"invalid blob key {key!r}")
    return key


@runtime_checkable
class BlobStore(Protocol):
    """Where original images and thumbnails live; keys come from ``put``."""

    #: human-readable description, e.g. "local:/data/blobs" or "s3://bucket/prefix"
    description: str

    def put(self, data: bytes, suffix: str) -> str:
        """Store ``data`` (idempotent) and return its content-addressed key."""

    def get(self, key: str) -> bytes:
        """The bytes under ``key``; ``NotFound`` if absent."""

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None:
        """Remove ``key``; deleting a missing key is not an error."""

    def path_for(self, key: str) -> Path | None:
        """A local file path for ``key`` if the backend has one (for zero-copy responses), else None."""

    def delete_all(self) -> int | None:
        """Remove every blob of this store (a knowledge base's namespace); the count when the backend knows it."""


class LocalBlobStore:
    """Blobs as files under ``root``; writes are atomic (temp file, fsync, rename, fsync dir)."""

    def __init__(self, root: Path, *, fsync: bool = True) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._fsync = fsync
        self.description = f"local:{self.root}"
        self._holds = 0  # while > 0 (a backup archiving blobs in place), deletes wait in _deferred
        self._deferred: set[str] = set()
        self._hold_lock = threading.Lock()

    @contextmanager
    def deletes_held(self) -> Iterator[None]:
        """While held, ``delete`` only notes the key; the files go when the last hold ends.

        A backup takes its point-in-time view of the points, then archives their blobs from here: a
        snippet deleted meanwhile must not take its blobs out from under it. A blob put again while
        its delete waits is kept.
        """
        with self._hold_lock:
            self._holds += 1
        try:
            yield
        finally:
            with self._hold_lock:
                self._holds -= 1
                doomed, self._deferred = (self._deferred, set()) if not self._holds else (set(), self._deferred)
            for key in sorted(doomed):
                self._path(key).unlink(missing_ok=True)

    def keys(self) -> list[str]:
        """Every blob key this store holds, sorted (one ``scandir`` a ``<2 hex>/`` folder: ~1 µs a blob).

        Other knowledge bases' namespaces (``kbs/<name>/``) and files being written (``.*.tmp``) are not
        keys and are left out.
        """
        found: list[str] = []
        try:
            folders = sorted(e.name for e in os.scandir(self.root) if len(e.name) == 2 and e.is_dir())
        except FileNotFoundError:
            return found
        for folder in folders:
            if not _HEX2.match(folder):
                continue
            with os.scandir(self.root / folder) as entries:
                names = sorted(e.name for e in entries if not e.name.startswith("."))
            found.extend(key for name in names if _KEY.match(key := f"{folder}/{name}"))
        return found

    def key_path(self, key: str) -> Path:
        """Where blob ``key`` lives (checked by shape only, no file system call: for bulk reads)."""
        return self.root / validate_key(key)

    def _path(self, key: str) -> Path:
        path = (self.root / validate_key(key)).resolve()
        # belt and braces: the regex already forbids "..", "/" prefixes and backslashes
        if not path.is_relative_to(self.root):
            raise InvalidInput(f"invalid blob key {key!r}")
        return path

    def put(self, data: bytes, suffix: str) -> str:
        key = blob_key(data, suffix)
        path = self._path(key)
        if self._deferred:
            with self._hold_lock:
                self._deferred.discard(key)
        if path.exists():  # content-addressed and written atomically: an existing file is complete
            return key
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                if self._fsync:
                    fh.flush()
                    os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if self._fsync:
            # the rename itself must be durable before a point referencing it is written
            _fsync_dir(path.parent)
        return key

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError as exc:
            raise NotFound(f"no blob {key!r}") from exc

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        path = self._path(key)
        with self._hold_lock:
            if self._holds:
                self._deferred.add(key)
                return
        path.unlink(missing_ok=True)

    def path_for(self, key: str) -> Path | None:
        path = self._path(key)
        return path if path.is_file() else None

    def delete_all(self) -> int | None:
        """Remove every blob under this store's root (a knowledge base's namespace)."""
        shutil.rmtree(self.root, ignore_errors=True)
        return None


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
