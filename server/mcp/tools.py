"""What each MCP tool does, over the app's own services; no transport here (``server.py`` and ``stdio.py`` serve it).

* ``search(query, kb?, k?, image?)`` — the search of ``POST /v1/search`` (``ChatService.search``); the kept
  snippets in the ChatGPT-connector shape ``{"results": [{"id", "title", "url", ...}]}``;
* ``fetch(id)`` — one snippet: ``{"id", "title", "text", "url", "metadata"}`` with its OCR text, source, page, tags;
* ``list_knowledge_bases()`` — the KBs this key may use, with display names;
* ``ask(question, image?, kb?)`` — ``POST /v1/ask`` through the same chat service: the answer with numbered citations.

Ids are ``<kb>:<snippet id>`` so ``fetch`` needs no ``kb`` argument (a bare snippet id means the key's default
KB). ``url`` is the snippet's source when that is a web address, else its API link (``/v1/snippets/{id}``).
Results carry the snippet images as MCP image content (``images.py``).

Every call is charged to the caller's rate limit (the ``default`` bucket, as a REST request) and to the KB's
(``kb``); keys, KB bindings (``choose_kb``: another tenant's KB is "no such knowledge base", as REST's 404),
input limits and errors are the REST API's. An error is a tool result with ``isError`` (the message and the
OpenAI-style error body), never a transport failure; an unexpected exception is logged and answered as
``internal error``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import mcp_types as types
from pydantic import BaseModel, ValidationError

from retriever.errors import InvalidInput, NotFound, VlmragError
from retriever.types import StoredPoint
from server.api_models import SearchRequest, SourceItem
from server.auth import Principal
from server.errors import as_vlmrag_error, body_for
from server.knowledge_bases import NAME_RE, KBSpec
from server.knowledge_bases.access import choose_kb
from server.mcp.images import image_content, snippet_images
from server.mcp.protocol import (
    ARGUMENTS,
    AskArguments,
    FetchArguments,
    SearchArguments,
    ToolArguments,
)
from server.remote_images import image_bytes_from_url
from server.services.links import excerpt, snippet_links

if TYPE_CHECKING:
    from server.state import AppState

log = logging.getLogger(__name__)

_LISTED_KBS = 30  # KBs named in a tool description; list_knowledge_bases has them all
_READ_ONLY = types.ToolAnnotations(read_only_hint=True, destructive_hint=False, idempotent_hint=True,
                                   open_world_hint=False)


@dataclass(frozen=True, slots=True)
class McpCaller:
    """Who calls a tool, and where its links point (``settings.public_url``, else the request's base URL)."""

    principal: Principal
    base_url: str = ""


def title_of(source: str, page: int | None, text: str, snippet_id: str) -> str:
    """A result's title: its source (and page), else the start of its text, else its id."""
    if source:
        return f"{source} p. {page}" if page else source
    return excerpt(text, 80) or snippet_id


def snippet_url(snippet_id: str, source: str, base_url: str, kb: str) -> str:
    """The snippet's link: its source when that is a web address, else ``/v1/snippets/{id}`` of this API."""
    if source.lower().startswith(("http://", "https://")):
        return source
    query = "" if kb == "default" else f"?kb={quote(kb, safe='')}"
    return f"{base_url.rstrip('/')}/v1/snippets/{quote(snippet_id, safe='')}{query}"


def result_id(kb: str, snippet_id: str) -> str:
    return f"{kb}:{snippet_id}"


def split_result_id(value: str) -> tuple[str | None, str]:
    """``"pumps:<id>"`` → ("pumps", "<id>"); a bare id → (None, id): the key's default KB."""
    kb, sep, snippet_id = value.strip().partition(":")
    if sep and NAME_RE.match(kb):
        return kb, snippet_id
    return None, value.strip()


def parse_arguments(tool: str, arguments: Any) -> ToolArguments:
    """The tool's arguments, checked by its model; ``InvalidInput`` naming the first bad one."""
    if not isinstance(arguments, dict):
        raise InvalidInput(f"{tool}: arguments must be an object", param="arguments")
    try:
        return ARGUMENTS[tool].model_validate(arguments)
    except ValidationError as exc:
        errors = exc.errors(include_input=False, include_url=False)
        first = errors[0]
        param = ".".join(str(p) for p in first.get("loc", ()))[:64] or "arguments"
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise InvalidInput(f"{tool}: {param}: {first.get('msg')}{more}", param=param, code="invalid_value") from exc


def error_result(exc: VlmragError) -> types.CallToolResult:
    """A tool error: the message for the model, the REST API's error body (and ``retry_after``) as structured content."""
    error = body_for(exc)["error"]
    text = f"{exc.error_type}: {exc.message}"
    if exc.retry_after is not None:
        error["retry_after"] = exc.retry_after
        text += f" (retry after {exc.retry_after:g} s)"
    return types.CallToolResult(content=[types.TextContent(type="text", text=text)],
                                structured_content={"error": error}, is_error=True)


def _json_result(data: dict[str, Any], images: list[types.ImageContent]) -> types.CallToolResult:
    text = types.TextContent(type="text", text=json.dumps(data, ensure_ascii=False))
    return types.CallToolResult(content=[text, *images], structured_content=data)


class McpTools:
    """The four tools over one app's services (``AppState``); built once per app (or per ``vlmrag mcp``)."""

    def __init__(self, state: AppState) -> None:
        self.settings = state.settings
        self.chat = state.chat
        self.kbs = state.knowledge_bases
        self.limiters = state.access.limiters
        self.metrics = state.metrics
        self._handlers = {"search": self._search, "fetch": self._fetch,
                          "list_knowledge_bases": self._list_knowledge_bases, "ask": self._ask}
        self._schemas = {name: model.model_json_schema() for name, model in ARGUMENTS.items()}

    # ------------------------------------------------------------------ listing
    def input_schema(self, name: str) -> dict[str, Any] | None:
        """A tool's input schema (the same for every key)."""
        return self._schemas.get(name)

    async def list_tools(self, caller: McpCaller) -> list[types.Tool]:
        """The tools, their descriptions naming the KBs this key may use."""
        specs = await self._visible(caller.principal)
        kbs = _describe_kbs(specs, self._default_kb(caller.principal))
        descriptions = {
            "search": "Search the knowledge base for snippets (text, images, PDF pages) that match a query, "
                      "optionally together with an image. Returns {\"results\": [{id, title, url, text, ...}]} "
                      f"and each result's image as image content. {kbs}",
            "fetch": "Fetch one snippet by the id search returned: its full text, the text read from its image "
                     "(OCR), source, page, tags, link and image.",
            "list_knowledge_bases": f"List the knowledge bases this key may use, with display names. {kbs}",
            "ask": "Ask a question; vlmrag answers from the knowledge base (retrieval, relevancy, selection, "
                   "its vision-language model) citing snippets as [1], [2]... with their titles and links. "
                   f"{kbs}",
        }
        return [types.Tool(name=name, description=descriptions[name], input_schema=self._schemas[name],
                           annotations=_READ_ONLY) for name in ARGUMENTS]

    async def _visible(self, principal: Principal) -> list[KBSpec]:
        return [spec for spec in await self.kbs.specs() if principal.may_use(spec.name)]

    @staticmethod
    def _default_kb(principal: Principal) -> str | None:
        try:
            return choose_kb(principal, None)
        except NotFound:
            return None

    # ------------------------------------------------------------------ calling
    async def call(self, name: str, arguments: Any, caller: McpCaller) -> types.CallToolResult:
        """Run tool ``name``; every failure is a tool error (``isError``), counted by tool and outcome."""
        started = time.perf_counter()
        tool = name if name in self._handlers else "unknown"
        outcome = "ok"
        try:
            self.limiters.charge(caller.principal.key_id, "default")
            if tool == "unknown":
                raise InvalidInput(f"unknown tool {name[:64]!r}; the tools are {', '.join(self._handlers)}",
                                   param="name", code="unknown_tool")
            return await self._handlers[name](parse_arguments(name, arguments), caller)
        except Exception as exc:  # noqa: BLE001 - a tool answers every failure as a tool error
            error = as_vlmrag_error(exc)  # logs an unexpected one with its traceback
            outcome = error.error_type
            return error_result(error)
        finally:
            self.metrics.observe_mcp_tool(tool, outcome, time.perf_counter() - started)

    def _use_kb(self, principal: Principal, requested: str | None) -> str:
        """The KB to run against (``choose_kb``), charged to that KB's own rate limit like a REST request."""
        name = choose_kb(principal, requested)
        self.limiters.charge(f"kb:{name}", "kb")
        return name

    async def _search(self, args: BaseModel, caller: McpCaller) -> types.CallToolResult:
        assert isinstance(args, SearchArguments)
        kb_name = self._use_kb(caller.principal, args.kb)
        response = await self.chat.search(SearchRequest(text=args.query, image=args.image, k=args.k), kb_name)
        kept = [c for c in response.candidates if c.kept]
        kb = await self.kbs.get(kb_name)
        with_images = [c.id for c in kept if c.image_url]
        points = await kb.store.retrieve(with_images) if with_images and self.settings.mcp_images != "none" else []
        images = await snippet_images(kb, points, self.settings.mcp_images, self.settings.mcp_image_max_bytes)
        results = [{
            "id": result_id(kb_name, c.id), "title": title_of(c.source, c.page, c.text, c.id),
            "url": snippet_url(c.id, c.source, caller.base_url, kb_name), "text": excerpt(c.text, 500),
            "kind": c.kind, "source": c.source, "page": c.page, "tags": c.tags,
            "score": c.relevancy if c.relevancy is not None else c.clip_score, "image": c.id in images,
        } for c in kept]
        data = {"results": results, "kb": kb_name, "degraded": response.degraded}
        return _json_result(data, [image_content(*images[c.id], result_id(kb_name, c.id)) for c in kept
                                   if c.id in images])

    async def _fetch(self, args: BaseModel, caller: McpCaller) -> types.CallToolResult:
        assert isinstance(args, FetchArguments)
        requested, snippet_id = split_result_id(args.id)
        kb_name = self._use_kb(caller.principal, requested)
        kb = await self.kbs.get(kb_name)
        point = await kb.get(snippet_id)
        images = await snippet_images(kb, [point], self.settings.mcp_images, self.settings.mcp_image_max_bytes)
        rid = result_id(kb_name, point.id)
        data = _document(point, rid, kb_name, caller.base_url)
        return _json_result(data, [image_content(*images[point.id], rid)] if point.id in images else [])

    async def _list_knowledge_bases(self, args: BaseModel, caller: McpCaller) -> types.CallToolResult:
        default = self._default_kb(caller.principal)
        alias = self.settings.model_alias
        items = [{"name": s.name, "display_name": s.display_name or s.name, "description": s.description,
                  "default": s.name == default, "model": f"{alias}/{s.name}"}
                 for s in await self._visible(caller.principal)]
        return _json_result({"knowledge_bases": items}, [])

    async def _ask(self, args: BaseModel, caller: McpCaller) -> types.CallToolResult:
        assert isinstance(args, AskArguments)
        kb_name = self._use_kb(caller.principal, args.kb)
        uploads: list[tuple[bytes, str | None]] = []
        if args.image is not None:
            try:
                uploads.append((await image_bytes_from_url(args.image, self.settings, self.chat.remote_images), None))
            except InvalidInput as exc:
                exc.param = "image"
                raise
        prepared = await self.chat.prepare_ask(args.question, uploads, None, kb_name=kb_name)
        prepared.owner = caller.principal.key_id  # only this key may rate the answer (POST /v1/feedback)
        result = await self.chat.complete(prepared)
        answer = (result.choices[0].message.content or "") if result.choices else ""
        cited = [s for s in result.sources if s.index is not None]
        citations = [_citation(s, kb_name, caller.base_url) for s in cited]
        data = {"answer": answer, "id": result.id, "model": result.model, "kb": kb_name, "citations": citations,
                "degraded": result.degraded}
        lines = [answer]
        if citations:
            lines += ["", "Sources:", *(f"[{c['index']}] {c['title']} <{c['url']}>" for c in citations)]
        kb = await self.kbs.get(kb_name)
        with_images = [s.id for s in cited if s.image_url]
        points = await kb.store.retrieve(with_images) if with_images and self.settings.mcp_images != "none" else []
        images = await snippet_images(kb, points, self.settings.mcp_images, self.settings.mcp_image_max_bytes)
        content: list[Any] = [types.TextContent(type="text", text="\n".join(lines))]
        content += [image_content(*images[s.id], result_id(kb_name, s.id)) for s in cited if s.id in images]
        return types.CallToolResult(content=content, structured_content=data)


def _document(point: StoredPoint, rid: str, kb: str, base_url: str) -> dict[str, Any]:
    """``fetch``'s answer: the ChatGPT-connector document, with what vlmrag knows of the snippet as metadata."""
    p = point.payload
    image_url, thumbnail_url = snippet_links(point.id, p, base_url, kb)
    text = p.text
    if p.ocr_text and p.ocr_text.strip() not in text:
        text = f"{text}\n\nText read from the image:\n{p.ocr_text}" if text else p.ocr_text
    return {
        "id": rid, "title": title_of(p.source, p.page, p.text or p.ocr_text, point.id),
        "text": text, "url": snippet_url(point.id, p.source, base_url, kb),
        "metadata": {"kb": kb, "kind": p.kind, "source": p.source, "page": p.page, "tags": list(p.tags),
                     "ocr_text": p.ocr_text, "created_at": p.created_at, "image_url": image_url,
                     "thumbnail_url": thumbnail_url},
    }


def _citation(source: SourceItem, kb: str, base_url: str) -> dict[str, Any]:
    return {"index": source.index, "id": result_id(kb, source.id),
            "title": title_of(source.source, source.page, source.text, source.id),
            "url": snippet_url(source.id, source.source, base_url, kb), "source": source.source,
            "page": source.page, "text": source.text}


def _describe_kbs(specs: list[KBSpec], default: str | None) -> str:
    """``Knowledge bases this key may use (kb): `pumps` — Pump manuals (default); ...``."""
    if not specs:
        return "This key may use no knowledge base."
    parts = []
    for spec in specs[:_LISTED_KBS]:
        label = spec.display_name if spec.display_name.lower() not in ("", spec.name) else ""
        about = excerpt(spec.description, 160) if spec.description else ""
        text = f"`{spec.name}`" + (f" — {label}" if label else "") + (f": {about}" if about else "")
        parts.append(text + (" (default)" if spec.name == default else ""))
    more = len(specs) - _LISTED_KBS
    tail = f"; and {more} more (list_knowledge_bases)" if more > 0 else ""
    return "Knowledge bases this key may use (argument kb): " + "; ".join(parts) + tail + "."
