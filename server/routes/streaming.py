"""Server-sent events for streamed answers: one ``data:`` line per chunk, ``data: [DONE]`` last.

A failure after the response started cannot change its status any more: it becomes one SSE error
event (the OpenAI error body) followed by ``[DONE]``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse

from server.errors import as_vlmrag_error, sse_error_event
from server.metrics import Metrics
from server.protocol import ChatCompletionChunk

DONE = "data: [DONE]\n\n"


def _dump(chunk: ChatCompletionChunk) -> str:
    data: dict[str, Any] = chunk.model_dump(exclude_none=True)
    if chunk.sources is not None:  # sources keep their nulls: every item has the same keys
        data["sources"] = [s.model_dump() for s in chunk.sources]
    if chunk.verification is not None:  # claims keep their nulls too (supported: null)
        data["verification"] = chunk.verification.model_dump()
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _events(chunks: AsyncIterator[ChatCompletionChunk], metrics: Metrics | None) -> AsyncIterator[str]:
    try:
        async for chunk in chunks:
            yield _dump(chunk)
    except Exception as exc:  # noqa: BLE001 - every failure must end the stream cleanly
        err = as_vlmrag_error(exc)  # once: an unexpected error is logged here, not again below
        if metrics is not None:
            metrics.observe_error(err.error_type, err.status_code)
        yield sse_error_event(err)
    yield DONE


def sse_response(chunks: AsyncIterator[ChatCompletionChunk], metrics: Metrics | None = None) -> StreamingResponse:
    """A ``text/event-stream`` response relaying ``chunks``."""
    return StreamingResponse(
        _events(chunks, metrics), media_type="text/event-stream",
        # no proxy buffering: tokens must reach the user as they come
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
