"""An LRU of query embeddings: texts by their string, images by a hash of the model's input pixels.

A chat front end asks the same questions again (suggested prompts, a user retrying, follow-ups that
repeat the last turn) and sends the same photo with every turn of a conversation; each hit saves a
CLIP forward pass (tens of milliseconds on CPU). Bounded by entries and by bytes (vector plus key),
thread-safe (queries are embedded in worker threads), with hit/miss/eviction counters per kind that
``server/metrics.py`` exports. Only query embeddings go here, never ingestion batches, which are
seen once and would only push the questions out.

An image is keyed by its preprocessed tensor (what the model sees), not its file: two uploads of the
same photo hit even after a re-encode that keeps the pixels, and hashing ~600 KB costs far less than
hashing a decoded 12-megapixel photo.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

KINDS = ("text", "image")
#: bookkeeping per entry besides the vector and the key (OrderedDict node, ndarray header)
_ENTRY_OVERHEAD = 200


def text_key(text: str) -> str:
    """The cache key of a text query (a digest: a 20,000-character question costs 64 bytes)."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=20).hexdigest()


def array_key(array: np.ndarray) -> str:
    """The cache key of a preprocessed image: a digest of its shape, dtype and bytes."""
    digest = hashlib.blake2b(digest_size=20)
    digest.update(f"{array.shape}{array.dtype}".encode())
    digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()


@dataclass(slots=True)
class EmbedCacheStats:
    """A snapshot of the counters; hits/misses/evictions per kind (``text``, ``image``)."""

    hits: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    misses: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    evictions: int = 0
    entries: int = 0
    bytes: int = 0
    max_entries: int = 0
    max_bytes: int = 0


class EmbedCache:
    """Thread-safe LRU of read-only float32 vectors, bounded by ``max_entries`` and ``max_bytes``."""

    def __init__(self, max_entries: int = 2048, max_bytes: int = 8 << 20) -> None:
        self.max_entries = max(0, max_entries)
        self.max_bytes = max(0, max_bytes)
        self._items: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._stats = EmbedCacheStats(max_entries=self.max_entries, max_bytes=self.max_bytes)

    def __len__(self) -> int:
        return len(self._items)

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0 and self.max_bytes > 0

    @staticmethod
    def _size(key: tuple[str, str], vector: np.ndarray) -> int:
        return vector.nbytes + len(key[1]) + _ENTRY_OVERHEAD

    def get(self, kind: str, key: str) -> np.ndarray | None:
        """The cached vector (read-only) or None; counts a hit or a miss for ``kind``."""
        with self._lock:
            vector = self._items.get((kind, key))
            if vector is None:
                self._stats.misses[kind] = self._stats.misses.get(kind, 0) + 1
                return None
            self._items.move_to_end((kind, key))
            self._stats.hits[kind] = self._stats.hits.get(kind, 0) + 1
            return vector

    def put(self, kind: str, key: str, vector: np.ndarray) -> np.ndarray:
        """Store a copy of ``vector`` (evicting the least recently used); returns the stored read-only copy."""
        stored = np.array(vector, dtype=np.float32, copy=True)
        stored.setflags(write=False)  # callers share it: nobody may change a cached vector in place
        item = (kind, key)
        size = self._size(item, stored)
        if not self.enabled or size > self.max_bytes:
            return stored
        with self._lock:
            old = self._items.pop(item, None)
            if old is not None:
                self._bytes -= self._size(item, old)
            self._items[item] = stored
            self._bytes += size
            while self._items and (len(self._items) > self.max_entries or self._bytes > self.max_bytes):
                evicted, vec = self._items.popitem(last=False)
                self._bytes -= self._size(evicted, vec)
                self._stats.evictions += 1
        return stored

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    def stats(self) -> EmbedCacheStats:
        """A consistent copy of the counters and the current size."""
        with self._lock:
            return EmbedCacheStats(
                hits=dict(self._stats.hits), misses=dict(self._stats.misses), evictions=self._stats.evictions,
                entries=len(self._items), bytes=self._bytes, max_entries=self.max_entries,
                max_bytes=self.max_bytes,
            )


__all__ = ["EmbedCache", "EmbedCacheStats", "array_key", "text_key"]
