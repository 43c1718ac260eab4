"""The ``rerank`` scorer: a dedicated multimodal cross-encoder judges the whole pool in ONE request.

The ranker is a vLLM started with ``--runner pooling`` on a ranking model (jina-reranker-m0:
``JinaVLForRanking``; ``LlamaNemotronVLForSequenceClassification``), reached through its ``/rerank``
API (``server/ranker_client.py::RankerClient``). The request carries the query (its text, and its
images as ``image_url`` parts: vLLM's ``ScoreMultiModalParam``) and one document per candidate: the
snippet's image, if it has one, and its text and OCR text. For a one-label model vLLM returns
``relevance_score`` = sigmoid(logit), the model's probability of relevance, which is the relevancy.

Faults follow the ``vlm`` scorer's rules, with the ``evidence`` scorer as the fallback
(``retriever/evidence.py``): a candidate without a valid score (the ranker left it out, sent NaN or
something outside [0, 1], its image could not be loaded) gets its evidence relevancy, path
``evidence_fallback``, degraded ``rerank_partial``; when none could be scored (HTTP error, timeout,
no ranker configured) the report is the evidence scorer's with ``degraded: ["rerank"]``.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from retriever.evidence import evidence_relevancy
from retriever.images import data_url as image_data_url
from retriever.types import Candidate

if TYPE_CHECKING:
    from retriever.scorers import ImageLoader, ScoreReport, YesNoJudge

log = logging.getLogger(__name__)

PATH_RANKER = "ranker"
PATH_EVIDENCE_FALLBACK = "evidence_fallback"
SCORE_TOLERANCE = 1e-6  # a probability a hair outside [0, 1] (float rounding) is clamped, anything else refused

RankInput = str | dict[str, Any]  # vLLM's ScoreInput: plain text, or {"content": [image_url / text parts]}


class Ranker(Protocol):
    """What the scorer needs of the ranker client: one ``/rerank`` call (``RankerClient.rerank``)."""

    model: str

    async def rerank(self, query: RankInput, documents: list[RankInput]) -> list[dict[str, Any]]:
        """The response's ``results`` (``{"index", "relevance_score", ...}``); raises on upstream failure."""
        ...


def rank_query(query_text: str, query_image_urls: Sequence[str]) -> RankInput:
    """The query: its text, with its images first as ``image_url`` parts when it has any."""
    if not query_image_urls:
        return query_text
    parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": url}} for url in query_image_urls]
    if query_text:
        parts.append({"type": "text", "text": query_text})
    return {"content": parts}


def rank_document(candidate: Candidate, image_url: str | None, *, max_text_chars: int = 2000) -> RankInput:
    """One candidate as a document: its image (if any), then its text and OCR text."""
    texts = [(candidate.payload.text or "").strip()[:max_text_chars],
             (candidate.payload.ocr_text or "").strip()[:max_text_chars]]
    text = "\n".join(t for t in texts if t)
    if image_url is None:
        return text
    parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": image_url}}]
    if text:
        parts.append({"type": "text", "text": text})
    return {"content": parts}


def valid_scores(results: object, n_documents: int) -> dict[int, float]:
    """Document index -> probability for the results that hold one; the rest are left out (logged)."""
    if not isinstance(results, list):
        raise TypeError(f"the ranker's results are a {type(results).__name__}, not a list")
    scores: dict[int, float] = {}
    refused = 0
    for item in results:
        index = item.get("index") if isinstance(item, dict) else None
        value = item.get("relevance_score") if isinstance(item, dict) else None
        if (not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < n_documents
                or index in scores or not isinstance(value, (int, float)) or isinstance(value, bool)
                or not math.isfinite(value) or not -SCORE_TOLERANCE <= value <= 1 + SCORE_TOLERANCE):
            refused += 1
            continue
        scores[index] = min(1.0, max(0.0, float(value)))
    if refused or len(scores) < n_documents:
        log.warning("the ranker scored %d of %d documents (%d results refused: no index, NaN or not in [0, 1])",
                    len(scores), n_documents, refused)
    return scores


class RankerScorer:
    """A dedicated cross-encoder's probability of relevance, every candidate in one ``/rerank`` request."""

    name: ClassVar[str] = "rerank"
    description: ClassVar[str] = ("A dedicated multimodal cross-encoder (vLLM --runner pooling, /rerank) scores "
                                  "the whole pool in one call; relevancy = its probability.")
    threshold: ClassVar[bool] = True
    uses_model: ClassVar[bool] = True
    requires: ClassVar[str] = "ranker_url"  # the setting it needs (GET /v1/scorers: available or not)

    def __init__(self, judge: YesNoJudge) -> None:
        self.judge = judge

    async def score(
        self, query_text: str, query_images: list[bytes], candidates: Sequence[Candidate], load_image: ImageLoader,
        *, image_text: str = "",
    ) -> ScoreReport:
        """Relevancy in [0, 1] for every candidate; never raises for upstream failures."""
        from retriever.scorers import PATH_EVIDENCE, ScoreReport  # scorers.py registers this class

        if not candidates:
            return ScoreReport({}, {}, self.name)
        evidence = evidence_relevancy(query_text, image_text, candidates)
        degraded = ScoreReport(evidence, {c.id: PATH_EVIDENCE for c in candidates}, "evidence", ["rerank"])
        ranker: Ranker | None = getattr(self.judge, "ranker", None)
        if ranker is None:
            log.warning("scorer 'rerank' asked for but no ranker is configured (VLMRAG_RANKER_URL): "
                        "evidence relevancy instead")
            return degraded
        try:
            async with asyncio.timeout(self.judge.timeout_s):
                scored = await self._rank(ranker, query_text, query_images, candidates, load_image)
        except Exception as exc:  # noqa: BLE001 - any upstream failure degrades, never fails the request
            log.warning("re-rank by the ranker failed: %s: %s", type(exc).__name__, getattr(exc, "message", exc))
            scored = {}
        if not scored:
            return degraded
        scores = {c.id: scored.get(c.id, evidence[c.id]) for c in candidates}
        paths = {c.id: PATH_RANKER if c.id in scored else PATH_EVIDENCE_FALLBACK for c in candidates}
        return ScoreReport(scores, paths, self.name, ["rerank_partial"] if len(scored) < len(candidates) else [])

    async def _rank(
        self, ranker: Ranker, query_text: str, query_images: list[bytes], candidates: Sequence[Candidate],
        load_image: ImageLoader,
    ) -> dict[str, float]:
        """Candidate id -> probability for those the ranker scored; one request for all of them."""
        images = await asyncio.gather(*(self._image_of(c, load_image) for c in candidates))
        sent: list[Candidate] = []
        documents: list[RankInput] = []
        for cand, (expected, url) in zip(candidates, images):
            if expected and url is None:
                log.warning("re-rank of %s: its image could not be loaded", cand.id)
                continue
            document = rank_document(cand, url, max_text_chars=self.judge.max_text_chars)
            if document == "":
                continue  # neither image nor text: nothing to judge
            sent.append(cand)
            documents.append(document)
        if not documents:
            return {}
        query = rank_query(query_text, [image_data_url(img) for img in query_images])
        results = await ranker.rerank(query, documents)
        return {sent[i].id: p for i, p in valid_scores(results, len(documents)).items()}

    @staticmethod
    async def _image_of(candidate: Candidate, load_image: ImageLoader) -> tuple[bool, str | None]:
        """(whether the candidate has an image, its data URL or None when it could not be loaded)."""
        if candidate.payload.kind == "text" or not (candidate.payload.image_ref or candidate.payload.thumb_ref):
            return False, None
        try:
            data = await load_image(candidate)
        except Exception as exc:  # noqa: BLE001 - an unreadable image costs this candidate its score only
            log.warning("loading the image of %s failed: %s", candidate.id, exc)
            return True, None
        return True, image_data_url(data) if data else None
