"""The FastAPI app: ``create_app(settings)`` wires routes, error handlers and middleware; the lifespan
builds every client once (httpx, knowledge base, vLLM clients, re-ranker, chat service) and closes
them on shutdown. Tests inject their own knowledge base, vLLM client or httpx transport.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING

import httpx
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from retriever.errors import VlmragError
from retriever.knowledge_base import KnowledgeBase
from retriever.rerank import ChatBackend, RerankService
from server.auth import build_access_control
from server.errors import error_responses, install_error_handlers
from server.feedback import AnswerLog
from server.gate import ModelCallGate
from server.knowledge_bases import KBCatalog, KnowledgeBases, OpenKB, database_url
from server.mcp.server import mount_mcp, run_mcp
from server.metrics import Metrics
from server.middleware import RequestMetricsMiddleware, install_middleware
from server.prompting import PromptBuilder
from server.ranker_client import RankerClient
from server.remote_images import build_remote_image_client
from server.routes import (
    ask,
    backups,
    chat,
    feedback,
    health,
    ingest_files,
    knowledge_bases,
    models,
    pages,
    scorers,
    search,
    snippets,
    verify,
)
from server.routes.pages import STATIC_DIR
from server.services.backups import BackupSchedule, BackupService
from server.services.chat import ChatService
from server.services.hnsw_builds import HnswBuilds
from server.services.ingestion import IngestionService
from server.services.verification import Verifier
from server.settings import Settings

if TYPE_CHECKING:
    from retriever.ocr import OcrEngine
from server.state import AppState
from server.vllm_client import VLLMClient

log = logging.getLogger(__name__)

def _http_client(settings: Settings, transport: httpx.AsyncBaseTransport | None) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=max(64, settings.max_concurrent_model_calls * 4),
                          max_keepalive_connections=32)
    timeout = httpx.Timeout(settings.vllm_read_timeout_s, connect=settings.vllm_connect_timeout_s)
    # trust_env off: a proxy from the environment must not sit between us and vLLM.
    return httpx.AsyncClient(transport=transport, limits=limits, timeout=timeout, trust_env=False)


def _ocr_engine(settings: Settings, stack: AsyncExitStack) -> OcrEngine | None:
    """One OCR engine for ingestion and queries (its model loads in the background), or None when off."""
    if not (settings.ocr_enabled or settings.ocr_query_enabled):
        return None
    from server.wiring import build_ocr_engine

    engine = build_ocr_engine(settings)
    stack.callback(engine.close)
    warming = threading.Thread(target=_warm, args=(engine,), name="vlmrag-ocr-warm", daemon=True)
    warming.start()  # ~1.5 s of imports and model load, not on the first photo's request
    return engine


def _warm(engine: OcrEngine) -> None:
    try:
        engine.warm()
    except VlmragError as exc:  # the first query reports it (degraded: ocr); startup goes on
        log.warning("OCR could not be loaded: %s", exc.message)


def _kb_opener(settings: Settings, default: KnowledgeBase, ocr: OcrEngine | None) -> OpenKB:
    """How a named KB is opened: the same store and blob backends, the default KB's CLIP model and OCR."""

    async def open_kb(collection: str, namespace: str) -> KnowledgeBase:
        from server.wiring import build_knowledge_base  # heavy imports (torch) only when needed

        return await build_knowledge_base(settings, embedder=default.embedder, text_embedder=default.text_embedder,
                                          collection=collection,
                                          blob_namespace=namespace, ocr=ocr if settings.ocr_enabled else None)

    return open_kb


def one_line_startup_errors(
    lifespan: Callable[[FastAPI], AbstractAsyncContextManager[None]],
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """Wrap a lifespan: a VlmragError at startup is logged in one line, kept on ``app.state.startup_error``."""

    @asynccontextmanager
    async def wrapped(app: FastAPI) -> AsyncIterator[None]:
        started = False
        try:
            async with lifespan(app):
                started = True
                yield
        except VlmragError as exc:
            if not started:  # `vlmrag serve` drops the traceback uvicorn would log after this line
                app.state.startup_error = exc
                log.error("startup failed: %s", exc.message)
            raise

    return wrapped


def create_app(
    settings: Settings | None = None,
    *,
    knowledge_base: KnowledgeBase | None = None,
    answer_client: VLLMClient | None = None,
    rerank_backend: ChatBackend | None = None,
    vllm_transport: httpx.AsyncBaseTransport | None = None,
) -> FastAPI:
    """Build the app.

    Args:
        knowledge_base: used instead of building one (not closed on shutdown: the caller owns it).
        answer_client: the answering model's client, instead of one from ``settings.vllm_*``.
        rerank_backend: the re-ranker's ``ChatBackend``; default: the answer client when the re-rank
            URL and model are the answering ones, else its own ``VLLMClient``.
        vllm_transport: httpx transport under every vLLM client built here (tests).
    """
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        access = build_access_control(settings)  # a bad key config fails before anything heavy loads
        async with AsyncExitStack() as stack:
            http = _http_client(settings, vllm_transport)
            stack.push_async_callback(http.aclose)
            engine = _ocr_engine(settings, stack)
            kb = knowledge_base
            if kb is None:
                from server.wiring import build_knowledge_base  # heavy imports (torch) only when needed

                kb = await build_knowledge_base(settings, ocr=engine if settings.ocr_enabled else None)
                stack.push_async_callback(kb.close)
            # every KB shares this embedder (None: a read-only KB without one)
            metrics.watch_embed_cache(kb.embedder.cache if kb.embedder is not None else None)
            metrics.watch_ocr_cache(engine.cache if engine is not None else None)
            kbs = KnowledgeBases(settings, await asyncio.to_thread(KBCatalog, database_url(settings)),
                                 _kb_opener(settings, kb, engine), default=kb)
            stack.push_async_callback(kbs.close)
            hnsw_builds = HnswBuilds(settings, metrics)
            stack.push_async_callback(hnsw_builds.close)  # before the stores close: a running child is killed
            gen = answer_client or VLLMClient.from_settings(settings, http=http)
            backend = rerank_backend
            if backend is None:
                same = (settings.effective_rerank_url == settings.vllm_url
                        and settings.effective_rerank_model == gen.model)
                backend = gen if same else VLLMClient.from_settings(
                    settings, http=http, urls=settings.effective_rerank_url, model=settings.effective_rerank_model,
                )

            ranker = RankerClient.from_ranker_settings(settings, http=http) if settings.ranker_url else None
            reranker = RerankService(backend, kb.snippet_image, concurrency=settings.rerank_concurrency,
                                     timeout_s=settings.rerank_timeout_s, ranker=ranker)
            remote = None
            if settings.remote_images_enabled:
                remote = build_remote_image_client(settings)
                stack.push_async_callback(remote.aclose)
            gate = ModelCallGate.from_settings(settings)
            answer_log = await asyncio.to_thread(AnswerLog.from_settings, settings)
            stack.callback(answer_log.close)
            from server.wiring import build_query_ocr  # heavy imports (torch) only when the lifespan runs

            ocr = build_query_ocr(settings, engine)
            verifier = Verifier(settings, reranker=reranker, knowledge_bases=kbs, answer_log=answer_log,
                                metrics=metrics)
            chat_service = ChatService(
                settings, knowledge_bases=kbs, answer_client=gen, reranker=reranker, prompts=PromptBuilder(),
                metrics=metrics, gate=gate, remote_images=remote, ocr=ocr,
                answer_log=answer_log, verifier=verifier,
            )
            backup_service = BackupService(settings, kbs)
            schedule = None
            if settings.backup_dir and settings.backup_interval_s > 0:
                schedule = BackupSchedule(backup_service, settings.backup_interval_s, settings.backup_keep)
                schedule.start()
                stack.push_async_callback(schedule.close)  # before the stores close
            app.state.vlmrag = AppState(
                settings=settings, metrics=metrics, http=http, knowledge_base=kb, knowledge_bases=kbs,
                answer_client=gen,
                rerank_backend=backend, ranker=ranker, reranker=reranker, chat=chat_service, gate=gate, access=access,
                answer_log=answer_log, hnsw_builds=hnsw_builds, verifier=verifier,
                ingestion=IngestionService(settings, kbs, metrics, hnsw_builds),
                backups=backup_service, backup_schedule=schedule,
            )
            if settings.mcp_enabled:  # FastAPI runs no mounted app's lifespan: the MCP session manager runs here
                app.state.mcp = await stack.enter_async_context(run_mcp(app.state.vlmrag, version=app.version))
            log.info("vlmrag ready: model %s at %s, store %s", gen.model, ", ".join(gen.urls), kb.store.description)
            yield

    app = FastAPI(
        title="vlmrag", version="0.1.0", lifespan=one_line_startup_errors(lifespan),
        description="Retrieval-augmented vision-language chat with an OpenAI-compatible API.",
        responses=error_responses(),
    )
    app.state.settings = settings
    app.state.metrics = metrics
    install_error_handlers(app, on_error=metrics.observe_error)
    install_middleware(app, settings)
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    for module in (chat, ask, search, scorers, snippets, ingest_files, knowledge_bases, feedback, verify, models, health,
                   backups, pages):
        app.include_router(module.router)
    if settings.mcp_enabled:
        mount_mcp(app)
    if STATIC_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
