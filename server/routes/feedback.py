"""/v1/feedback: rate an answer (chat scope: only the key that received it) and page through ratings (admin).

An unknown completion id and one another key received are the same 404. An admin key bound to some
knowledge bases sees only their ratings; ``?kb=`` naming another is a 404, like everywhere else.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query

from retriever.errors import NotFound
from server.api_models import FeedbackItem, FeedbackList, FeedbackRequest
from server.auth import AdminAuth, ChatAuth, Principal
from server.deps import AnswerLogDep
from server.feedback import FeedbackRecord

router = APIRouter(tags=["feedback"])


def _item(record: FeedbackRecord) -> FeedbackItem:
    return FeedbackItem.model_validate(record.public())


@router.post("/v1/feedback", response_model=FeedbackItem, status_code=201)
async def add_feedback(
    body: FeedbackRequest, answer_log: AnswerLogDep, caller: Annotated[Principal, ChatAuth],
) -> FeedbackItem:
    """Store a rating (and optional comment) of an answer this key received; rating again replaces it."""
    record = await answer_log.add_feedback(body.completion_id, caller.key_id, body.rating, body.comment,
                                           body.snippet_ids)
    return _item(record)


@router.get("/v1/feedback", response_model=FeedbackList)
async def list_feedback(
    answer_log: AnswerLogDep, caller: Annotated[Principal, AdminAuth],
    kb: Annotated[str | None, Query(max_length=48, description="Only this knowledge base's answers.")] = None,
    since: Annotated[float | None, Query(ge=0, description="Only ratings at or after this time (epoch s).")] = None,
    rating: Annotated[Literal["up", "down"] | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=200, description="next_cursor of the previous page")] = None,
) -> FeedbackList:
    """Ratings, newest first, each with the answer's question, search query, sources and scores."""
    if kb is not None and not caller.may_use(kb):
        raise NotFound(f"no knowledge base {kb!r}")
    page = await answer_log.list_feedback(kb, since, rating, limit, cursor, kbs=caller.kbs)
    return FeedbackList(items=[_item(r) for r in page.items], next_cursor=page.next_cursor)
