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
every query part. ``plan.fusion`` picks the method (``retriever/fusion.py``): ``evidence`` (the
default) takes every list's hits and orders them by their evidence relevancy (identifiers held, words
covered, cosine standout; ``retriever/evidence.py``) into ``rank``, ``clip_score`` being the ``rrf`` score;
``rrf`` as above, ``weighted_rrf`` by each list's informativeness, Qdrant's ``dbsf``.

Several query images are averaged: their normalised embeddings are summed and re-normalised (the
centroid direction), one query instead of one search per image.

Lexical lists (``retrieval.mode`` ``hybrid``, the default, or ``lexical``): the query text and the text
read from the query images (OCR) are also searched with BM25 on the sparse ``lexical`` vector
(``text->lexical``, ``image->lexical``), as more lists of the same parts, so an exact identifier
("E-417") or a display photo's code reaches the pool even where CLIP is blind to it. BM25 scores
have no fixed range: in ties they count as a fraction of their list's best score.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from retriever import lexical
from retriever.embedder import ClipEmbedder
from retriever.errors import InvalidInput
from retriever.evidence import payload_text, text_features
from retriever.fusion import fuse, rrf
from retriever.plan import RetrievalPlan
from retriever.store.base import LEXICAL_VECTOR, PASSAGE_VECTOR, VECTOR_NAMES, VectorStore
from retriever.types import Candidate, ScoredPoint

if TYPE_CHECKING:
    from retriever.text_embedder import TextEmbedder

log = logging.getLogger(__name__)

OcrFn = Callable[[Image.Image], str]  # the text read in one image (blocking)


def list_name(query_kind: str, vector_name: str) -> str:
    """Key of one ranked list in ``Candidate.vector_scores``, e.g. ``"text->image"``."""
    return f"{query_kind}->{vector_name}"


@dataclass(slots=True)
class QueryVectors:
    """Normalised query embeddings; ``None`` where the query has no such part."""

    text: np.ndarray | None = None
    image: np.ndarray | None = None
    passage: np.ndarray | None = None  # the text embedder's vector of the query text (``text->passage``)

    def items(self) -> list[tuple[str, np.ndarray]]:
        """The CLIP parts (``text``, ``image``), searched against both CLIP vectors."""
        return [(kind, vec) for kind, vec in (("text", self.text), ("image", self.image)) if vec is not None]


@dataclass(slots=True)
class CandidatePool:
    """Fused candidates (best first) and stage timings in milliseconds (``embed``, ``search``)."""

    candidates: list[Candidate]
    timings: dict[str, float] = field(default_factory=dict)
    query: QueryVectors = field(default_factory=QueryVectors)
    degraded: list[str] = field(default_factory=list)  # "ocr" when the query images could not be read
    image_text: str = ""  # the text read from the query images


rrf_fuse = rrf  # best-field RRF (retriever/fusion.py), the name tests and callers know


async def _done(hits: list[ScoredPoint]) -> list[ScoredPoint]:
    return hits


def _drop_unread(task: asyncio.Task[tuple[QueryVectors, float]]) -> None:
    if not task.cancelled():
        task.exception()  # marks it read; whoever awaits the task still gets it


class Retriever:
    """Query embedding + multi-vector search + RRF fusion over one VectorStore."""

    def __init__(self, embedder: ClipEmbedder, store: VectorStore, rrf_k: int = 60,
                 text_embedder: TextEmbedder | None = None) -> None:
        self.embedder = embedder
        self.store = store
        self.rrf_k = rrf_k
        self.text_embedder = text_embedder
        self._lexical_checked = False
        self._passage_checked = False

    def _embed_sync(self, text: str | None, images: list[Image.Image]) -> QueryVectors:
        vectors = QueryVectors()
        if text:  # the query methods go through the embedder's cache (a repeated question: no forward pass)
            vectors.text = self.embedder.embed_query_text(text)
            if self.text_embedder is not None:
                vectors.passage = self.text_embedder.embed_query(text)
        if images:
            mean = self.embedder.embed_query_images(images).sum(axis=0)
            vectors.image = (mean / max(float(np.linalg.norm(mean)), 1e-12)).astype(np.float32)
        return vectors

    async def embed_query(self, text: str | None, images: list[Image.Image] | None = None) -> QueryVectors:
        """Embed the query in a worker thread (torch and ONNX Runtime release the GIL; the loop keeps serving)."""
        text = (text or "").strip() or None
        images = list(images or [])
        if text is None and not images:
            raise InvalidInput("a search needs text, at least one image, or both", param="query")
        return await asyncio.to_thread(self._embed_sync, text, images)

    async def search_vectors(
        self, query: QueryVectors, plan: RetrievalPlan | None = None, *,
        text: str | None = None, image_text: str | None = None,
        text_lexical: list[ScoredPoint] | None = None,
    ) -> list[Candidate]:
        """Run every (query part x vector) search of ``plan`` concurrently and fuse them.

        Dense lists (``image``, ``text``; ``passage`` in place of ``text->text`` where the collection and
        the retriever have the text embedder) unless ``plan.mode`` is ``lexical``; BM25 lists (``text->lexical``
        for the query text, ``image->lexical`` for the text read from the query images) unless it is
        ``dense``; ``plan.pool`` candidates, ``plan.filters``, ``plan.exact`` (no HNSW). ``text_lexical``:
        the ``text->lexical`` list already searched (``lexical_list``, run by ``search`` during the encode).
        """
        plan = plan or RetrievalPlan()
        pool, filters, mode, exact = plan.pool, plan.filters, plan.mode, plan.exact
        if pool < 1:
            raise InvalidInput(f"pool must be at least 1, not {pool}", param="pool")
        names: list[str] = []
        tasks = []
        if mode != "lexical":
            # With the text embedder's vector, text-to-text goes through it (``text->passage``) instead of
            # CLIP's text tower (``text->text``; alt-text trained, 77 tokens); CLIP keeps the cross-modal
            # lists (text->image, image->text) and image->image.
            passage = query.passage is not None and await self._has_passage()
            for kind, vector in query.items():
                for vector_name in VECTOR_NAMES:
                    if passage and kind == "text" and vector_name == "text":
                        continue
                    names.append(list_name(kind, vector_name))
                    tasks.append(self.store.search(vector_name, vector.tolist(), pool, filters, exact=exact))
            if passage and query.passage is not None:
                names.append(list_name("text", PASSAGE_VECTOR))
                tasks.append(self.store.search(PASSAGE_VECTOR, query.passage.tolist(), pool, filters, exact=exact))
        if mode != "dense" and not self._lexical_checked:
            self._lexical_checked = True
            if not await self.store.has_lexical():
                log.warning("collection %s has no lexical (BM25) vector: searching CLIP only; "
                            "`vlmrag backfill-lexical` adds it", self.store.description)
        if mode != "dense":
            for kind, words in (("text", text), ("image", image_text)):
                if kind == "text" and text_lexical is not None:
                    if text_lexical:
                        names.append(list_name(kind, LEXICAL_VECTOR))
                        tasks.append(_done(text_lexical))
                    continue
                sparse = lexical.query_vector(words or "")
                if sparse:
                    names.append(list_name(kind, LEXICAL_VECTOR))
                    tasks.append(self.store.search_lexical(sparse, pool, filters))
        return fuse(dict(zip(names, await asyncio.gather(*tasks))), self.rrf_k, pool, plan.fusion,
                    text=text or "", image_text=image_text or "")

    async def lexical_list(self, text: str | None, plan: RetrievalPlan) -> list[ScoredPoint] | None:
        """The ``text->lexical`` list of ``search_vectors`` (None where ``plan`` has none; [] for a text
        without tokens, as there), its hits' evidence features worked out (the ``evidence`` fusion reads
        them). ``search`` runs it while the query is encoded: it needs the text only."""
        if plan.mode == "dense" or plan.pool < 1:
            return None
        sparse = lexical.query_vector(text or "")
        if not sparse:
            return []
        hits = await self.store.search_lexical(sparse, plan.pool, plan.filters)
        if plan.fusion == "evidence":
            for hit in hits:
                text_features(payload_text(hit.payload))  # into its cache, while the encode runs
        return hits

    async def _has_passage(self) -> bool:
        """Whether the collection has the ``passage`` vector (logged once when it lacks it)."""
        has = await self.store.passage_spec() is not None
        if not has and not self._passage_checked:
            self._passage_checked = True
            log.warning("collection %s has no passage vector: text queries search CLIP text and BM25 only; "
                        "`vlmrag backfill-passage` adds it", self.store.description)
        return has

    def start_embed(self, text: str) -> asyncio.Task[tuple[QueryVectors, float]]:
        """``embed_query(text)`` started now, with its milliseconds: a caller that knows the text before the
        plan (``/v1/search`` while it reads the KB's defaults) hands it to ``search`` as ``embedded``."""
        async def run() -> tuple[QueryVectors, float]:
            t = time.perf_counter()
            vectors = await self.embed_query(text)
            return vectors, (time.perf_counter() - t) * 1000

        task = asyncio.ensure_future(run())
        task.add_done_callback(_drop_unread)  # a dropped one (the plan needed none) never warns
        return task

    async def search(
        self, text: str | None, images: list[Image.Image] | None = None, plan: RetrievalPlan | None = None,
        *, ocr: OcrFn | None = None, embedded: asyncio.Future[tuple[QueryVectors, float]] | None = None,
    ) -> CandidatePool:
        """Embed (and OCR the images, concurrently), search and fuse as ``plan`` says; best first.

        ``plan`` (default: ``RetrievalPlan()``) gives the pool size, filters, mode and ``exact``. ``ocr``
        reads the text in one query image (blocking; run in a thread beside CLIP). It is only used when
        the mode is not ``dense``; its failure costs the ``image->lexical`` list, never the search, and
        is reported in ``CandidatePool.degraded``. ``embedded``: ``start_embed(text)`` of this text, no
        images (used where the mode embeds).
        """
        plan = plan or RetrievalPlan()
        mode = plan.mode
        started = time.perf_counter()
        images = list(images or [])
        timings: dict[str, float] = {}
        degraded: list[str] = []

        async def read_images() -> str:
            if ocr is None or not images or mode == "dense":
                return ""
            t = time.perf_counter()
            try:
                texts = await asyncio.gather(*(asyncio.to_thread(ocr, image) for image in images))
            except Exception as exc:  # noqa: BLE001 - OCR must never fail a search
                log.warning("query-image OCR failed: %s: %s", type(exc).__name__, exc)
                degraded.append("ocr")
                return ""
            finally:
                timings["ocr"] = (time.perf_counter() - t) * 1000
            return "\n".join(t for t in texts if t)

        async def embed() -> QueryVectors:
            if mode == "lexical":
                if not (text or "").strip() and not images:
                    raise InvalidInput("a search needs text, at least one image, or both", param="query")
                return QueryVectors()
            if embedded is not None and not images:
                vectors, timings["embed"] = await embedded
                return vectors
            t = time.perf_counter()
            vectors = await self.embed_query(text, images)
            timings["embed"] = (time.perf_counter() - t) * 1000
            return vectors

        # The text's BM25 list needs no embedding: it is searched (and its hits' evidence features
        # worked out) on the loop while CLIP encodes in its thread, off the time after the encode.
        query, image_text, text_lexical = await asyncio.gather(embed(), read_images(), self.lexical_list(text, plan))
        searched = time.perf_counter()
        candidates = await self.search_vectors(query, plan, text=text, image_text=image_text,
                                               text_lexical=text_lexical)
        done = time.perf_counter()
        timings.setdefault("embed", 0.0)
        timings.update({"search": (done - searched) * 1000, "total": (done - started) * 1000})
        return CandidatePool(candidates=candidates, timings=timings, query=query, degraded=degraded,
                               image_text=image_text)
