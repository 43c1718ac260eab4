"""Relevancy scorers behind one protocol, and the registry the API, the CLI and the chat page read.

A scorer is a class with a ``name``, a one-line ``description``, whether the plan's ``threshold``
applies to its scores (``threshold``; ``False`` keeps the top k in retrieval order), whether it calls
the relevancy model (``uses_model``) and
``async score(query_text, query_images, candidates, load_image, *, image_text="") -> ScoreReport``
(and, optionally, ``requires``: the name of the ``Settings`` field it cannot work without, such as
``ranker_url``; ``GET /v1/scorers`` then reports it unavailable while that is empty)
(``image_text``: what OCR read in the query images, when the search read them). It is built per
request with the ``RerankService`` (its ``judge``: backend, concurrency, timeout, the Yes/No
probability). Adding a scorer is one class here (or anywhere) plus one line in ``SCORERS``:
``retriever/plan.py::Scorer`` validates against the registry, ``GET /v1/scorers`` lists it, the chat
page builds its options from that, and ``vlmrag eval --scorer`` offers it when it applies a threshold.

* ``vlm`` — ask the VLM "is this snippet relevant? Yes/No" once per candidate, all in flight
  together (bounded by a semaphore) so vLLM batches them; relevancy = P(yes) / (P(yes) + P(no))
  (``retriever/logprobs.py``). A candidate that cannot be scored (error, malformed answer, image
  not loadable) gets the clip relevancy, path ``clip_fallback`` (degraded ``rerank_partial``); if
  none could be (vLLM down, timeout) the report is the ``clip`` scorer's with ``["rerank"]``.
* ``rerank`` — a dedicated multimodal cross-encoder (vLLM ``--runner pooling``, ``/rerank``) scores
  every candidate in ONE request; relevancy = its probability (``retriever/ranker.py``). Candidates
  it leaves unscored get the evidence relevancy (``evidence_fallback``, degraded ``rerank_partial``);
  all failed or no ranker configured: the ``evidence`` scorer's report with ``["rerank"]``.
* ``clip`` — relevancy = (1 + c) / 2 with c the candidate's best cosine over the searched lists
  (``vector_scores``). Monotone, pool-independent and reversible (c = 2r - 1), so a CLIP threshold
  is a cosine threshold; with the default 0.5 it keeps every positively similar candidate, so
  degrading to ``clip`` behaves like classic CLIP top-k. Cosine ranges differ per list
  (text->image ~0.3, image->image ~0.8): tune CLIP thresholds separately (``vlmrag eval``).
* ``evidence`` — no model: what every list found, on one scale (``retriever/evidence.py``): an exact
  identifier match (every identifier of the query, in the candidate's text or OCR text) is
  near-certain, shared words count by coverage, a dense cosine by how far it stands out of its own
  list (a flat list is weak evidence). The degraded ``vlm`` scorer falls back to it.
* ``none`` — no scoring: the top k in retrieval order (the fusion's rank) are kept (relevancy is still the clip map).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from prompts import render
from retriever.evidence import evidence_relevancy
from retriever.images import data_url as image_data_url
from retriever.ranker import RankerScorer
from retriever.types import Candidate

log = logging.getLogger(__name__)

PATH_CLIP_FALLBACK = "clip_fallback"
PATH_CLIP = "clip"
PATH_NONE = "none"
PATH_EVIDENCE = "evidence"
_MARK = "\x00"  # image marker delimiter; stripped from untrusted text so it cannot forge one

ImageLoader = Callable[[Candidate], Awaitable[bytes | None]]  # a candidate's image bytes, None if it has none


@dataclass(slots=True)
class ScoreReport:
    """Relevancy per candidate id, without selection (used by rerank and the eval harness)."""

    scores: dict[str, float]
    paths: dict[str, str]
    scorer: str  # the scorer actually used ("clip" after a degradation)
    degraded: list[str] = field(default_factory=list)


class ScoringFailed(Exception):
    """One candidate could not be scored by the VLM (internal: turned into clip_fallback)."""


class YesNoJudge(Protocol):
    """What a model-backed scorer needs of the service (``retriever/rerank.py::RerankService``)."""

    backend: Any  # a ChatBackend, or None when no model is configured
    ranker: Any  # a Ranker (retriever/ranker.py) for the ``rerank`` scorer, or None when none is configured
    concurrency: int
    timeout_s: float
    max_text_chars: int

    async def yes_probability(
        self, messages: list[dict[str, Any]], sem: asyncio.Semaphore, *, what: str = ...,
    ) -> tuple[float, str]: ...


class RelevancyScorer(Protocol):
    """One relevancy scorer; built per request as ``cls(judge)``."""

    name: ClassVar[str]
    description: ClassVar[str]
    threshold: ClassVar[bool]  # False: keep the top k in retrieval order, no threshold
    uses_model: ClassVar[bool]  # True: it calls the relevancy model (the judge's backend)

    def __init__(self, judge: YesNoJudge) -> None: ...

    async def score(
        self, query_text: str, query_images: list[bytes], candidates: Sequence[Candidate], load_image: ImageLoader,
        *, image_text: str = "",
    ) -> ScoreReport: ...


def clip_relevancy(candidate: Candidate) -> float:
    """(1 + best cosine) / 2, clamped to [0, 1]; the fused score when no cosine is known (BM25 scores are no cosines)."""
    cosines = [v for name, v in candidate.vector_scores.items()
               if not name.endswith("->lexical") and isinstance(v, (int, float)) and math.isfinite(v)]
    if cosines:
        return min(1.0, max(0.0, (1.0 + max(cosines)) / 2.0))
    score = candidate.clip_score
    return min(1.0, max(0.0, score)) if math.isfinite(score) else 0.0


def clip_report(candidates: Sequence[Candidate], degraded: list[str] | None = None) -> ScoreReport:
    """Every candidate at its clip relevancy, as the ``clip`` scorer."""
    return ScoreReport({c.id: clip_relevancy(c) for c in candidates}, {c.id: PATH_CLIP for c in candidates},
                       "clip", list(degraded or []))


def build_relevancy_messages(
    query_text: str, query_image_urls: Sequence[str], candidate: Candidate, candidate_image_url: str | None,
    *, template: str = "relevancy.jinja", max_text_chars: int = 2000,
) -> list[dict[str, Any]]:
    """The one user message asking whether ``candidate`` is relevant; shared query part first."""
    rendered = render(
        template,
        query_text=query_text or "", query_images=len(query_image_urls),
        kind=candidate.payload.kind, has_image=candidate_image_url is not None,
        text=(candidate.payload.text or "")[:max_text_chars],
        ocr_text=(candidate.payload.ocr_text or "")[:max_text_chars],
        image=lambda role, n: f"{_MARK}{role}:{n}{_MARK}",
    )
    urls = {f"query:{i}": url for i, url in enumerate(query_image_urls)}
    if candidate_image_url is not None:
        urls["candidate:0"] = candidate_image_url
    parts: list[dict[str, Any]] = []
    for i, piece in enumerate(rendered.split(_MARK)):
        if i % 2:  # odd pieces are image markers
            parts.append({"type": "image_url", "image_url": {"url": urls[piece]}})
        elif piece:
            parts.append({"type": "text", "text": piece})
    return [{"role": "user", "content": parts}]


class ClipScorer:
    """CLIP cosine mapped to [0, 1]; no model call."""

    name: ClassVar[str] = "clip"
    description: ClassVar[str] = "CLIP similarity mapped to [0, 1], no model call; the threshold is a cosine threshold."
    threshold: ClassVar[bool] = True
    uses_model: ClassVar[bool] = False

    def __init__(self, judge: YesNoJudge | None = None) -> None:
        self.judge = judge

    async def score(
        self, query_text: str, query_images: list[bytes], candidates: Sequence[Candidate], load_image: ImageLoader,
        *, image_text: str = "",
    ) -> ScoreReport:
        return clip_report(candidates)


class EvidenceScorer:
    """What every list found (identifiers, words, standout cosines) on one scale; no model call."""

    name: ClassVar[str] = "evidence"
    description: ClassVar[str] = ("No model: exact identifier matches near-certain, shared words by coverage, "
                                  "a dense cosine by how far it stands out of its list.")
    threshold: ClassVar[bool] = True
    uses_model: ClassVar[bool] = False

    def __init__(self, judge: YesNoJudge | None = None) -> None:
        self.judge = judge

    async def score(
        self, query_text: str, query_images: list[bytes], candidates: Sequence[Candidate], load_image: ImageLoader,
        *, image_text: str = "",
    ) -> ScoreReport:
        scores = evidence_relevancy(query_text, image_text, candidates)
        return ScoreReport(scores, {c.id: PATH_EVIDENCE for c in candidates}, self.name)


class NoneScorer:
    """No scoring: the top k in retrieval order (relevancy still reported as the clip map)."""

    name: ClassVar[str] = "none"
    description: ClassVar[str] = "No re-ranking: the top k in retrieval order, no threshold."
    threshold: ClassVar[bool] = False
    uses_model: ClassVar[bool] = False

    def __init__(self, judge: YesNoJudge | None = None) -> None:
        self.judge = judge

    async def score(
        self, query_text: str, query_images: list[bytes], candidates: Sequence[Candidate], load_image: ImageLoader,
        *, image_text: str = "",
    ) -> ScoreReport:
        return ScoreReport({c.id: clip_relevancy(c) for c in candidates}, {c.id: PATH_NONE for c in candidates},
                           self.name)


class VlmScorer:
    """P(yes) of "is this snippet relevant?" from the VLM, with per-candidate and whole-request fallbacks."""

    name: ClassVar[str] = "vlm"
    description: ClassVar[str] = "The vision-language model judges each snippet (P(yes) of a Yes/No question)."
    threshold: ClassVar[bool] = True
    uses_model: ClassVar[bool] = True

    def __init__(self, judge: YesNoJudge) -> None:
        self.judge = judge

    async def score(
        self, query_text: str, query_images: list[bytes], candidates: Sequence[Candidate], load_image: ImageLoader,
        *, image_text: str = "",
    ) -> ScoreReport:
        """Relevancy in [0, 1] for every candidate; never raises for upstream failures."""
        if self.judge.backend is None or not candidates:
            return clip_report(candidates)
        clip = {c.id: clip_relevancy(c) for c in candidates}
        query_urls = [image_data_url(img) for img in query_images]
        sem = asyncio.Semaphore(self.judge.concurrency)
        tasks = {c.id: asyncio.ensure_future(self._score_one(query_text, query_urls, c, sem, load_image))
                 for c in candidates}
        done, pending = await asyncio.wait(tasks.values(), timeout=self.judge.timeout_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
            log.warning("re-rank timed out after %.1fs: %d of %d candidates unscored",
                        self.judge.timeout_s, len(pending), len(tasks))
        scores: dict[str, float] = {}
        paths: dict[str, str] = {}
        for cid, task in tasks.items():
            if task in done and not task.cancelled() and task.exception() is None:
                scores[cid], paths[cid] = task.result()
            else:
                exc = None if task.cancelled() or task not in done else task.exception()
                if exc is not None and not isinstance(exc, ScoringFailed):
                    log.warning("re-rank of %s failed: %s: %s", cid, type(exc).__name__, exc)
                scores[cid], paths[cid] = clip[cid], PATH_CLIP_FALLBACK
        if all(p == PATH_CLIP_FALLBACK for p in paths.values()):
            return clip_report(candidates, ["rerank"])
        degraded = ["rerank_partial"] if PATH_CLIP_FALLBACK in paths.values() else []
        return ScoreReport(scores, paths, self.name, degraded)

    async def _score_one(
        self, query_text: str, query_urls: list[str], candidate: Candidate, sem: asyncio.Semaphore,
        load_image: ImageLoader,
    ) -> tuple[float, str]:
        """One candidate's P(yes); ``ScoringFailed`` when it has nothing the model could judge."""
        image_url = None
        if candidate.payload.kind != "text" and (candidate.payload.image_ref or candidate.payload.thumb_ref):
            data = await load_image(candidate)
            if not data:
                raise ScoringFailed(f"image of {candidate.id} could not be loaded")
            image_url = image_data_url(data)
        if image_url is None and not (candidate.payload.text or "").strip():
            raise ScoringFailed(f"{candidate.id} has neither an image nor text to judge")
        messages = build_relevancy_messages(query_text, query_urls, candidate, image_url,
                                            max_text_chars=self.judge.max_text_chars)
        return await self.judge.yes_probability(messages, sem, what=candidate.id)


# The registry: one line per scorer, in the order the chat page and the CLI list them.
SCORERS: dict[str, type[RelevancyScorer]] = {
    VlmScorer.name: VlmScorer,
    RankerScorer.name: RankerScorer,
    EvidenceScorer.name: EvidenceScorer,
    ClipScorer.name: ClipScorer,
    NoneScorer.name: NoneScorer,
}


def scorer_names() -> tuple[str, ...]:
    """The registered scorer names, in registry order."""
    return tuple(SCORERS)


def threshold_scorers() -> tuple[str, ...]:
    """The scorers whose scores a threshold applies to (what ``vlmrag eval`` can sweep)."""
    return tuple(name for name, cls in SCORERS.items() if cls.threshold)
