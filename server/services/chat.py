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
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import httpx
from pydantic import ValidationError

from retriever.errors import InvalidInput, VlmragError
from retriever.images import DecodedImage, data_url, decode_image
from retriever.knowledge_base import KnowledgeBase
from retriever.plan import RetrievalPlan, Scorer
from retriever.rerank import RerankService
from retriever.search import OcrFn, QueryVectors
from retriever.types import Candidate
from server.api_models import (
    RetrievalOptions,
    SearchRequest,
    SearchResponse,
    SourceItem,
    Verification,
)
from server.feedback import AnswerLog, AnswerRecord
from server.knowledge_bases import DEFAULT_KB, KBSpec, KnowledgeBases
from server.limits import check_chat_request, check_image_count, check_text_chars
from server.message_parts import image_count, image_parts, last_user_text
from server.metrics import Metrics
from server.prompting import PromptBuilder, PromptSnippet
from server.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChunkChoice,
    DeltaMessage,
    UsageInfo,
    new_completion_id,
)
from server.remote_images import image_bytes_from_url
from server.services.followups import SearchQuery, last_query, recent_query, rewrite_query
from server.services.links import source_item
from server.services.planning import resolve_plan
from server.services.responses import search_candidate, upstream_choice, upstream_chunk_choice, usage_of
from server.services.verification import Verifier
from server.settings import Settings

if TYPE_CHECKING:
    from server.gate import GateSlot, ModelCallGate
    from server.vllm_client import ChatStream, VLLMClient

log = logging.getLogger(__name__)

# What an answer record keeps of each source (server/feedback.py): enough to replay and judge it.
_LOGGED_SOURCE_FIELDS = {"id", "index", "relevancy", "clip_score", "kept", "kind", "source", "page"}


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 3)


class Caller(Protocol):
    """Who asks (``server/auth.py::Principal``); its key owns the answer."""

    @property
    def key_id(self) -> str: ...


@dataclass(slots=True)
class SelectedContext:
    """What retrieval + re-ranking produced for one query: the kept snippets and the dropped ones."""

    kept: list[Candidate] = field(default_factory=list)
    dropped: list[Candidate] = field(default_factory=list)
    scorer: Scorer = "none"
    degraded: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    kb: KnowledgeBase | None = None  # where the snippets come from (their images are read there)
    kb_name: str = DEFAULT_KB
    instructions: str = ""  # the KB's system-prompt addition


@dataclass(slots=True)
class PreparedChat:
    """A validated request with its retrieval done and the model's request body built."""

    body: dict[str, Any]
    model: str
    context: SelectedContext
    sources: list[SourceItem]
    timings: dict[str, float]
    started: float
    search_query: str | None = None
    completion_id: str = field(default_factory=new_completion_id)
    created: int = field(default_factory=lambda: int(time.time()))
    owner: str = ""  # the caller's key_id: only it may rate the answer
    question: str = ""  # the last user message's text, for the answer log
    plan: RetrievalPlan | None = None  # the resolved retrieval plan (None: not resolved yet)
    verification: Verification | None = None  # the first choice checked against the kept snippets

    @property
    def kb(self) -> str:
        return self.context.kb_name


@dataclass(slots=True)
class QueryImage:
    """A caller's image: validated pixels for CLIP, original bytes for the re-ranker, URL for the model."""

    decoded: DecodedImage
    data: bytes
    data_url: str


class ChatService:
    """The request pipeline; one instance per app, built in the lifespan."""

    def __init__(
        self, settings: Settings, *, knowledge_bases: KnowledgeBases, answer_client: VLLMClient,
        reranker: RerankService, prompts: PromptBuilder | None = None, metrics: Metrics | None = None,
        gate: ModelCallGate | None = None, remote_images: httpx.AsyncClient | None = None,
        ocr: OcrFn | None = None, answer_log: AnswerLog | None = None, verifier: Verifier | None = None,
    ) -> None:
        self.settings = settings
        self.kbs = knowledge_bases
        self.answer_client = answer_client  # the answering model's vLLM client
        self.reranker = reranker
        self.prompts = prompts or PromptBuilder()
        self.metrics = metrics
        self.gate = gate
        self.remote_images = remote_images  # only with settings.remote_images_enabled
        self.ocr = ocr  # reads the text in the caller's images (query-time OCR); None when turned off
        self.answer_log = answer_log  # where answers are recorded for feedback; None: not recorded
        self.verifier = verifier or Verifier(settings, reranker=reranker, metrics=metrics)
        # Per KB, the retrieval defaults its last /v1/search read: whether to start the encode before
        # reading them again (a hint only; every search reads the catalog).
        self._search_defaults: dict[str, dict[str, Any]] = {}

    # ------------------------------------------------------------------ images
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
        inline = url if url.lstrip()[:5].lower() == "data:" else data_url(data, decoded.media_type)
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
        return QueryImage(decoded, data, data_url(data, decoded.media_type))

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
    async def knowledge_base(self, name: str) -> tuple[KnowledgeBase, KBSpec]:
        """The opened KB ``name`` and its spec (defaults, system-prompt addition); the caller checked access."""
        return await self.kbs.get(name), await self.kbs.spec(name)

    def _early_embed(self, request: SearchRequest, kb: KnowledgeBase,
                     kb_name: str) -> asyncio.Task[tuple[QueryVectors, float]] | None:
        """The query text's encode, started before the KB's defaults are read (the catalog's round trip
        then runs beside it) where the plan they gave last time embeds it: a text without an image."""
        text = (request.text or "").strip()
        if not text or request.image or not kb.has_retriever:
            return None
        try:
            plan = resolve_plan(self.settings, request.retrieval_options(), param_prefix="",
                                defaults=self._search_defaults.get(kb_name, {}))
        except InvalidInput:
            return None  # the real plan raises it again, with no encode spent
        if not (plan.enabled and plan.mode != "lexical"):
            return None
        return kb.retriever.start_embed(text)

    async def retrieve(
        self, text: str, images: list[QueryImage], plan: RetrievalPlan, kb: KnowledgeBase,
        *, embedded: asyncio.Future[tuple[QueryVectors, float]] | None = None,
    ) -> SelectedContext:
        """CLIP search for a pool, then relevancy scoring and adaptive selection."""
        if not plan.enabled:
            return SelectedContext(scorer="none", kb=kb)
        if not text.strip() and not images:
            raise InvalidInput("nothing to search for: the question has no text and no image",
                               param="messages", code="empty_query")
        found = await kb.search(text or None, [q.decoded.image for q in images], plan, ocr=self.ocr,
                                embedded=embedded)
        timings = {name: round(ms, 3) for name, ms in found.timings.items() if name != "total"}
        # A relevancy request carries the query images plus one candidate image: keep it within the cap.
        rerank_images = [q.data for q in images][: max(0, self.settings.vllm_max_images_per_prompt - 1)]
        outcome = await self.reranker.rerank(text, rerank_images, found.candidates, plan,
                                             load_image=kb.snippet_image, image_text=found.image_text)
        timings.update({name: round(ms, 3) for name, ms in outcome.timings.items() if name != "total"})
        timings.setdefault("rerank", 0.0)
        return SelectedContext(list(outcome.kept), list(outcome.dropped), outcome.scorer,
                               [*found.degraded, *outcome.degraded], timings, kb=kb)

    async def _prompt_snippets(self, kb: KnowledgeBase, kept: list[Candidate], image_budget: int) -> list[PromptSnippet]:
        """Kept snippets numbered for citing; images attached in rank order while ``image_budget`` lasts."""
        attached = [c for c in kept if c.payload.image_ref][: max(0, image_budget)]
        images = await asyncio.gather(*(kb.snippet_image(c) for c in attached))
        loaded = {c.id: data for c, data in zip(attached, images) if data is not None}
        snippets = []
        for n, cand in enumerate(kept, start=1):
            p = cand.payload
            data = loaded.get(cand.id)
            url = data_url(data) if data else None
            omitted = bool(p.image_ref) and cand.id not in loaded
            snippets.append(PromptSnippet(n, p.kind, p.text, p.source, p.page, url, image_omitted=omitted,
                                          ocr_text=p.ocr_text))
        return snippets

    # ------------------------------------------------------------------ preparing a chat
    async def prepare_chat(
        self, request: ChatCompletionRequest, kb_name: str = DEFAULT_KB, *, caller: Caller | None = None,
    ) -> PreparedChat:
        """Validate, decode every image, retrieve for the conversation, build the model's body.

        ``caller`` owns the answer: only its key may rate it (None: no key, auth off in tests).
        """
        started = time.perf_counter()
        s = self.settings
        kb, spec = await self.knowledge_base(kb_name)
        plan = resolve_plan(s, request.retrieval, defaults=spec.retrieval)
        max_tokens = request.max_completion_tokens or request.max_tokens
        messages = [m.model_dump(exclude_none=True) for m in request.messages]
        check_chat_request(s, messages, max_tokens=max_tokens, k=plan.k, pool=plan.pool)
        if not any(m.role == "user" for m in request.messages):
            raise InvalidInput("messages must contain at least one user message", param="messages")
        self.check_prompt_images(image_count(messages), "messages")

        t = time.perf_counter()
        images_by_turn: dict[int, list[QueryImage]] = {}
        for i, j, part in image_parts(messages):
            image = await self.load_image_url(part["image_url"]["url"], f"messages[{i}].content[{j}].image_url")
            part["image_url"]["url"] = image.data_url  # the model gets the validated inline copy, never a URL to fetch
            images_by_turn.setdefault(i, []).append(image)
        decode_ms = _ms(t)

        if plan.enabled and request.messages[-1].role == "tool" and plan.on_tool_result == "skip":
            plan.enabled = False  # a tool result is not a question: the conversation goes on as the caller sent it
        query = await self._search_query(messages, plan) if plan.enabled else None
        query_images = [img for i in (query.image_turns if query else []) for img in images_by_turn.get(i, [])]
        context = await self.retrieve(query.text if query else "", query_images, plan, kb)
        context.kb_name, context.instructions = kb_name, spec.system_prompt
        if query is not None:
            context.degraded.extend(query.degraded)
            context.timings.update(query.timings)
        body = await self._body(messages, context, plan.enabled, request, max_tokens)
        timings = {"decode": decode_ms, **context.timings}
        prepared = self._prepared(body, request.model, context, timings, started, caller)
        prepared.search_query = query.text if query else None
        prepared.question, prepared.plan = last_user_text(messages), plan
        return prepared

    async def _search_query(self, messages: list[dict[str, Any]], plan: RetrievalPlan) -> SearchQuery:
        """The conversation's search query by ``plan.query`` (the rewrite call goes through the gate)."""
        s = self.settings
        if plan.query == "last":
            return last_query(messages)
        if plan.query == "recent":
            return recent_query(messages, s.retrieval_recent_chars)
        t = time.perf_counter()
        query = await rewrite_query(messages, self._call_model, max_tokens=s.retrieval_rewrite_max_tokens,
                                    budget_chars=s.retrieval_recent_chars)
        query.timings["rewrite"] = _ms(t)
        return query

    async def _call_model(self, body: dict[str, Any]) -> dict[str, Any]:
        if self.gate is not None:
            async with self.gate:
                return await self.answer_client.complete(body)
        return await self.answer_client.complete(body)

    async def prepare_ask(
        self, question: str, images: list[tuple[bytes, str | None]], options: RetrievalOptions | None,
        *, max_tokens: int | None = None, temperature: float | None = None, kb_name: str = DEFAULT_KB,
        caller: Caller | None = None,
    ) -> PreparedChat:
        """The /v1/ask form as a one-turn chat: the question text plus uploaded images (``caller`` as in chat)."""
        started = time.perf_counter()
        s = self.settings
        check_text_chars(s, question, "question")
        check_image_count(s, len(images), per_message=True, param="image")
        self.check_prompt_images(len(images), "image")
        kb, spec = await self.knowledge_base(kb_name)
        plan = resolve_plan(s, options, param_prefix="", defaults=spec.retrieval)
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
        messages = [m.model_dump(exclude_none=True) for m in request.messages]
        check_chat_request(s, messages, max_tokens=max_tokens)
        context = await self.retrieve(question, decoded, plan, kb)
        context.kb_name, context.instructions = kb_name, spec.system_prompt
        body = await self._body(messages, context, plan.enabled, request, max_tokens)
        prepared = self._prepared(body, None, context, {"decode": decode_ms, **context.timings}, started, caller)
        prepared.question, prepared.plan = question, plan
        return prepared

    async def _body(
        self, messages: list[dict[str, Any]], context: SelectedContext, enabled: bool,
        request: ChatCompletionRequest, max_tokens: int | None,
    ) -> dict[str, Any]:
        t = time.perf_counter()
        if enabled:
            budget = self.settings.vllm_max_images_per_prompt - image_count(messages)
            snippets = await self._prompt_snippets(context.kb, context.kept, budget) if context.kb else []
            final = self.prompts.build_messages(messages, snippets, instructions=context.instructions)
        else:  # plain proxy: the caller's conversation as is
            final = messages
        context.timings["prompt"] = _ms(t)
        # operator defaults first (vLLM sampling extensions); the caller's own fields win below
        body: dict[str, Any] = {**self.settings.vllm_extra_body, "messages": final, **request.sampling_fields()}
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        return body

    def _prepared(
        self, body: dict[str, Any], model: str | None, context: SelectedContext, timings: dict[str, float],
        started: float, caller: Caller | None,
    ) -> PreparedChat:
        sources = self.sources(context)
        return PreparedChat(body=body, model=model or self.settings.model_alias, context=context,
                            sources=sources, timings=timings, started=started,
                            owner=caller.key_id if caller is not None else "")

    def sources(self, context: SelectedContext) -> list[SourceItem]:
        """Kept snippets (numbered as cited) then the dropped ones."""
        base = self.settings.public_url
        numbered = [(c, n) for n, c in enumerate(context.kept, start=1)] + [(c, None) for c in context.dropped]
        return [source_item(c, n, base, context.kb_name) for c, n in numbered]

    # ------------------------------------------------------------------ calling the model
    async def complete(self, prepared: PreparedChat) -> ChatCompletionResponse:
        """One non-streamed answer."""
        t = time.perf_counter()
        if self.gate is not None:
            async with self.gate:
                data = await self.answer_client.complete(prepared.body)
        else:
            data = await self.answer_client.complete(prepared.body)
        prepared.timings["generate"] = _ms(t)
        choices = [upstream_choice(c, n) for n, c in enumerate(data["choices"])]
        usage = usage_of(data.get("usage"))
        if choices and isinstance(choices[0].message.content, str):
            disclaimer = await self._verify(prepared, choices[0].message.content)
            if disclaimer:
                choices[0].message.content += disclaimer
        self._finish(prepared, usage)
        await self._log_answer(prepared, (choices[0].message.content or "") if choices else "")
        return ChatCompletionResponse(
            id=prepared.completion_id, created=prepared.created, model=prepared.model, choices=choices,
            usage=usage, sources=prepared.sources, degraded=prepared.context.degraded, timings=prepared.timings,
            search_query=prepared.search_query, verification=prepared.verification,
        )

    async def open_stream(self, prepared: PreparedChat) -> AsyncIterator[ChatCompletionChunk]:
        """Start the model's stream (retries, gate and first event happen here), then relay it."""
        body = dict(prepared.body, stream_options={"include_usage": True})
        slot = await self.gate.acquire() if self.gate is not None else None
        t = time.perf_counter()
        try:
            upstream = await self.answer_client.open_stream(body)
        except BaseException:
            if slot is not None:
                slot.release()
            raise
        prepared.timings["first_token"] = _ms(t)
        return self._relay(prepared, upstream, slot, t)

    async def _relay(
        self, prepared: PreparedChat, upstream: ChatStream, slot: GateSlot | None, t: float
    ) -> AsyncIterator[ChatCompletionChunk]:
        def chunk(**kw: Any) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=prepared.completion_id, created=prepared.created, model=prepared.model,
                                       **kw)

        usage: UsageInfo | None = None
        answer: list[str] = []  # the first choice's text, for the answer log
        n = int(prepared.body.get("n") or 1)
        try:
            yield chunk(choices=[ChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                                 for i in range(n)])
            async for event in upstream:
                if event.get("usage"):
                    usage = usage_of(event["usage"])
                relayed = [c for c in (upstream_chunk_choice(raw) for raw in event.get("choices") or []) if c is not None]
                answer.extend(c.delta.content for c in relayed if c.index == 0 and c.delta.content)
                if relayed:
                    yield chunk(choices=relayed)
            prepared.timings["generate"] = _ms(t)
            disclaimer = await self._verify(prepared, "".join(answer))
            if disclaimer:  # one more delta of the first choice, before the final chunk
                answer.append(disclaimer)
                yield chunk(choices=[ChunkChoice(index=0, delta=DeltaMessage(content=disclaimer))])
            self._finish(prepared, usage)
            await self._log_answer(prepared, "".join(answer))  # before the last chunk: feedback may follow it
            yield chunk(choices=[], usage=usage, sources=prepared.sources, degraded=prepared.context.degraded,
                        timings=prepared.timings, search_query=prepared.search_query,
                        verification=prepared.verification)
        finally:
            await upstream.aclose()
            if slot is not None:
                slot.release()

    async def _verify(self, prepared: PreparedChat, answer: str) -> str:
        """Check the answer against the kept snippets (``retrieval.verify``); the disclaimer to append, or ""."""
        plan = prepared.plan
        mode = plan.verify if plan is not None else "off"
        if plan is None or mode == "off" or not plan.enabled or not answer.strip():
            return ""  # no retrieval (a plain proxy turn, a tool result) or no text (tool calls): nothing to check
        kb = prepared.context.kb
        outcome = await self.verifier.check(answer, prepared.context.kept, mode,
                                            load_image=kb.snippet_image if kb is not None else None)
        prepared.timings["verify"] = outcome.ms
        prepared.context.degraded.extend(outcome.degraded)
        disclaimer = ""
        if outcome.any_unsupported and plan.on_unsupported == "disclaim":
            disclaimer = "\n\n" + self.settings.verify_disclaimer
            outcome.verification.disclaimed = True
        prepared.verification = outcome.verification
        self.verifier.observe(outcome, "chat")
        return disclaimer

    def _finish(self, prepared: PreparedChat, usage: UsageInfo | None) -> None:
        prepared.timings["total"] = _ms(prepared.started)
        if self.metrics is not None:
            self.metrics.observe_timings(prepared.timings)
            self.metrics.observe_usage(usage.model_dump() if usage else None)
            self.metrics.observe_kb(prepared.context.kb_name, "answer", usage.model_dump() if usage else None)
            self.metrics.observe_degraded(prepared.context.degraded)

    async def _log_answer(self, prepared: PreparedChat, answer: str = "") -> None:
        """Record the answer for feedback; a failing database is logged and counted, never fails the chat."""
        if self.answer_log is None:
            return
        context = prepared.context
        observed = {"scorer_used": context.scorer, "degraded": list(context.degraded),
                    "answer_model": self.answer_client.model, "timings": dict(prepared.timings),
                    "request": {k: v for k, v in prepared.body.items() if k != "messages"}}
        record = AnswerRecord(
            completion_id=prepared.completion_id, key_id=prepared.owner, kb=context.kb_name,
            question=prepared.question, search_query=prepared.search_query,
            sources=[s.model_dump(include=_LOGGED_SOURCE_FIELDS) for s in prepared.sources],
            model=prepared.model, created_at=time.time(), answer=answer,
            settings={**(asdict(prepared.plan) if prepared.plan is not None else {}), **observed},
            verification=prepared.verification.model_dump() if prepared.verification is not None else None,
        )
        try:
            await asyncio.wait_for(self.answer_log.record(record), self.settings.feedback_write_timeout_s)
        except Exception as exc:  # noqa: BLE001 - the answer goes out whatever the log's trouble
            log.warning("answer %s not recorded in the answer log: %s", prepared.completion_id,
                        exc.message if isinstance(exc, VlmragError) else type(exc).__name__)
            if self.metrics is not None:
                self.metrics.observe_degraded(["answer_log"])

    # ------------------------------------------------------------------ search only
    async def search(self, request: SearchRequest, kb_name: str = DEFAULT_KB) -> SearchResponse:
        """Retrieval and selection only, with every score."""
        started = time.perf_counter()
        check_text_chars(self.settings, request.text, "text")
        kb = await self.kbs.get(kb_name)
        embedded = self._early_embed(request, kb, kb_name)
        try:
            spec = await self.kbs.spec(kb_name)  # read every time: a replica's change counts at once
            plan = resolve_plan(self.settings, request.retrieval_options(), param_prefix="", defaults=spec.retrieval)
        except BaseException:
            if embedded is not None:
                embedded.cancel()
            raise
        self._search_defaults[kb_name] = spec.retrieval
        if embedded is not None and not (plan.enabled and plan.mode != "lexical"):
            embedded.cancel()  # the KB's defaults changed since: this plan needs no embedding
            embedded = None
        t = time.perf_counter()
        images = [await self.load_image_url(request.image, "image")] if request.image else []
        decode_ms = _ms(t)
        context = await self.retrieve(request.text or "", images, plan, kb, embedded=embedded)
        timings = {"decode": decode_ms, **context.timings, "total": _ms(started)}
        if self.metrics is not None:
            self.metrics.observe_timings(timings)
            self.metrics.observe_degraded(context.degraded)
            self.metrics.observe_kb(kb_name, "search")
        base = self.settings.public_url
        candidates = [search_candidate(c, base, kb_name) for c in context.kept + context.dropped]
        return SearchResponse(candidates=candidates, scorer=context.scorer, degraded=context.degraded,
                              timings=timings)

