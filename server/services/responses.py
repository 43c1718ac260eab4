"""Shapes of what vlmrag answers: upstream (vLLM) choices and chunks as ours, candidates as search items.

Tool calls, reasoning and logprobs are relayed exactly as the model server sent them; nothing here
calls anything.
"""

from __future__ import annotations

from typing import Any

from retriever.errors import UpstreamError
from retriever.types import Candidate
from server.api_models import SearchCandidate
from server.protocol import AssistantMessage, Choice, ChunkChoice, DeltaMessage, UsageInfo
from server.services.links import snippet_links


def search_candidate(c: Candidate, base: str, kb_name: str) -> SearchCandidate:
    image_url, thumbnail_url = snippet_links(c.id, c.payload, base, kb_name)
    p = c.payload
    return SearchCandidate(
        id=c.id, rank=c.rank, kind=p.kind, source=p.source, text=p.text, page=p.page, tags=list(p.tags),
        clip_score=c.clip_score, vector_scores=dict(c.vector_scores), relevancy=c.relevancy, kept=c.kept,
        reason=c.reason, image_url=image_url, thumbnail_url=thumbnail_url,
    )


def upstream_choice(raw: Any, position: int) -> Choice:
    """One upstream choice as ours: content, tool calls, reasoning and logprobs as the model server sent them."""
    message = raw.get("message") if isinstance(raw, dict) else None
    if not isinstance(message, dict):
        raise UpstreamError("the model server answered without a message")
    tool_calls = message.get("tool_calls") or None
    content = message.get("content")
    return Choice(
        index=raw.get("index", position),
        message=AssistantMessage(content="" if content is None and not tool_calls else content,
                                 tool_calls=tool_calls, reasoning=message.get("reasoning") or None),
        logprobs=raw.get("logprobs") or None, finish_reason=raw.get("finish_reason"),
    )


def upstream_chunk_choice(raw: Any) -> ChunkChoice | None:
    """One upstream stream choice as ours, or None when it carries nothing (an empty keep-alive delta)."""
    if not isinstance(raw, dict):
        return None
    delta = raw.get("delta") or {}
    text, tool_calls, reasoning = delta.get("content"), delta.get("tool_calls"), delta.get("reasoning")
    logprobs, finish = raw.get("logprobs"), raw.get("finish_reason")
    if not (text or tool_calls or reasoning or logprobs or finish):
        return None
    return ChunkChoice(
        index=raw.get("index", 0), logprobs=logprobs or None, finish_reason=finish,
        delta=DeltaMessage(content=text or None, tool_calls=tool_calls or None, reasoning=reasoning or None),
    )


def usage_of(raw: Any) -> UsageInfo | None:
    if not isinstance(raw, dict):
        return None
    try:
        return UsageInfo.model_validate(raw)
    except ValueError as exc:
        raise UpstreamError("the model server sent malformed usage counts") from exc
