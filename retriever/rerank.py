"""Relevancy re-ranking of retrieval candidates, then adaptive up-to-k selection.

The scorers (``vlm``, ``rerank``, ``evidence``, ``clip``, ``none``) and their registry live in ``retriever/scorers.py``; the
logprob arithmetic in ``retriever/logprobs.py``. ``RerankService`` dispatches ``plan.scorer`` through
the registry, then selects: adaptively (threshold, margin, min_k) for a scorer that applies the
threshold, else the top k in retrieval order (the fusion's rank). It also answers Yes/No questions for the model scorer and
the answer check (``yes_probability``). Failures never fail a chat (see the ``vlm`` scorer).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from retriever.errors import InvalidInput
from retriever.images import data_url as image_data_url
from retriever.logprobs import (
    ABSENT,
    MALFORMED,
    NO_ANSWER,
    PATH_BOUND,
    PATH_PROMPT,
    PATH_TOP,
    TOP_LOGPROBS,
    YES_ANSWER,
    extract_answer_logprob,
    extract_yes_probability,
    score_from_answer_logprobs,
)
from retriever.plan import RetrievalPlan
from retriever.ranker import Ranker
from retriever.scorers import (
    PATH_CLIP,
    PATH_CLIP_FALLBACK,
    PATH_NONE,
    SCORERS,
    ImageLoader,
    RelevancyScorer,
    ScoreReport,
    ScoringFailed,
    build_relevancy_messages,
    clip_relevancy,
)
from retriever.selection import REASON_OVER_K, apply_selection, select_adaptive
from retriever.types import Candidate

__all__ = [  # names other modules and tests import from here (most now live in scorers / logprobs)
    "ABSENT", "MALFORMED", "PATH_BOUND", "PATH_CLIP", "PATH_CLIP_FALLBACK", "PATH_NONE", "PATH_PROMPT",
    "PATH_TOP", "TOP_LOGPROBS", "ChatBackend", "ImageLoader", "RerankOutcome", "RerankService", "ScoreReport",
    "ScoringFailed", "build_relevancy_messages", "clip_relevancy", "extract_answer_logprob",
    "extract_yes_probability", "image_data_url", "score_from_answer_logprobs",
]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class RerankOutcome:
    """Kept and dropped candidates (each with relevancy, kept, reason) and how they were scored."""

    kept: list[Candidate]
    dropped: list[Candidate]
    scorer: str  # the scorer actually used ("clip" after a degradation)
    degraded: list[str] = field(default_factory=list)  # "rerank" (all failed) or "rerank_partial"
    timings: dict[str, float] = field(default_factory=dict)  # milliseconds: "rerank"
    score_paths: dict[str, int] = field(default_factory=dict)  # path -> number of candidates
    paths: dict[str, str] = field(default_factory=dict)  # candidate id -> path


class ChatBackend(Protocol):
    """The slice of the vLLM client the re-ranker needs (server/vllm_client.py::VLLMClient)."""

    async def complete(self, body: dict[str, Any]) -> dict[str, Any]: ...

    async def tokenize(self, text: str) -> list[int]: ...


class RerankService:
    """Scores candidates with the plan's scorer (``retriever/scorers.py::SCORERS``) and selects up to k."""

    def __init__(
        self, backend: ChatBackend | None, load_image: ImageLoader, *,
        concurrency: int = 8, timeout_s: float = 30.0, top_logprobs: int = TOP_LOGPROBS,
        max_text_chars: int = 2000, ranker: Ranker | None = None,
    ) -> None:
        if concurrency < 1:
            raise InvalidInput(f"concurrency must be >= 1, got {concurrency}", param="concurrency")
        self.backend = backend
        self.load_image = load_image
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.top_logprobs = top_logprobs
        self.max_text_chars = max_text_chars
        self.ranker = ranker  # the ``rerank`` scorer's cross-encoder (retriever/ranker.py), None when not configured
        self._answer_ids: dict[str, list[int]] = {}
        self._answer_lock = asyncio.Lock()

    def scorer(self, name: str) -> RelevancyScorer:
        """The registered scorer ``name``, bound to this service; ``InvalidInput`` for an unknown name."""
        cls = SCORERS.get(name)
        if cls is None:
            raise InvalidInput(f"unknown scorer {name!r}; one of {', '.join(SCORERS)}", param="scorer")
        return cls(self)

    async def rerank(
        self, query_text: str, query_images: list[bytes], candidates: list[Candidate], plan: RetrievalPlan,
        *, load_image: ImageLoader | None = None, image_text: str = "",
    ) -> RerankOutcome:
        """Score every candidate, then keep up to ``plan.k``; mutates the candidates.

        ``load_image`` reads candidate images (their knowledge base's); default: the one given at construction.
        ``image_text``: the text OCR read in the query images (``CandidatePool.image_text``).
        """
        scorer = self.scorer(plan.scorer)
        started = time.perf_counter()
        report = await scorer.score(query_text, query_images, candidates, load_image or self.load_image,
                                    image_text=image_text)
        for cand in candidates:
            cand.relevancy = report.scores[cand.id]
        if scorer.threshold:
            selection = select_adaptive(candidates, k=plan.k, threshold=plan.threshold,
                                        margin=plan.margin, min_k=plan.min_k)
            apply_selection(selection)
            kept, dropped = selection.kept, selection.dropped
        else:  # order as retrieved (the fusion's rank: its score order, or the evidence order), no threshold
            ordered = sorted(candidates, key=lambda c: (c.rank, -c.clip_score, c.id))
            kept, dropped = ordered[: plan.k], ordered[plan.k:]
            for cand in kept:
                cand.kept, cand.reason = True, None
            for cand in dropped:
                cand.kept, cand.reason = False, REASON_OVER_K
        return RerankOutcome(
            kept=kept, dropped=dropped, scorer=report.scorer, degraded=report.degraded,
            timings={"rerank": (time.perf_counter() - started) * 1000},
            score_paths=dict(Counter(report.paths.values())), paths=report.paths,
        )

    async def score(
        self, query_text: str, query_images: list[bytes], candidates: Sequence[Candidate], *, scorer: str = "vlm",
        load_image: ImageLoader | None = None, image_text: str = "",
    ) -> ScoreReport:
        """Relevancy in [0, 1] for every candidate by ``scorer``, without selection; never raises for upstream failures."""
        return await self.scorer(scorer).score(query_text, query_images, candidates, load_image or self.load_image,
                                               image_text=image_text)

    async def yes_probability(
        self, messages: list[dict[str, Any]], sem: asyncio.Semaphore, *, what: str = "a question",
    ) -> tuple[float, str]:
        """P(yes) of a Yes/No question (``messages``) and its path; ``ScoringFailed`` when none can be had.

        Top logprobs first, the prompt_logprobs replay if neither answer is listed. Shared by the
        relevancy scorer and the answer check (``retriever/verify_model.py``).
        """
        assert self.backend is not None
        body = {"messages": messages, "max_tokens": 1, "temperature": 0.0,
                "logprobs": True, "top_logprobs": self.top_logprobs}
        async with sem:
            response = await self.backend.complete(body)
        score, path = extract_yes_probability(response)
        if score is not None:
            return score, path
        if path == MALFORMED:
            log.warning("scoring %s: the model's logprobs are malformed", what)
            raise ScoringFailed(f"malformed logprobs for {what}")
        yes, no = await asyncio.gather(
            self._answer_logprob(messages, YES_ANSWER, sem), self._answer_logprob(messages, NO_ANSWER, sem),
        )
        score = score_from_answer_logprobs(yes, no)
        if score is None:
            raise ScoringFailed(f"both answers have zero probability for {what}")
        return score, PATH_PROMPT

    async def _answer_logprob(self, messages: list[dict[str, Any]], answer: str, sem: asyncio.Semaphore) -> float:
        """Exact log P(answer | prompt) from a replay ending in the assistant's ``answer``."""
        assert self.backend is not None
        ids = await self._ids_of(answer)
        body = {
            "messages": [*messages, {"role": "assistant", "content": answer}],
            "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0,
            "add_generation_prompt": False, "continue_final_message": True,
        }
        async with sem:
            response = await self.backend.complete(body)
        logprob = extract_answer_logprob(response, ids)
        if logprob is None:
            raise ScoringFailed(f"prompt logprobs do not end in the tokens of {answer!r}")
        return logprob

    async def _ids_of(self, answer: str) -> list[int]:
        """The served model's token ids of ``answer``, asked once per service."""
        async with self._answer_lock:
            if answer not in self._answer_ids:
                assert self.backend is not None
                ids = await self.backend.tokenize(answer)
                if not ids:
                    raise ScoringFailed(f"the model tokenizes {answer!r} to nothing")
                self._answer_ids[answer] = list(ids)
            return self._answer_ids[answer]
