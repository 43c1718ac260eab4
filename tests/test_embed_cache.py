"""The query-embedding LRU: bounds, counters, read-only vectors; its use in the query path and /metrics."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np
import pytest

from retriever.embed_cache import EmbedCache, array_key, text_key
from retriever.embedder import ClipEmbedder
from retriever.search import Retriever
from server.metrics import Metrics


def _vec(value: float, dim: int = 8) -> np.ndarray:
    return np.full(dim, value, dtype=np.float32)


def test_hits_misses_and_read_only_copies() -> None:
    cache = EmbedCache(max_entries=4, max_bytes=1 << 20)
    assert cache.get("text", "a") is None
    original = _vec(1.0)
    stored = cache.put("text", "a", original)
    original[:] = 7.0  # the caller's array is not the cached one
    got = cache.get("text", "a")
    assert got is stored and float(got[0]) == 1.0
    with pytest.raises(ValueError):
        got[0] = 2.0  # read-only: one request cannot change another's query vector
    stats = cache.stats()
    assert stats.hits == {"text": 1, "image": 0} and stats.misses == {"text": 1, "image": 0}
    assert stats.entries == 1 and stats.bytes > original.nbytes


def test_lru_bound_by_entries() -> None:
    cache = EmbedCache(max_entries=2, max_bytes=1 << 20)
    cache.put("text", "a", _vec(1))
    cache.put("text", "b", _vec(2))
    assert cache.get("text", "a") is not None  # a is now the most recent
    cache.put("image", "c", _vec(3))
    assert cache.get("text", "b") is None and cache.get("text", "a") is not None
    assert len(cache) == 2 and cache.stats().evictions == 1


def test_lru_bound_by_bytes() -> None:
    one = EmbedCache(max_entries=100, max_bytes=1 << 20)._size(("text", text_key("x")), _vec(0, 256))
    cache = EmbedCache(max_entries=100, max_bytes=3 * one)
    for i in range(5):
        cache.put("text", text_key(str(i)), _vec(i, 256))
    stats = cache.stats()
    assert stats.entries == 3 and stats.bytes <= 3 * one and stats.evictions == 2
    assert cache.get("text", text_key("0")) is None and cache.get("text", text_key("4")) is not None
    cache.put("text", "same", _vec(1, 256))
    cache.put("text", "same", _vec(2, 256))  # replacing an entry does not count its bytes twice
    assert cache.stats().bytes <= 3 * one


def test_disabled_and_oversized_entries_are_not_kept() -> None:
    off = EmbedCache(max_entries=0)
    off.put("text", "a", _vec(1))
    assert len(off) == 0 and not off.enabled
    tiny = EmbedCache(max_entries=10, max_bytes=64)
    assert tiny.put("text", "a", _vec(1, 512)) is not None and len(tiny) == 0


def test_keys() -> None:
    assert text_key("a") != text_key("a ") and len(text_key("x" * 20_000)) == 40
    image = np.zeros((3, 4, 4), dtype=np.float32)
    other = image.copy()
    other[0, 0, 0] = 1e-3
    assert array_key(image) == array_key(image.copy()) != array_key(other)
    assert array_key(image) != array_key(image.reshape(3, 2, 8))


def test_thread_safety() -> None:
    cache = EmbedCache(max_entries=50, max_bytes=1 << 20)

    def work(offset: int) -> None:
        for i in range(500):
            key = str((i + offset) % 80)
            if cache.get("text", key) is None:
                cache.put("text", key, _vec(i))

    threads = [threading.Thread(target=work, args=(n * 7,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stats = cache.stats()
    assert stats.entries <= 50 and stats.hits["text"] + stats.misses["text"] == 2000


@pytest.fixture
def cached_embedder(embedder: ClipEmbedder) -> Iterator[ClipEmbedder]:
    """The session's tiny embedder with a fresh cache for one test (restored after)."""
    before = embedder.cache
    embedder.cache = EmbedCache(max_entries=32)
    yield embedder
    embedder.cache = before


def test_embedder_query_methods_use_the_cache(cached_embedder: ClipEmbedder, sample_images) -> None:
    direct_text = cached_embedder.embed_texts(["where is the valve?"])[0]
    first = cached_embedder.embed_query_text("where is the valve?")
    second = cached_embedder.embed_query_text("where is the valve?")
    assert second is first
    np.testing.assert_allclose(first, direct_text, atol=1e-6)
    direct = cached_embedder.embed_images(sample_images[:3])
    mixed = cached_embedder.embed_query_images([sample_images[1]])  # one miss, cached
    np.testing.assert_allclose(mixed[0], direct[1], atol=1e-6)
    rows = cached_embedder.embed_query_images(sample_images[:3])  # hit in the middle, misses around it
    np.testing.assert_allclose(rows, direct, atol=1e-6)
    assert rows.shape == (3, cached_embedder.dim) and rows.dtype == np.float32
    stats = cached_embedder.cache.stats()  # type: ignore[union-attr]
    assert stats.hits == {"text": 1, "image": 1} and stats.misses == {"text": 1, "image": 3}
    # ingestion batches never touch it
    cached_embedder.embed_texts(["not a query"])
    assert cached_embedder.cache.stats().entries == 4  # type: ignore[union-attr]


async def test_retriever_query_path_hits_the_cache(cached_embedder: ClipEmbedder, store, sample_images) -> None:
    retriever = Retriever(cached_embedder, store)
    one = await retriever.embed_query("pump P-101 pressure", [sample_images[0], sample_images[2]])
    two = await retriever.embed_query("  pump P-101 pressure ", [sample_images[0], sample_images[2]])
    assert one.text is not None and two.text is not None and one.image is not None and two.image is not None
    np.testing.assert_array_equal(one.text, two.text)
    np.testing.assert_array_equal(one.image, two.image)
    stats = cached_embedder.cache.stats()  # type: ignore[union-attr]
    assert stats.hits == {"text": 1, "image": 2} and stats.misses == {"text": 1, "image": 2}


def test_metrics_export_the_counters() -> None:
    metrics = Metrics()
    assert b'vlmrag_embed_cache_hits_total{kind="text"} 0.0' in metrics.render()  # no cache yet: zeros
    cache = EmbedCache(max_entries=1)
    metrics.watch_embed_cache(cache)
    cache.get("text", "a")
    cache.put("text", "a", _vec(1))
    cache.get("text", "a")
    cache.put("image", "b", _vec(2))  # evicts "a"
    text = metrics.render().decode()
    assert 'vlmrag_embed_cache_hits_total{kind="text"} 1.0' in text
    assert 'vlmrag_embed_cache_misses_total{kind="text"} 1.0' in text
    assert 'vlmrag_embed_cache_misses_total{kind="image"} 0.0' in text
    assert "vlmrag_embed_cache_evictions_total 1.0" in text
    assert "vlmrag_embed_cache_entries 1.0" in text
