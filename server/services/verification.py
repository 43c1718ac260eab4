"""Answers checked against their sources (no FastAPI here): after each chat answer, and ``POST /v1/verify``.

``lexical`` (``retriever/verify.py``) needs no model and runs in well under a millisecond per answer;
``model`` adds the relevancy model's judgement of every claim (``retriever/verify_model.py``), on
top of the lexical verdict: a claim with a token no source contains stays unsupported whatever the
model says; the others are supported when P(supported) >= ``verify_threshold``. A model check that
fails or runs past ``verify_timeout_s`` leaves those claims ``supported: null`` and reports
``degraded: ["verify"]``; it never fails the answer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from retriever.errors import InvalidInput, NotFound
from retriever.images import data_url
from retriever.rerank import RerankService
from retriever.types import Candidate
from retriever.verify import ClaimCheck, SourceText, supported_ratio, verify_lexical
from retriever.verify_model import ModelEvidence, judge_claims
from server.api_models import CheckedToken, Claim, Verification, VerifyRequest, VerifyResponse
from server.feedback import AnswerLog
from server.knowledge_bases import KnowledgeBases
from server.limits import check_text_chars
from server.metrics import Metrics
from server.settings import Settings

CheckMode = Literal["lexical", "model"]
ImageLoader = Callable[[Candidate], Awaitable[bytes | None]]


@dataclass(slots=True)
class VerificationOutcome:
    """The check of one answer: what goes out in ``verification``, and what went wrong."""

    verification: Verification
    degraded: list[str] = field(default_factory=list)
    ms: float = 0.0
    model_calls: int = 0  # claims sent to the model
    model_paths: dict[str, int] = field(default_factory=dict)  # P(yes) path -> claims (top_logprobs, prompt_logprobs)

    @property
    def any_unsupported(self) -> bool:
        return any(c.supported is False for c in self.verification.claims)


def _claim(check: ClaimCheck) -> Claim:
    return Claim(
        text=check.text, start=check.start, end=check.end, cites=check.cites, supported=check.supported,
        unsupported=check.unsupported, score=check.score,
        checked=[CheckedToken(text=f.text, kind=f.kind, start=f.start, end=f.end, supported=f.supported)
                 for f in check.facts],
    )


class Verifier:
    """Checks answers against snippets; one per app, built in the lifespan."""

    def __init__(
        self, settings: Settings, *, reranker: RerankService | None = None, knowledge_bases: KnowledgeBases | None = None,
        answer_log: AnswerLog | None = None, metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.reranker = reranker  # its model and P(yes) machinery judge claims in `model` mode
        self.kbs = knowledge_bases
        self.answer_log = answer_log
        self.metrics = metrics

    async def check(
        self, answer: str, kept: Sequence[Candidate], mode: CheckMode, *, load_image: ImageLoader | None = None,
    ) -> VerificationOutcome:
        """Check ``answer`` against ``kept`` (cited as [1]..[n] in that order)."""
        started = time.perf_counter()
        claims = verify_lexical(answer, [SourceText(n, c.payload.text, c.payload.ocr_text)
                                         for n, c in enumerate(kept, start=1)])
        degraded: list[str] = []
        calls, paths = 0, dict[str, int]()
        if mode == "model" and claims:
            calls, failed, paths = await self._judge(claims, kept, load_image)
            if failed:
                degraded.append("verify")
        verification = Verification(mode=mode, claims=[_claim(c) for c in claims],
                                    supported_ratio=supported_ratio(claims))
        ms = round((time.perf_counter() - started) * 1000, 3)
        return VerificationOutcome(verification, degraded, ms, calls, paths)

    async def _judge(self, claims: list[ClaimCheck], kept: Sequence[Candidate],
                     load_image: ImageLoader | None) -> tuple[int, int, dict[str, int]]:
        """Model verdicts into ``claims`` (the first ``verify_max_claims``); (claims sent, unscored, score paths)."""
        s = self.settings
        judged = claims[: s.verify_max_claims]
        if self.reranker is None or self.reranker.backend is None:
            for claim in judged:
                claim.supported = False if claim.supported is False else None
                claim.score = None
            return 0, len(judged), {}
        images: list[bytes | None] = [None] * len(kept)
        if load_image is not None and s.vllm_max_images_per_prompt > 0:
            images = list(await asyncio.gather(*(load_image(c) if c.payload.image_ref else _none() for c in kept)))
        evidence = {
            n: ModelEvidence(n, c.payload.kind, c.payload.text, c.payload.ocr_text, data_url(img) if img else None)
            for n, (c, img) in enumerate(zip(kept, images, strict=True), start=1)
        }
        result = await judge_claims(self.reranker, judged, evidence, timeout_s=s.verify_timeout_s,
                                    max_images=s.vllm_max_images_per_prompt)
        for claim, score in zip(judged, result.scores, strict=True):
            claim.score = score
            if claim.supported is False:
                continue  # a token no source contains: unsupported whatever the model says
            claim.supported = None if score is None else score >= s.verify_threshold
        return len(judged), result.failed, result.paths

    def observe(self, outcome: VerificationOutcome, source: Literal["chat", "api"]) -> None:
        """Count the check in /metrics: claims by verdict, answers by outcome."""
        if self.metrics is None:
            return
        v = outcome.verification
        for claim in v.claims:
            verdict = {True: "supported", False: "unsupported", None: "unchecked"}[claim.supported]
            self.metrics.verify_claims.labels(v.mode, verdict).inc()
        result = "disclaimed" if v.disclaimed else "flagged" if outcome.any_unsupported else "supported"
        self.metrics.verify_answers.labels(v.mode, source, result).inc()

    # ------------------------------------------------------------------ POST /v1/verify
    async def verify_request(self, request: VerifyRequest, *, key_id: str, kb_name: str,
                             may_use: Callable[[str], bool]) -> VerifyResponse:
        """Check ``request.answer`` against its snippets (or a logged answer's kept snippets).

        ``kb_name`` is the KB the caller chose (checked already); another KB's snippet ids are
        unknown there, so they get the same 404 as ids that exist nowhere.
        """
        s = self.settings
        assert self.kbs is not None
        if request.snippet_ids is not None:
            if len(request.snippet_ids) > s.limit_k:
                raise InvalidInput(f"snippet_ids names {len(request.snippet_ids)} snippets, the limit is {s.limit_k} "
                                   "(VLMRAG_LIMIT_K)", param="snippet_ids", code="limit_exceeded")
            ids, answer = list(request.snippet_ids), request.answer or ""
        else:
            record = await self.answer_log.get_answer(request.completion_id or "") if self.answer_log else None
            if (record is None or record.key_id != key_id or not may_use(record.kb)
                    or (request.kb is not None and request.kb != record.kb)):
                raise NotFound(f"no answer {request.completion_id!r} for this key", param="completion_id")
            kb_name = record.kb
            kept = sorted((src for src in record.sources if src.get("kept") and src.get("index") is not None),
                          key=lambda src: src["index"])
            ids = [str(src["id"]) for src in kept]
            answer = request.answer if request.answer is not None else record.answer
        check_text_chars(s, answer, "answer")
        kb = await self.kbs.get(kb_name)
        points = []
        for i, snippet_id in enumerate(ids):
            try:
                points.append(await kb.get(snippet_id))
            except NotFound as exc:
                raise NotFound(f"no snippet {snippet_id!r} in knowledge base {kb_name!r}",
                               param=f"snippet_ids[{i}]" if request.snippet_ids is not None else "completion_id") \
                    from exc
        candidates = [Candidate(p.id, p.payload, clip_score=0.0) for p in points]
        mode: CheckMode = request.verify or ("model" if s.retrieval_verify == "model" else "lexical")
        outcome = await self.check(answer, candidates, mode, load_image=kb.snippet_image)
        self.observe(outcome, "api")
        if self.metrics is not None:
            self.metrics.observe_timings({"verify": outcome.ms})
            self.metrics.observe_degraded(outcome.degraded)
        return VerifyResponse(**outcome.verification.model_dump(), degraded=outcome.degraded,
                              timings={"verify": outcome.ms})


async def _none() -> None:
    return None
