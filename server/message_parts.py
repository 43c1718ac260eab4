"""The one walker over chat messages' content, in their OpenAI JSON form (what goes to the model).

A message's ``content`` is a string, a list of parts (``{"type": "text", "text"}`` and
``{"type": "image_url", "image_url": {"url"}}``, the two ``server/protocol.py`` accepts) or None.
The limits, the follow-up query, the prompt and the chat service all read content through here.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

Message = dict[str, Any]


def parts_of(content: Any) -> list[dict[str, Any]]:
    """The content as parts (the list itself, not copies); a string (or None) is one text part."""
    if isinstance(content, list):
        return [part for part in content if isinstance(part, dict)]
    return [{"type": "text", "text": content or ""}]


def text_parts(content: Any) -> list[str]:
    """The text of each text part, in order."""
    return [part.get("text") or "" for part in parts_of(content) if part.get("type") == "text"]


def text_of(content: Any) -> str:
    """The content's text, its text parts joined by newlines."""
    return "\n".join(text_parts(content))


def has_images(content: Any) -> bool:
    return any(part.get("type") == "image_url" for part in parts_of(content))


def image_parts(messages: Sequence[Message]) -> Iterator[tuple[int, int, dict[str, Any]]]:
    """(message index, part index, part) of every ``image_url`` part, in order."""
    for i, message in enumerate(messages):
        content = message.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                if isinstance(part, dict) and part.get("type") == "image_url":
                    yield i, j, part


def image_count(messages: Sequence[Message]) -> int:
    """Image parts in the messages."""
    return sum(1 for _ in image_parts(messages))


def last_user_text(messages: Sequence[Message]) -> str:
    """The text of the last user message ("" when there is none)."""
    return next((text_of(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), "")
