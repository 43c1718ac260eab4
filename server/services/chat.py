"""Chat orchestration (no FastAPI here): validate → decode images → retrieve → re-rank/select →
build the prompt → call the answering model, non-streamed or streamed.

Everything that can fail runs in ``prepare_*`` and ``open_stream`` *before* a response starts; the
relay after that only turns upstream chunks into ours. The model-call points are
``complete`` and ``open_stream``: the concurrency gate wraps exactly those.

One prompt carries at most ``vllm_max_images_per_prompt`` images (vLLM refuses more): the caller's
images first (more than that is a 400), then kept snippets' images in rank order; a snippet past the
limit goes as text with a note that its image was left out. Each relevancy request of the re-ranker
carries the query images plus one candidate's, so it gets at most the limit minus one query images.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from pydantic import ValidationError

from retriever.errors import InvalidInput, UpstreamError
from retriever.images import MEDIA_TYPES, DecodedImage, decode_image, sniff_format
from retriever.rerank import RerankOptions, RerankService
from retriever.types import Candidate, SearchFilters
from server.api_models import (
    RetrievalFilters,
    RetrievalOptions,
    SearchCandidate,
    SearchRequest,
    SearchResponse,
    SourceItem,
)
from server.limits import check_chat_request, check_image_count, check_retrieval_caps, check_text_chars
from server.metrics import Metrics
from server.prompting import PromptBuilder, PromptSnippet
from server.protocol import (
    AssistantMessage,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    ChunkChoice,
    DeltaMessage,
    UsageInfo,
    new_completion_id,
)
from server.remote_images import image_bytes_from_url
from server.services.links import snippet_links, source_item
from server.settings import Settings

log = logging.getLogger(__name__)

_SAMPLING_FIELDS = ("temperature", "top_p", "stop", "seed")


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 3)


@dataclass(slots=True)
class RetrievalPlan:
    """Retrieval options resolved against the settings (request overrides win)."""

    enabled: bool
    k: int
    threshold: float
    margin: float | None
    min_k: int
    pool: int
    scorer: str
    filters: SearchFilters | None


@dataclass(slots=True)
class Retrieval:
    """What retrieval + re-ranking produced for one query."""

    kept: list[Candidate] = field(default_factory=list)
    dropped: list[Candidate] = field(default_factory=list)
    scorer: str = "none"
    degraded: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(slots=True)
class PreparedChat:
    """A validated request with its retrieval done and the model's request body built."""

    body: dict[str, Any]
    model: str
    retrieval: Retrieval
    sources: list[SourceItem]
    timings: dict[str, float]
    started: float
    completion_id: str = field(default_factory=new_completion_id)
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass(slots=True)
class QueryImage:
    """A caller's image: validated pixels for CLIP, original bytes for the re-ranker, URL for the model."""

    decoded: DecodedImage
    data: bytes
    data_url: str


class ChatService:
    """The request pipeline; one instance per app, built in the lifespan."""

    def __init__(
        self, settings: Settings, *, knowledge_base: Any, generator: Any, reranker: RerankService,
        prompts: PromptBuilder | None = None, metrics: Metrics | None = None, gate: Any = None,
        remote_images: httpx.AsyncClient | None = None,
    ) -> None:
        self.settings = settings
        self.kb = knowledge_base
        self.generator = generator  # server.vllm_client.VLLMClient (complete, open_stream)
        self.reranker = reranker
        self.snippet_image = image_loader(knowledge_base)
        self.prompts = prompts or PromptBuilder()
        self.metrics = metrics
        self.gate = gate  # server.ratelimit.ModelCallGate or None
        self.remote_images = remote_images  # only with settings.remote_images_enabled

    # ------------------------------------------------------------------ options & images
    def plan(self, options: RetrievalOptions | None, *, param_prefix: str = "retrieval.") -> RetrievalPlan:
        """Resolve per-request options against settings, enforcing the k/pool caps."""
        o = options or RetrievalOptions()
        s = self.settings
        check_retrieval_caps(s, k=o.k, pool=o.pool, param_prefix=param_prefix)
        k = o.k or s.retrieval_k
        pool = max(o.pool or s.retrieval_pool, k)  # never fewer candidates than we may keep
        check_retrieval_caps(s, pool=pool, param_prefix=param_prefix)
        return RetrievalPlan(
            enabled=o.enabled, k=k, threshold=s.retrieval_threshold if o.threshold is None else o.threshold,
            margin=s.retrieval_margin if o.margin is None else o.margin,
            min_k=min(s.retrieval_min_k if o.min_k is None else o.min_k, k), pool=pool,
            scorer=o.scorer or s.rerank_scorer, filters=_filters(o.filters),
        )

    async def load_image_url(self, url: str, param: str) -> QueryImage:
        """An ``image_url`` (data: URL; remote only when enabled), validated (limits, format, bomb guard)."""
        s = self.settings
        try:
            data = await image_bytes_from_url(url, s, self.remote_images)
            decoded = decode_image(data, max_bytes=s.limit_image_bytes, max_pixels=s.limit_image_pixels)
        except InvalidInput as exc:
            exc.param = param
            raise
        # The model always gets inline data: it must never fetch a URL itself.
        inline = url if url.lstrip()[:5].lower() == "data:" else _data_url(data, decoded.media_type)
        return QueryImage(decoded, data, inline)

    def decode_upload(self, data: bytes, filename: str | None, param: str) -> QueryImage:
        """An uploaded image file, validated; its data URL (real media type) goes to the model."""
        s = self.settings
        try:
            decoded = decode_image(data, max_bytes=s.limit_image_bytes, max_pixels=s.limit_image_pixels,
                                   filename=filename)
        except InvalidInput as exc:
            exc.param = param
            raise
        return QueryImage(decoded, data, _data_url(data, decoded.media_type))

    def check_prompt_images(self, count: int, param: str) -> None:
        """The caller's images alone must fit in one model prompt (400 naming the setting if not)."""
        cap = self.settings.vllm_max_images_per_prompt
        if count > cap:
            raise InvalidInput(
                f"{param} carries {count} images, but one model request may carry at most {cap} "
                "(VLMRAG_VLLM_MAX_IMAGES_PER_PROMPT, the model server's --limit-mm-per-prompt); "
                "send fewer images",
                param=param, code="too_many_images",
            )

    # ------------------------------------------------------------------ retrieval
    async def retrieve(self, text: str, images: list[QueryImage], plan: RetrievalPlan) -> Retrieval:
        """CLIP search for a pool, then relevancy scoring and adaptive selection."""
        if not plan.enabled:
            return Retrieval(scorer="none")
        if not text.strip() and not images:
            raise InvalidInput("nothing to search for: the question has no text and no image",
                               param="messages", code="empty_query")
        found = await self.kb.search(text or None, [q.decoded.image for q in images], plan.pool, plan.filters)
        timings = {name: round(ms, 3) for name, ms in found.timings.items() if name != "total"}
        # A relevancy request carries the query images plus one candidate image: keep it within the cap.
        rerank_images = [q.data for q in images][: max(0, self.settings.vllm_max_images_per_prompt - 1)]
        outcome = await self.reranker.rerank(
            text, rerank_images, found.candidates,
            RerankOptions(k=plan.k, threshold=plan.threshold, margin=plan.margin, min_k=plan.min_k,
                          scorer=plan.scorer),
        )
        timings.update({name: round(ms, 3) for name, ms in outcome.timings.items() if name != "total"})
        timings.setdefault("rerank", 0.0)
        return Retrieval(list(outcome.kept), list(outcome.dropped), outcome.scorer, list(outcome.degraded), timings)

    async def _prompt_snippets(self, kept: list[Candidate], image_budget: int) -> list[PromptSnippet]:
        """Kept snippets numbered for citing; images attached in rank order while ``image_budget`` lasts."""
        attached = [c for c in kept if c.payload.image_ref][: max(0, image_budget)]
        images = await asyncio.gather(*(self.snippet_image(c) for c in attached))
        loaded = dict(zip((c.id for c in attached), images))
        snippets = []
        for n, cand in enumerate(kept, start=1):
            p = cand.payload
            data = loaded.get(cand.id)
            url = _data_url(data, MEDIA_TYPES.get(sniff_format(data) or "", "image/png")) if data else None
            omitted = bool(p.image_ref) and cand.id not in loaded
            snippets.append(PromptSnippet(n, p.kind, p.text, p.source, p.page, url, image_omitted=omitted))
        return snippets

    # ------------------------------------------------------------------ preparing a chat
    async def prepare_chat(self, request: ChatCompletionRequest) -> PreparedChat:
        """Validate, decode every image, retrieve for the last user turn, build the model's body."""
        started = time.perf_counter()
        s = self.settings
        plan = self.plan(request.retrieval)
        max_tokens = request.max_completion_tokens or request.max_tokens
        check_chat_request(s, request.messages, max_tokens=max_tokens, k=plan.k, pool=plan.pool)
        last_user = max((i for i, m in enumerate(request.messages) if m.role == "user"), default=None)
        if last_user is None:
            raise InvalidInput("messages must contain at least one user message", param="messages")

        messages = [m.model_dump(exclude_none=True) for m in request.messages]
        self.check_prompt_images(_image_count(messages), "messages")

        t = time.perf_counter()
        query_images: list[QueryImage] = []
        for i, message in enumerate(request.messages):
            if isinstance(message.content, list):
                for j, part in enumerate(message.content):
                    if part.type == "image_url":
                        image = await self.load_image_url(part.image_url.url, f"messages[{i}].content[{j}].image_url")
                        # the model gets the validated inline copy, never a remote URL to fetch itself
                        messages[i]["content"][j]["image_url"]["url"] = image.data_url
                        if i == last_user:
                            query_images.append(image)
        decode_ms = _ms(t)

        query_text = _text(messages[last_user].get("content"))
        retrieval = await self.retrieve(query_text, query_images, plan)
        body = await self._body(messages, retrieval, plan.enabled, request, max_tokens)
        timings = {"decode": decode_ms, **retrieval.timings}
        return self._prepared(body, request.model, retrieval, timings, started)

    async def prepare_ask(
        self, question: str, images: list[tuple[bytes, str | None]], options: RetrievalOptions | None,
        *, max_tokens: int | None = None, temperature: float | None = None,
    ) -> PreparedChat:
        """The /v1/ask form as a one-turn chat: the question text plus uploaded images."""
        started = time.perf_counter()
        s = self.settings
        check_text_chars(s, question, "question")
        check_image_count(s, len(images), per_message=True, param="image")
        self.check_prompt_images(len(images), "image")
        plan = self.plan(options, param_prefix="")
        t = time.perf_counter()
        decoded = [self.decode_upload(data, name, "image") for data, name in images]
        decode_ms = _ms(t)
        content: list[dict[str, Any]] = [{"type": "text", "text": question}] if question else []
        content += [{"type": "image_url", "image_url": {"url": q.data_url}} for q in decoded]
        try:
            request = ChatCompletionRequest.model_validate(
                {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
                 "temperature": temperature},
            )
        except ValidationError as exc:
            first = exc.errors()[0]
            param = ".".join(str(p) for p in first.get("loc", ()))
            raise InvalidInput(f"{param}: {first.get('msg')}", param=param) from exc
        check_chat_request(s, request.messages, max_tokens=max_tokens)
        retrieval = await self.retrieve(question, decoded, plan)
        messages = [m.model_dump(exclude_none=True) for m in request.messages]
        body = await self._body(messages, retrieval, plan.enabled, request, max_tokens)
        return self._prepared(body, None, retrieval, {"decode": decode_ms, **retrieval.timings}, started)

    async def _body(
        self, messages: list[dict[str, Any]], retrieval: Retrieval, enabled: bool,
        request: ChatCompletionRequest, max_tokens: int | None,
    ) -> dict[str, Any]:
        t = time.perf_counter()
        if enabled:
            budget = self.settings.vllm_max_images_per_prompt - _image_count(messages)
            final = self.prompts.build_messages(messages, await self._prompt_snippets(retrieval.kept, budget))
        else:  # plain proxy: the caller's conversation as is
            final = messages
        retrieval.timings["prompt"] = _ms(t)
        # operator defaults first (vLLM sampling extensions); the caller's own fields win below
        body: dict[str, Any] = {**self.settings.vllm_extra_body, "messages": final}
        for name in _SAMPLING_FIELDS:
            value = getattr(request, name)
            if value is not None:
                body[name] = value
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        return body

    def _prepared(
        self, body: dict[str, Any], model: str | None, retrieval: Retrieval, timings: dict[str, float],
        started: float,
    ) -> PreparedChat:
        sources = self.sources(retrieval)
        return PreparedChat(body=body, model=model or self.settings.model_alias, retrieval=retrieval,
                            sources=sources, timings=timings, started=started)

    def sources(self, retrieval: Retrieval) -> list[SourceItem]:
        """Kept snippets (numbered as cited) then the dropped ones."""
        base = self.settings.public_url
        numbered = [(c, n) for n, c in enumerate(retrieval.kept, start=1)] + [(c, None) for c in retrieval.dropped]
        return [SourceItem(**source_item(c, n, base)) for c, n in numbered]

    # ------------------------------------------------------------------ calling the model
    async def complete(self, prepared: PreparedChat) -> ChatCompletionResponse:
        """One non-streamed answer."""
        t = time.perf_counter()
        if self.gate is not None:
            async with self.gate:
                data = await self.generator.complete(prepared.body)
        else:
            data = await self.generator.complete(prepared.body)
        prepared.timings["generate"] = _ms(t)
        choice = data["choices"][0]
        message = choice.get("message") if isinstance(choice, dict) else None
        if not isinstance(message, dict):
            raise UpstreamError("the model server answered without a message")
        usage = _usage(data.get("usage"))
        self._finish(prepared, usage)
        return ChatCompletionResponse(
            id=prepared.completion_id, created=prepared.created, model=prepared.model,
            choices=[Choice(message=AssistantMessage(content=message.get("content") or ""),
                            finish_reason=choice.get("finish_reason"))],
            usage=usage, sources=prepared.sources, degraded=prepared.retrieval.degraded, timings=prepared.timings,
        )

    async def open_stream(self, prepared: PreparedChat) -> AsyncIterator[ChatCompletionChunk]:
        """Start the model's stream (retries, gate and first event happen here), then relay it."""
        body = dict(prepared.body, stream_options={"include_usage": True})
        slot = await self.gate.acquire() if self.gate is not None else None
        t = time.perf_counter()
        try:
            upstream = await self.generator.open_stream(body)
        except BaseException:
            if slot is not None:
                slot.release()
            raise
        prepared.timings["first_token"] = _ms(t)
        return self._relay(prepared, upstream, slot, t)

    async def _relay(
        self, prepared: PreparedChat, upstream: Any, slot: Any, t: float
    ) -> AsyncIterator[ChatCompletionChunk]:
        def chunk(**kw: Any) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=prepared.completion_id, created=prepared.created, model=prepared.model,
                                       **kw)

        usage: UsageInfo | None = None
        try:
            yield chunk(choices=[ChunkChoice(delta=DeltaMessage(role="assistant", content=""))])
            async for event in upstream:
                if event.get("usage"):
                    usage = _usage(event["usage"])
                for c in event.get("choices") or []:
                    delta = c.get("delta") or {}
                    text, finish = delta.get("content"), c.get("finish_reason")
                    if text or finish:
                        yield chunk(choices=[ChunkChoice(delta=DeltaMessage(content=text or None),
                                                         finish_reason=finish)])
            prepared.timings["generate"] = _ms(t)
            self._finish(prepared, usage)
            yield chunk(choices=[], usage=usage, sources=prepared.sources,
                        degraded=prepared.retrieval.degraded, timings=prepared.timings)
        finally:
            await upstream.aclose()
            if slot is not None:
                slot.release()

    def _finish(self, prepared: PreparedChat, usage: UsageInfo | None) -> None:
        prepared.timings["total"] = _ms(prepared.started)
        if self.metrics is not None:
            self.metrics.observe_timings(prepared.timings)
            self.metrics.observe_usage(usage.model_dump() if usage else None)
            self.metrics.observe_degraded(prepared.retrieval.degraded)

    # ------------------------------------------------------------------ search only
    async def search(self, request: SearchRequest) -> SearchResponse:
        """Retrieval and selection only, with every score."""
        started = time.perf_counter()
        check_text_chars(self.settings, request.text, "text")
        plan = self.plan(RetrievalOptions(k=request.k, threshold=request.threshold, margin=request.margin,
                                          min_k=request.min_k, pool=request.pool, scorer=request.effective_scorer,
                                          filters=request.filters),
                         param_prefix="")
        t = time.perf_counter()
        images = [await self.load_image_url(request.image, "image")] if request.image else []
        decode_ms = _ms(t)
        retrieval = await self.retrieve(request.text or "", images, plan)
        timings = {"decode": decode_ms, **retrieval.timings, "total": _ms(started)}
        if self.metrics is not None:
            self.metrics.observe_timings(timings)
            self.metrics.observe_degraded(retrieval.degraded)
        base = self.settings.public_url
        candidates = [_search_candidate(c, base) for c in retrieval.kept + retrieval.dropped]
        return SearchResponse(candidates=candidates, scorer=retrieval.scorer, degraded=retrieval.degraded,
                              timings=timings)


def image_loader(kb: Any) -> Callable[[Candidate], Awaitable[bytes | None]]:
    """``load(candidate)``: the original image bytes of a snippet, None for a text-only one."""
    blobs = getattr(kb, "blobs", None)

    async def load(candidate: Candidate) -> bytes | None:
        ref = candidate.payload.image_ref
        if not ref:
            return None
        if blobs is not None:  # the payload names the blob: no second store lookup
            return await asyncio.to_thread(blobs.get, ref)
        data, _ = await kb.image_bytes(candidate.id)
        return data

    return load


def _search_candidate(c: Candidate, base: str) -> SearchCandidate:
    image_url, thumbnail_url = snippet_links(c.id, c.payload, base)
    p = c.payload
    return SearchCandidate(
        id=c.id, rank=c.rank, kind=p.kind, source=p.source, text=p.text, page=p.page, tags=list(p.tags),
        clip_score=c.clip_score, vector_scores=dict(c.vector_scores), relevancy=c.relevancy, kept=c.kept,
        reason=c.reason, image_url=image_url, thumbnail_url=thumbnail_url,
    )


def _filters(filters: RetrievalFilters | None) -> SearchFilters | None:
    if filters is None:
        return None
    result = SearchFilters(source=filters.source, tags=filters.tags, kind=list(filters.kind) if filters.kind else None)
    return None if result.is_empty() else result


def _data_url(data: bytes, media_type: str) -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode('ascii')}"


def _image_count(messages: list[dict[str, Any]]) -> int:
    """Image parts in the caller's messages (every one of them goes to the model)."""
    return sum(1 for m in messages if isinstance(m.get("content"), list)
               for part in m["content"] if isinstance(part, dict) and part.get("type") == "image_url")


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "\n".join(p.get("text", "") for p in content or [] if p.get("type") == "text")


def _usage(raw: Any) -> UsageInfo | None:
    if not isinstance(raw, dict):
        return None
    try:
        return UsageInfo.model_validate(raw)
    except ValueError as exc:
        raise UpstreamError("the model server sent malformed usage counts") from exc
