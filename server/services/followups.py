"""What to search the knowledge base with for a conversation (``retrieval.query``).

* ``last`` — the last user turn alone (its text and images).
* ``recent`` — the last user turns, newest first, up to a character budget (``retrieval_recent_chars``),
  so a follow-up ("and how do I replace it?") still carries what "it" is. Newest first is the weighting:
  CLIP reads the first 77 tokens, so the newest turn always gets in, and older turns add their terms for
  lexical search. When the last turn has no image, the images of the newest earlier turn that has some
  are the query images.
* ``rewrite`` — one short call to the answering model turns the conversation into a stand-alone search
  query (``prompts/rewrite.jinja``); when that call fails or answers nothing usable, ``recent`` is used
  and ``rewrite`` is reported in ``degraded``.

The functions here are pure but for :func:`rewrite_query`, which takes the model call as an argument.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from prompts import render
from retriever.errors import VlmragError
from server.message_parts import has_images, text_of

log = logging.getLogger(__name__)

MAX_REWRITE_CHARS = 300  # a search query, not an essay: a longer answer is cut here
MIN_REWRITE_ALNUM = 3  # fewer letters/digits than this (junk, "?"): fall back to `recent`


@dataclass(slots=True)
class SearchQuery:
    """The text searched and which messages' images are the query images."""

    text: str
    image_turns: list[int] = field(default_factory=list)  # indexes into the messages
    mode: str = "last"  # the mode actually used
    degraded: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


def user_turns(messages: list[dict[str, Any]]) -> list[int]:
    return [i for i, m in enumerate(messages) if m.get("role") == "user"]


def last_query(messages: list[dict[str, Any]]) -> SearchQuery:
    last = user_turns(messages)[-1]
    return SearchQuery(text_of(messages[last].get("content")), [last], "last")


def recent_query(messages: list[dict[str, Any]], budget_chars: int) -> SearchQuery:
    """The last user turns, newest first, within ``budget_chars`` (the newest is always whole)."""
    turns = user_turns(messages)
    texts: list[str] = []
    used = 0
    for i in reversed(turns):
        text = text_of(messages[i].get("content")).strip()
        if not text:
            continue
        if texts and used + len(text) > budget_chars:
            break
        texts.append(text)
        used += len(text) + 1
    image_turn = next((i for i in reversed(turns) if has_images(messages[i].get("content"))), None)
    last = turns[-1]
    images = [last] if has_images(messages[last].get("content")) else ([image_turn] if image_turn is not None else [])
    return SearchQuery("\n".join(texts), images, "recent")


def transcript(messages: list[dict[str, Any]], max_chars: int = 4000) -> str:
    """The conversation as ``role: text`` lines for the rewrite prompt, newest kept when it is long."""
    lines = []
    for m in messages:
        role = m.get("role")
        if role in ("user", "assistant"):
            text = " ".join(text_of(m.get("content")).split())
            if has_images(m.get("content")):
                text = (text + " [image]").strip()
            if text:
                lines.append(f"{role}: {text}")
    joined = "\n".join(lines)
    return joined[-max_chars:]


async def rewrite_query(
    messages: list[dict[str, Any]], complete: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]],
    *, max_tokens: int, budget_chars: int,
) -> SearchQuery:
    """A stand-alone query written by the model; ``recent`` with ``degraded=["rewrite"]`` if that fails."""
    fallback = recent_query(messages, budget_chars)
    prompt = render("rewrite.jinja", conversation=transcript(messages))
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0}
    try:
        data = await complete(body)
        text = (((data.get("choices") or [{}])[0].get("message") or {}).get("content") or "")
    except (VlmragError, KeyError, AttributeError, IndexError, TypeError) as exc:
        log.warning("query rewrite failed, searching the recent turns instead: %s", exc)
        fallback.degraded.append("rewrite")
        return fallback
    line = next((ln.strip().strip('"').strip() for ln in text.splitlines() if ln.strip()), "")
    line = " ".join("".join(ch for ch in line if ch.isprintable()).split())  # no control characters
    if sum(ch.isalnum() for ch in line) < MIN_REWRITE_ALNUM:  # nothing a search could use
        fallback.degraded.append("rewrite")
        return fallback
    return SearchQuery(line[:MAX_REWRITE_CHARS], fallback.image_turns, "rewrite")
