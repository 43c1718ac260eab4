"""Public links and views of stored snippets (image URLs, source items) shared by the services."""

from __future__ import annotations

from urllib.parse import quote

from retriever.types import Candidate, SnippetPayload
from server.api_models import SnippetInfo, SourceItem
from server.knowledge_bases import DEFAULT_KB


def snippet_links(
    snippet_id: str, payload: SnippetPayload, base_url: str = "", kb: str = DEFAULT_KB,
) -> tuple[str | None, str | None]:
    """(image URL, thumbnail URL) served by this API, or (None, None) for a text-only snippet.

    A snippet of another KB than the default one links with ``?kb=``: the URL opens only with a key bound to it.
    """
    if not payload.image_ref:
        return None, None
    root = f"{base_url.rstrip('/')}/v1/snippets/{quote(snippet_id, safe='')}"
    query = "" if kb == DEFAULT_KB else f"?kb={quote(kb, safe='')}"
    return f"{root}/image{query}", (f"{root}/thumbnail{query}" if payload.thumb_ref else f"{root}/image{query}")


def excerpt(text: str, limit: int = 500) -> str:
    """At most ``limit`` characters of ``text`` (whole words, an ellipsis when cut)."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0] + " …"


def source_item(candidate: Candidate, index: int | None, base_url: str = "", kb: str = DEFAULT_KB) -> SourceItem:
    """One source of an answer; ``index`` is the ``[n]`` of a kept snippet."""
    p = candidate.payload
    image_url, thumbnail_url = snippet_links(candidate.id, p, base_url, kb)
    return SourceItem(
        id=candidate.id, index=index, kind=p.kind, text=excerpt(p.text), source=p.source, page=p.page,
        image_url=image_url, thumbnail_url=thumbnail_url, clip_score=candidate.clip_score,
        relevancy=candidate.relevancy, kept=candidate.kept, reason=candidate.reason,
    )


def snippet_info(snippet_id: str, payload: SnippetPayload, base_url: str = "", kb: str = DEFAULT_KB) -> SnippetInfo:
    """A stored snippet as the snippets routes show it."""
    image_url, thumbnail_url = snippet_links(snippet_id, payload, base_url, kb)
    return SnippetInfo(
        id=snippet_id, kind=payload.kind, text=payload.text, source=payload.source, tags=list(payload.tags),
        page=payload.page, created_at=payload.created_at, image_url=image_url, thumbnail_url=thumbnail_url,
    )
