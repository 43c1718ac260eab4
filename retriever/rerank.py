"""Relevancy re-ranking of retrieval candidates, then adaptive up-to-k selection.

Scorers (``RetrievalPlan.scorer``):

* ``vlm`` — ask a VLM served by vLLM "is this snippet relevant to the query? Yes/No" once per
  candidate, all candidates in flight together (bounded by a semaphore) so vLLM batches them.
  relevancy = P(yes) / (P(yes) + P(no)), each side summed over its spellings ("Yes", " yes",
  "YES"…) found in the first token's ``top_logprobs`` (path ``top_logprobs``). If only one side
  is listed, the other is taken to have the smallest listed probability, its upper bound as one
  token (path ``top_logprobs_bound``). If neither is listed (a weak or random model), two more
  requests replay the conversation ending in the assistant answer "Yes" / "No" with
  ``prompt_logprobs`` (``add_generation_prompt: false``, ``continue_final_message: true``): vLLM
  returns the exact log-probability of those answer tokens wherever they rank (path
  ``prompt_logprobs``; logit_bias would not help, vLLM reports logprobs before biasing).
* ``clip`` — relevancy = (1 + c) / 2 with c the candidate's best cosine over the searched lists
  (``vector_scores``). Monotone, pool-independent and reversible (c = 2r - 1), so a CLIP
  threshold is a cosine threshold; with the default threshold 0.5 it keeps every positively
  similar candidate, i.e. degrading to ``clip`` behaves like the classic CLIP top-k rather than
  dropping context on an uncalibrated scale. Cosine ranges differ per list (text->image ~0.3,
  image->image ~0.8), so tune CLIP thresholds separately (``vlmrag eval`` sweeps them).
* ``none`` — no scoring: the top k by fused CLIP score are kept (relevancy is still the clip map).

Failures never fail a chat: a candidate whose VLM score cannot be had (error, malformed answer,
image not loadable) gets the clip relevancy and path ``clip_fallback`` (degraded
``rerank_partial``); if no candidate could be scored (vLLM down, timeout) the whole request
degrades to the ``clip`` scorer with ``degraded == ["rerank"]``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from prompts import render
from retriever.errors import InvalidInput
from retriever.images import data_url as image_data_url
from retriever.plan import SCORERS, RetrievalPlan, Scorer
from retriever.selection import REASON_OVER_K, apply_selection, select_adaptive
from retriever.types import Candidate

log = logging.getLogger(__name__)

PATH_TOP = "top_logprobs"
PATH_BOUND = "top_logprobs_bound"
PATH_PROMPT = "prompt_logprobs"
PATH_CLIP_FALLBACK = "clip_fallback"
PATH_CLIP = "clip"
PATH_NONE = "none"
# Outcomes of extract_yes_probability that mean "no score from this payload".
ABSENT = "absent"
MALFORMED = "malformed"

YES_ANSWER, NO_ANSWER = "Yes", "No"
TOP_LOGPROBS = 20  # vLLM's default --max-logprobs
_MARK = "\x00"  # image marker delimiter; stripped from untrusted text so it cannot forge one


@dataclass(slots=True)
class RerankOutcome:
    """Kept and dropped candidates (each with relevancy, kept, reason) and how they were scored."""

    kept: list[Candidate]
    dropped: list[Candidate]
    scorer: Scorer  # the scorer actually used ("clip" after a degradation)
    degraded: list[str] = field(default_factory=list)  # "rerank" (all failed) or "rerank_partial"
    timings: dict[str, float] = field(default_factory=dict)  # milliseconds: "rerank"
    score_paths: dict[str, int] = field(default_factory=dict)  # path -> number of candidates
    paths: dict[str, str] = field(default_factory=dict)  # candidate id -> path


@dataclass(slots=True)
class ScoreReport:
    """Relevancy per candidate id, without selection (used by rerank and the eval harness)."""

    scores: dict[str, float]
    paths: dict[str, str]
    scorer: Scorer
    degraded: list[str] = field(default_factory=list)


class ChatBackend(Protocol):
    """The slice of the vLLM client the re-ranker needs (server/vllm_client.py::VLLMClient)."""

    async def complete(self, body: dict[str, Any]) -> dict[str, Any]: ...

    async def tokenize(self, text: str) -> list[int]: ...


ImageLoader = Callable[[Candidate], Awaitable[bytes | None]]  # a candidate's image bytes, None if it has none


class ScoringFailed(Exception):
    """One candidate could not be scored by the VLM (internal: turned into clip_fallback)."""


# ----------------------------------------------------------------------------- pure functions
def clip_relevancy(candidate: Candidate) -> float:
    """(1 + best cosine) / 2, clamped to [0, 1]; the fused score when no cosine is known (BM25 scores are no cosines)."""
    cosines = [v for name, v in candidate.vector_scores.items()
               if not name.endswith("->lexical") and isinstance(v, (int, float)) and math.isfinite(v)]
    if cosines:
        return min(1.0, max(0.0, (1.0 + max(cosines)) / 2.0))
    score = candidate.clip_score
    return min(1.0, max(0.0, score)) if math.isfinite(score) else 0.0


def _answer_of(token: str) -> str | None:
    """'yes' / 'no' for any spelling of the answer token (space, Ġ or ▁ prefix, any case)."""
    word = token.strip().lstrip("\u0120\u2581").strip().lower()
    return word if word in ("yes", "no") else None


def _logsumexp(values: list[float]) -> float:
    top = max(values)
    if top == -math.inf:
        return -math.inf
    return top + math.log(sum(math.exp(v - top) for v in values))


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def _first_position(payload: Any) -> Any:
    """Accept a response, a choice, a choice's ``logprobs`` or one content position."""
    if isinstance(payload, dict) and isinstance(payload.get("choices"), list):
        payload = payload["choices"][0] if payload["choices"] else None
    if isinstance(payload, dict) and "logprobs" in payload and "top_logprobs" not in payload:
        payload = payload["logprobs"]
    if isinstance(payload, dict) and "content" in payload:
        content = payload["content"]
        payload = content[0] if isinstance(content, list) and content else None
    return payload


def extract_yes_probability(logprobs_payload: Any) -> tuple[float | None, str]:
    """P(yes) / (P(yes) + P(no)) from the first generated token's top logprobs, and the path.

    Returns ``(score, "top_logprobs")`` when both answers are listed, ``(score,
    "top_logprobs_bound")`` when one is (the other gets the smallest listed probability),
    ``(None, "absent")`` when neither is (or both have zero probability), ``(None, "malformed")``
    when the payload has no usable top logprobs. NaN entries are ignored; -inf means probability 0.
    """
    position = _first_position(logprobs_payload)
    if not isinstance(position, dict) or not isinstance(position.get("top_logprobs"), list):
        return None, MALFORMED
    sides: dict[str, list[float]] = {"yes": [], "no": []}
    listed: list[float] = []
    for entry in position["top_logprobs"]:
        if not isinstance(entry, dict):
            continue
        token, logprob = entry.get("token"), entry.get("logprob")
        if not isinstance(token, str) or not isinstance(logprob, (int, float)) or math.isnan(logprob):
            continue
        logprob = min(float(logprob), 0.0)  # float noise can give +1e-7
        listed.append(logprob)
        answer = _answer_of(token)
        if answer:
            sides[answer].append(logprob)
    if not listed:
        return None, MALFORMED
    yes = _logsumexp(sides["yes"]) if sides["yes"] else None
    no = _logsumexp(sides["no"]) if sides["no"] else None
    if yes is None and no is None:
        return None, ABSENT
    if yes is not None and no is not None:
        if yes == -math.inf and no == -math.inf:
            return None, ABSENT
        return (1.0 if no == -math.inf else _sigmoid(yes - no)), PATH_TOP
    bound = min(listed)
    if yes is not None:
        return (0.0 if yes == -math.inf else _sigmoid(yes - bound)), PATH_BOUND
    return (1.0 if no == -math.inf else _sigmoid(bound - no)), PATH_BOUND  # type: ignore[operator]


def extract_answer_logprob(response: Any, answer_ids: Sequence[int]) -> float | None:
    """Sum of the prompt logprobs of the last ``len(answer_ids)`` prompt tokens, which must be those ids.

    ``response`` is a chat completion made with ``prompt_logprobs`` on a conversation ending in
    the assistant's answer; None when the payload does not end in exactly those tokens.
    """
    entries = response.get("prompt_logprobs") if isinstance(response, dict) else None
    if not isinstance(entries, list) or not answer_ids or len(entries) < len(answer_ids):
        return None
    total = 0.0
    for entry, token_id in zip(entries[-len(answer_ids):], answer_ids):
        item = entry.get(str(token_id)) if isinstance(entry, dict) else None
        logprob = item.get("logprob") if isinstance(item, dict) else None
        if not isinstance(logprob, (int, float)) or math.isnan(logprob):
            return None
        total += min(float(logprob), 0.0)
    return total


def score_from_answer_logprobs(yes: float, no: float) -> float | None:
    """Normalised P(yes) from the two answers' exact log-probabilities; None if both are impossible."""
    if yes == -math.inf and no == -math.inf:
        return None
    return _sigmoid(yes - no) if no != -math.inf else 1.0


# ------------------------------------------------------------------------------------ prompt
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


# ----------------------------------------------------------------------------------- service
class RerankService:
    """Scores candidates for relevancy (vlm / clip / none) and selects up to k adaptively."""

    def __init__(
        self, backend: ChatBackend | None, load_image: ImageLoader, *,
        concurrency: int = 8, timeout_s: float = 30.0, top_logprobs: int = TOP_LOGPROBS,
        max_text_chars: int = 2000,
    ) -> None:
        if concurrency < 1:
            raise InvalidInput(f"concurrency must be >= 1, got {concurrency}", param="concurrency")
        self.backend = backend
        self.load_image = load_image
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.top_logprobs = top_logprobs
        self.max_text_chars = max_text_chars
        self._answer_ids: dict[str, list[int]] = {}
        self._answer_lock = asyncio.Lock()

    async def rerank(
        self, query_text: str, query_images: list[bytes], candidates: list[Candidate], plan: RetrievalPlan,
        *, load_image: ImageLoader | None = None,
    ) -> RerankOutcome:
        """Score every candidate, then keep up to ``plan.k`` adaptively; mutates the candidates.

        ``load_image`` reads candidate images (their knowledge base's); default: the one given at construction.
        """
        if plan.scorer not in SCORERS:
            raise InvalidInput(f"unknown scorer {plan.scorer!r}; one of {', '.join(SCORERS)}", param="scorer")
        started = time.perf_counter()
        if plan.scorer == "none":
            report = ScoreReport({c.id: clip_relevancy(c) for c in candidates},
                                 {c.id: PATH_NONE for c in candidates}, "none")
        else:
            report = await self.score(query_text, query_images, candidates, scorer=plan.scorer, load_image=load_image)
        for cand in candidates:
            cand.relevancy = report.scores[cand.id]
        if plan.scorer == "none":
            # CLIP order as retrieved (fused score), no threshold.
            ordered = sorted(candidates, key=lambda c: (-c.clip_score, c.rank, c.id))
            kept, dropped = ordered[: plan.k], ordered[plan.k:]
            for cand in kept:
                cand.kept, cand.reason = True, None
            for cand in dropped:
                cand.kept, cand.reason = False, REASON_OVER_K
        else:
            selection = select_adaptive(candidates, k=plan.k, threshold=plan.threshold,
                                        margin=plan.margin, min_k=plan.min_k)
            apply_selection(selection)
            kept, dropped = selection.kept, selection.dropped
        return RerankOutcome(
            kept=kept, dropped=dropped, scorer=report.scorer, degraded=report.degraded,
            timings={"rerank": (time.perf_counter() - started) * 1000},
            score_paths=dict(Counter(report.paths.values())), paths=report.paths,
        )

    async def score(
        self, query_text: str, query_images: list[bytes], candidates: Sequence[Candidate], *, scorer: Scorer = "vlm",
        load_image: ImageLoader | None = None,
    ) -> ScoreReport:
        """Relevancy in [0, 1] for every candidate; never raises for upstream failures."""
        clip = {c.id: clip_relevancy(c) for c in candidates}
        if scorer != "vlm" or self.backend is None or not candidates:
            return ScoreReport(clip, {c.id: PATH_CLIP for c in candidates}, "clip")
        query_urls = [image_data_url(img) for img in query_images]
        sem = asyncio.Semaphore(self.concurrency)
        tasks = {
            c.id: asyncio.ensure_future(self._score_one(query_text, query_urls, c, sem, load_image or self.load_image))
            for c in candidates
        }
        done, pending = await asyncio.wait(tasks.values(), timeout=self.timeout_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
            log.warning("re-rank timed out after %.1fs: %d of %d candidates unscored",
                        self.timeout_s, len(pending), len(tasks))
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
            return ScoreReport(clip, {c.id: PATH_CLIP for c in candidates}, "clip", ["rerank"])
        degraded = ["rerank_partial"] if PATH_CLIP_FALLBACK in paths.values() else []
        return ScoreReport(scores, paths, "vlm", degraded)

    async def _score_one(
        self, query_text: str, query_urls: list[str], candidate: Candidate, sem: asyncio.Semaphore,
        load_image: ImageLoader,
    ) -> tuple[float, str]:
        """One candidate's P(yes): top logprobs first, the prompt_logprobs replay if neither answer is listed."""
        assert self.backend is not None
        image_url = None
        if candidate.payload.kind != "text" and (candidate.payload.image_ref or candidate.payload.thumb_ref):
            data = await load_image(candidate)
            if not data:
                raise ScoringFailed(f"image of {candidate.id} could not be loaded")
            image_url = image_data_url(data)
        if image_url is None and not (candidate.payload.text or "").strip():
            raise ScoringFailed(f"{candidate.id} has neither an image nor text to judge")
        messages = build_relevancy_messages(query_text, query_urls, candidate, image_url,
                                            max_text_chars=self.max_text_chars)
        return await self.yes_probability(messages, sem, what=candidate.id)

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
