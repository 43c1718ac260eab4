"""Prompt templates from the ``prompts`` package (one cached loader) and the answer messages built from them.

``system.jinja`` is the system prompt; ``answer.jinja`` renders the context block placed before the
user's latest question: kept snippets numbered ``[1]..[n]``, their text delimited as untrusted data,
their images attached as ``image_url`` parts at the place the template marks with ``image(n)``.
Templates load through the one loader in the ``prompts`` package (shared with the re-ranker).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from prompts import render
from server.message_parts import parts_of, text_of

# A marker no snippet text can contain (the `untrusted` filter strips NUL): where an image goes.
_IMAGE_MARK = "\x00IMAGE:{}\x00"
_IMAGE_MARK_RE = re.compile("\x00IMAGE:(\\d+)\x00")
_OPERATOR_ROLES = ("system", "developer")


@dataclass(slots=True)
class PromptSnippet:
    """One kept snippet as the answer prompt shows it."""

    index: int
    kind: str
    text: str = ""
    source: str = ""
    page: int | None = None
    image_url: str | None = None  # a data: URL, attached as an image part
    image_omitted: bool = False  # it has an image, left out to stay within the per-prompt image limit
    ocr_text: str = ""  # text read from its image at ingestion (shown as such)

    @property
    def has_image(self) -> bool:
        return self.image_url is not None


class PromptBuilder:
    """Builds the messages sent to the answering model from the caller's and the kept snippets."""

    def __init__(self, *, max_snippet_chars: int = 4000) -> None:
        self.max_snippet_chars = max_snippet_chars

    def system_prompt(self, operator_instructions: str = "") -> str:
        """Our system prompt, with the caller's own system messages appended as lower-ranked rules."""
        return render("system.jinja", operator_instructions=operator_instructions.strip())

    def context_parts(self, snippets: list[PromptSnippet]) -> list[dict[str, Any]]:
        """The rendered context block as content parts: text, with each snippet image in its place."""
        shown = [self._clip(s) for s in snippets]
        rendered = render("answer.jinja", snippets=shown, image=_IMAGE_MARK.format)
        images = {s.index: s.image_url for s in shown}
        parts: list[dict[str, Any]] = []
        pos = 0
        for match in _IMAGE_MARK_RE.finditer(rendered):
            parts.append({"type": "text", "text": rendered[pos:match.start()]})
            parts.append({"type": "image_url", "image_url": {"url": images[int(match.group(1))]}})
            pos = match.end()
        parts.append({"type": "text", "text": rendered[pos:]})
        return _merge_text([p for p in parts if p["type"] != "text" or p["text"]])

    def build_messages(
        self, messages: list[dict[str, Any]], snippets: list[PromptSnippet], *, instructions: str = "",
    ) -> list[dict[str, Any]]:
        """System prompt, the conversation, and the context block put before the latest user turn.

        Args:
            messages: the caller's messages as OpenAI dicts (content: a string or parts).
            snippets: the kept snippets, numbered as they will be cited.
            instructions: the knowledge base's system-prompt addition (an operator instruction, first).
        """
        rules = [instructions.strip()] if instructions.strip() else []
        rules += [text_of(m.get("content")) for m in messages if m.get("role") in _OPERATOR_ROLES]
        operator = "\n\n".join(rules)
        turns = [dict(m) for m in messages if m.get("role") not in _OPERATOR_ROLES]
        last_user = max((i for i, m in enumerate(turns) if m.get("role") == "user"), default=None)
        if last_user is not None:
            question = [dict(p) for p in parts_of(turns[last_user].get("content"))]
            turns[last_user] = {"role": "user", "content": _merge_text(self.context_parts(snippets) + question)}
        return [{"role": "system", "content": self.system_prompt(operator)}, *turns]

    def _clip(self, snippet: PromptSnippet) -> PromptSnippet:
        if len(snippet.text) <= self.max_snippet_chars:
            return snippet
        text = snippet.text[: self.max_snippet_chars].rstrip() + " …"
        return PromptSnippet(snippet.index, snippet.kind, text, snippet.source, snippet.page, snippet.image_url,
                             snippet.image_omitted, snippet.ocr_text[: self.max_snippet_chars])


def _merge_text(parts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Join adjacent text parts (fewer, cleaner parts; the model sees the same text)."""
    merged: list[dict[str, Any]] = []
    for part in parts:
        if part.get("type") == "text" and merged and merged[-1].get("type") == "text":
            merged[-1] = {"type": "text", "text": merged[-1]["text"] + part["text"]}
        else:
            merged.append(part)
    return merged
