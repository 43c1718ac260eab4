"""CLIP retrieval: embed the query, search the ``image`` and ``text`` vectors, fuse the lists.

A text query and an image query are each searched against both named vectors (an image compared
with captions helps: CLIP's cross-modal similarity is better calibrated than its intra-modal one).
That gives up to four ranked lists, named ``"<query>-><vector>"`` (``text->image``, ``text->text``,
``image->image``, ``image->text``), fused by reciprocal rank (RRF, ``1 / (rrf_k + rank)``) over
ranks, not scores: the cosine ranges of the lists differ (text->image near 0.3, image->image near
0.8), so a weighted score sum would need per-model calibration, and RRF needs none.

Best-field RRF: the two vectors of a snippet are two views of ONE document, so per query part a
snippet scores its best reciprocal rank over the two lists (Elasticsearch's ``best_fields``);
the query parts (text, image) are then summed, so agreement between a text and a photo still
counts. Summing over the two vectors instead (plain RRF) would rank every captioned image (two
vectors, two chances) above an uncaptioned one and an image query would not find the very same
uncaptioned image first; averaging over the vectors a snippet has over-rewards single-vector
snippets. Ties (same best rank in different lists) go to the higher raw cosine, so an exact
match (cosine 1.0) comes first; and the pool interleaves the lists, so every modality reaches
the re-ranker. ``clip_score`` is the fused score scaled to (0, 1]: 1.0 = first in a list for
every query part.

Several query images are averaged: their normalised embeddings are summed and re-normalised (the
centroid direction), one query instead of one search per image.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from retriever.embedder import ClipEmbedder
from retriever.errors import InvalidInput
from retriever.store.base import VECTOR_NAMES, VectorStore
from retriever.types import Candidate, ScoredPoint, SearchFilters, SnippetPayload


def list_name(query_kind: str, vector_name: str) -> str:
    """Key of one ranked list in ``Candidate.vector_scores``, e.g. ``"text->image"``."""
    return f"{query_kind}->{vector_name}"


@dataclass(slots=True)
class QueryVectors:
    """Normalised query embeddings; ``None`` where the query has no such part."""

    text: np.ndarray | None = None
    image: np.ndarray | None = None

    def items(self) -> list[tuple[str, np.ndarray]]:
        return [(kind, vec) for kind, vec in (("text", self.text), ("image", self.image)) if vec is not None]


@dataclass(slots=True)
class RetrievalResult:
    """Fused candidates (best first) and stage timings in milliseconds (``embed``, ``search``)."""

    candidates: list[Candidate]
    timings: dict[str, float] = field(default_factory=dict)
    query: QueryVectors = field(default_factory=QueryVectors)


def rrf_fuse(lists: dict[str, list[ScoredPoint]], rrf_k: int, limit: int) -> list[Candidate]:
    """Best-field RRF over lists named ``"<part>-><vector>"`` (see module docstring); best first."""
    best: dict[str, dict[str, float]] = {}  # id -> query part -> best reciprocal rank
    payloads: dict[str, SnippetPayload] = {}
    scores: dict[str, dict[str, float]] = {}
    for name, hits in lists.items():
        part = name.split("->")[0]
        for rank, hit in enumerate(hits, start=1):
            parts = best.setdefault(hit.id, {})
            parts[part] = max(parts.get(part, 0.0), 1.0 / (rrf_k + rank))
            payloads.setdefault(hit.id, hit.payload)
            scores.setdefault(hit.id, {}).setdefault(name, hit.score)
    fused = {pid: sum(parts.values()) for pid, parts in best.items()}
    n_parts = max(1, len({name.split("->")[0] for name in lists}))
    scale = (rrf_k + 1) / n_parts
    order = sorted(fused, key=lambda pid: (-fused[pid], -max(scores[pid].values()), pid))
    return [
        Candidate(id=pid, payload=payloads[pid], clip_score=fused[pid] * scale,
                  vector_scores=scores[pid], rank=position)
        for position, pid in enumerate(order[:limit], start=1)
    ]


class Retriever:
    """Query embedding + multi-vector search + RRF fusion over one VectorStore."""

    def __init__(self, embedder: ClipEmbedder, store: VectorStore, rrf_k: int = 60) -> None:
        self.embedder = embedder
        self.store = store
        self.rrf_k = rrf_k

    def _embed_sync(self, text: str | None, images: list[Image.Image]) -> QueryVectors:
        vectors = QueryVectors()
        if text:
            vectors.text = self.embedder.embed_texts([text])[0]
        if images:
            mean = self.embedder.embed_images(images).sum(axis=0)
            vectors.image = (mean / max(float(np.linalg.norm(mean)), 1e-12)).astype(np.float32)
        return vectors

    async def embed_query(self, text: str | None, images: list[Image.Image] | None = None) -> QueryVectors:
        """Embed the query in a worker thread (torch releases the GIL; the loop keeps serving)."""
        text = (text or "").strip() or None
        images = list(images or [])
        if text is None and not images:
            raise InvalidInput("a search needs text, at least one image, or both", param="query")
        return await asyncio.to_thread(self._embed_sync, text, images)

    async def search_vectors(
        self, query: QueryVectors, pool: int, filters: SearchFilters | None = None
    ) -> list[Candidate]:
        """Run every (query part x named vector) search concurrently and fuse them."""
        if pool < 1:
            raise InvalidInput(f"pool must be at least 1, not {pool}", param="pool")
        names: list[str] = []
        tasks = []
        for kind, vector in query.items():
            for vector_name in VECTOR_NAMES:
                names.append(list_name(kind, vector_name))
                tasks.append(self.store.search(vector_name, vector.tolist(), pool, filters))
        results = await asyncio.gather(*tasks)
        return rrf_fuse(dict(zip(names, results)), self.rrf_k, pool)

    async def search(
        self, text: str | None, images: list[Image.Image] | None = None, pool: int = 20,
        filters: SearchFilters | None = None,
    ) -> RetrievalResult:
        """Embed, search and fuse; the pool of at most ``pool`` candidates comes best first."""
        started = time.perf_counter()
        query = await self.embed_query(text, images)
        embedded = time.perf_counter()
        candidates = await self.search_vectors(query, pool, filters)
        done = time.perf_counter()
        timings = {
            "embed": (embedded - started) * 1000, "search": (done - embedded) * 1000,
            "total": (done - started) * 1000,
        }
        return RetrievalResult(candidates=candidates, timings=timings, query=query)
