"""The ``model`` answer check: the relevancy model judges "is this sentence supported by these snippets?".

One Yes/No request per claim (``prompts/verify.jinja``): the claim's text and the snippets it cites
(every kept snippet when it cites none), their images attached while the prompt's image budget
lasts. The probability is the re-ranker's P(yes) machinery (``RerankService.yes_probability``: top
logprobs, else the prompt_logprobs replay), so the same model, prompt conventions and failure
handling apply. A claim that cannot be scored (error, malformed logprobs, the deadline) gets
``None``; nothing here raises for upstream failures.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from prompts import render
from retriever.rerank import RerankService
from retriever.verify import ClaimCheck

log = logging.getLogger(__name__)

_MARK = "\x00"  # image marker delimiter (``untrusted`` strips NUL from text, so none can be forged)


@dataclass(slots=True, frozen=True)
class ModelEvidence:
    """A kept snippet as the model sees it: number, kind, text, OCR text and its image (a data URL)."""

    n: int
    kind: str = "text"
    text: str = ""
    ocr_text: str = ""
    image_url: str | None = None


@dataclass(slots=True)
class ModelJudgement:
    """P(supported) per claim (None: not scored), and how the requests went."""

    scores: list[float | None]
    paths: dict[str, int] = field(default_factory=dict)  # score path -> claims (top_logprobs, prompt_logprobs)
    failed: int = 0  # claims that could not be scored (errors, malformed answers, the deadline)
    timed_out: bool = False


def evidence_for(claim: ClaimCheck, evidence: Mapping[int, ModelEvidence]) -> list[ModelEvidence]:
    """The snippets a claim is judged against: the ones it cites that exist, else every one."""
    cited = [evidence[n] for n in claim.cites if n in evidence]
    return cited or [evidence[n] for n in sorted(evidence)]


def build_support_messages(
    sentence: str, evidence: Sequence[ModelEvidence], *, max_images: int, max_text_chars: int = 2000,
    template: str = "verify.jinja",
) -> list[dict[str, Any]]:
    """The one user message asking whether ``sentence`` is supported by ``evidence``."""
    with_image = {e.n for e in evidence if e.image_url}
    attached = set(sorted(with_image)[: max(0, max_images)])
    rendered = render(
        template, sentence=sentence,
        snippets=[{"n": e.n, "kind": e.kind, "has_image": e.n in attached, "text": e.text[:max_text_chars],
                   "ocr_text": e.ocr_text[:max_text_chars]} for e in evidence],
        image=lambda n: f"{_MARK}{n}{_MARK}",
    )
    urls = {str(e.n): e.image_url for e in evidence if e.n in attached}
    parts: list[dict[str, Any]] = []
    for i, piece in enumerate(rendered.split(_MARK)):
        if i % 2:  # odd pieces are image markers
            parts.append({"type": "image_url", "image_url": {"url": urls[piece]}})
        elif piece:
            parts.append({"type": "text", "text": piece})
    return [{"role": "user", "content": parts}]


async def judge_claims(
    scorer: RerankService, claims: Sequence[ClaimCheck], evidence: Mapping[int, ModelEvidence], *,
    timeout_s: float, max_images: int, max_text_chars: int = 2000,
) -> ModelJudgement:
    """P(supported) of every claim, all in flight together (bounded by the scorer's concurrency)."""
    if scorer.backend is None or not claims:
        return ModelJudgement([None] * len(claims), failed=len(claims))
    sem = asyncio.Semaphore(scorer.concurrency)
    tasks = [
        asyncio.ensure_future(scorer.yes_probability(
            build_support_messages(c.text, evidence_for(c, evidence), max_images=max_images,
                                   max_text_chars=max_text_chars), sem, what=f"claim {i}"))
        for i, c in enumerate(claims)
    ]
    done, pending = await asyncio.wait(tasks, timeout=timeout_s)
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
        log.warning("answer check timed out after %.1fs: %d of %d claims unscored", timeout_s, len(pending),
                    len(tasks))
    scores: list[float | None] = []
    paths: Counter[str] = Counter()
    for task in tasks:
        if task in done and task.exception() is None:
            score, path = task.result()
            scores.append(round(score, 4))
            paths[path] += 1
        else:
            exc = task.exception() if task in done else None
            if exc is not None:
                log.warning("answer check of a claim failed: %s: %s", type(exc).__name__, exc)
            scores.append(None)
    failed = sum(s is None for s in scores)
    return ModelJudgement(scores, dict(paths), failed, timed_out=bool(pending))
