"""Blob store contract, run against every backend.

``BlobStoreContract`` holds the tests; a backend's test class subclasses it and provides a
``blob_store`` fixture (the S3 backend adds ``class TestS3BlobStore(BlobStoreContract)`` with a
moto-backed fixture and inherits every test).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from retriever.blobs import BlobStore, LocalBlobStore, blob_key
from retriever.errors import InvalidInput, NotFound

ESCAPES = [
    "../outside.png",
    "/etc/passwd",
    "ab/../../etc/passwd",
    "..",
    "",
    "ab/" + "0" * 62 + "/../../x",
    "ab\\..\\..\\x",
    "AB/" + "0" * 62 + ".png",  # upper-case hex is not a key we ever produce
    "ab/" + "0" * 61 + ".png",
    "ab/" + "0" * 62 + ".png\x00.txt",
    "ab/" + "0" * 62 + "./",
]


class BlobStoreContract:
    """Behaviour every BlobStore must have."""

    @pytest.fixture
    def blob_store(self) -> BlobStore:  # pragma: no cover - overridden by each backend
        raise NotImplementedError

    def test_is_a_blob_store(self, blob_store: BlobStore) -> None:
        assert isinstance(blob_store, BlobStore)
        assert blob_store.description

    def test_put_get_roundtrip(self, blob_store: BlobStore) -> None:
        data = os.urandom(5000)
        key = blob_store.put(data, ".png")
        digest = hashlib.sha256(data).hexdigest()
        assert key == f"{digest[:2]}/{digest[2:]}.png" == blob_key(data, ".png")
        assert blob_store.get(key) == data
        assert blob_store.exists(key)

    def test_put_is_idempotent(self, blob_store: BlobStore) -> None:
        data = b"same bytes"
        assert blob_store.put(data, ".jpg") == blob_store.put(data, ".jpg")
        assert blob_store.get(blob_key(data, ".jpg")) == data

    def test_different_content_different_key(self, blob_store: BlobStore) -> None:
        assert blob_store.put(b"one", ".jpg") != blob_store.put(b"two", ".jpg")

    def test_empty_suffix_and_empty_data(self, blob_store: BlobStore) -> None:
        key = blob_store.put(b"", "")
        assert blob_store.get(key) == b""

    def test_missing_key(self, blob_store: BlobStore) -> None:
        key = blob_key(b"never stored", ".png")
        assert not blob_store.exists(key)
        with pytest.raises(NotFound):
            blob_store.get(key)
        assert blob_store.path_for(key) is None

    def test_delete(self, blob_store: BlobStore) -> None:
        key = blob_store.put(b"to delete", ".gif")
        blob_store.delete(key)
        assert not blob_store.exists(key)
        with pytest.raises(NotFound):
            blob_store.get(key)
        blob_store.delete(key)  # deleting twice is fine

    @pytest.mark.parametrize("key", ESCAPES)
    def test_malformed_keys_are_refused(self, blob_store: BlobStore, key: str) -> None:
        for call in (blob_store.get, blob_store.exists, blob_store.delete, blob_store.path_for):
            with pytest.raises(InvalidInput):
                call(key)

    @pytest.mark.parametrize("suffix", ["../x", "/png", ".PNG/../", ".a b", "png.", ".verylongsuffixx"])
    def test_bad_suffix_refused(self, blob_store: BlobStore, suffix: str) -> None:
        with pytest.raises(InvalidInput):
            blob_store.put(b"x", suffix)


class TestLocalBlobStore(BlobStoreContract):
    @pytest.fixture
    def blob_store(self, tmp_path: Path) -> LocalBlobStore:
        return LocalBlobStore(tmp_path / "blobs")

    def test_files_live_under_root_and_no_temp_files_remain(self, blob_store: LocalBlobStore) -> None:
        key = blob_store.put(b"payload", ".png")
        path = blob_store.path_for(key)
        assert path is not None and path.is_relative_to(blob_store.root) and path.read_bytes() == b"payload"
        assert [p.name for p in blob_store.root.rglob(".*.tmp")] == []

    def test_failed_write_leaves_nothing(self, blob_store: LocalBlobStore, monkeypatch) -> None:
        def broken_replace(src: object, dst: object) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(os, "replace", broken_replace)
        with pytest.raises(OSError):
            blob_store.put(b"never lands", ".png")
        monkeypatch.undo()
        assert not blob_store.exists(blob_key(b"never lands", ".png"))
        assert list(blob_store.root.rglob("*.tmp")) == []

    def test_symlinked_escape_is_refused(self, blob_store: LocalBlobStore, tmp_path: Path) -> None:
        outside = tmp_path / "outside"
        outside.mkdir()
        (blob_store.root / "ab").symlink_to(outside, target_is_directory=True)
        with pytest.raises(InvalidInput):
            blob_store.get("ab/" + "0" * 62 + ".png")
