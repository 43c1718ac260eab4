"""The FastAPI app: ``create_app(settings)`` wires routes, error handlers and middleware; the lifespan
builds every client once (httpx, knowledge base, vLLM clients, re-ranker, chat service) and closes
them on shutdown. Tests inject their own knowledge base, vLLM client or httpx transport.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from retriever.errors import VlmragError
from retriever.rerank import RerankService
from server.auth import check_auth_config
from server.errors import error_responses, install_error_handlers
from server.limits import install_middleware
from server.metrics import Metrics
from server.prompting import PromptBuilder
from server.ratelimit import ModelCallGate
from server.remote_images import build_remote_image_client
from server.routes import ask, chat, health, ingest_files, models, pages, search, snippets
from server.services.chat import ChatService, image_loader
from server.settings import Settings
from server.state import AppState
from server.vllm_client import VLLMClient

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"


class RequestMetricsMiddleware:
    """Request latency (to the last byte) by method, route template and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            # The template, not the raw path: ids must not explode the label set.
            path = getattr(route, "path", None) or "unmatched"
            self.metrics.request_seconds.labels(scope["method"], path, str(status)).observe(
                time.perf_counter() - started
            )


def _http_client(settings: Settings, transport: httpx.AsyncBaseTransport | None) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=max(64, settings.max_concurrent_model_calls * 4),
                          max_keepalive_connections=32)
    timeout = httpx.Timeout(settings.vllm_read_timeout_s, connect=settings.vllm_connect_timeout_s)
    # trust_env off: a proxy from the environment must not sit between us and vLLM.
    return httpx.AsyncClient(transport=transport, limits=limits, timeout=timeout, trust_env=False)


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
    knowledge_base: Any = None,
    generator: VLLMClient | None = None,
    rerank_backend: Any = None,
    vllm_transport: httpx.AsyncBaseTransport | None = None,
) -> FastAPI:
    """Build the app.

    Args:
        knowledge_base: used instead of building one (not closed on shutdown: the caller owns it).
        generator: the answering model's client, instead of one from ``settings.vllm_*``.
        rerank_backend: the re-ranker's ``ChatBackend``; default: the generator when the re-rank
            URL and model are the answering ones, else its own ``VLLMClient``.
        vllm_transport: httpx transport under every vLLM client built here (tests).
    """
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.auth_registry = check_auth_config(settings)
        async with AsyncExitStack() as stack:
            http = _http_client(settings, vllm_transport)
            stack.push_async_callback(http.aclose)
            kb = knowledge_base
            if kb is None:
                from server.wiring import build_knowledge_base  # heavy imports (torch) only when needed

                kb = await build_knowledge_base(settings)
                stack.push_async_callback(kb.close)
            gen = generator or VLLMClient.from_settings(settings, http=http)
            backend = rerank_backend
            if backend is None:
                same = (settings.effective_rerank_url == settings.vllm_url
                        and settings.effective_rerank_model == gen.model)
                backend = gen if same else VLLMClient.from_settings(
                    settings, http=http, urls=settings.effective_rerank_url, model=settings.effective_rerank_model,
                )

            reranker = RerankService(backend, image_loader(kb), concurrency=settings.rerank_concurrency,
                                     timeout_s=settings.rerank_timeout_s)
            remote = None
            if settings.remote_images_enabled:
                remote = build_remote_image_client(settings)
                stack.push_async_callback(remote.aclose)
            gate = ModelCallGate.from_settings(settings)
            chat_service = ChatService(
                settings, knowledge_base=kb, generator=gen, reranker=reranker, prompts=PromptBuilder(),
                metrics=metrics, gate=gate, remote_images=remote,
            )
            app.state.vlmrag = AppState(
                settings=settings, metrics=metrics, http=http, knowledge_base=kb, generator=gen,
                rerank_backend=backend, reranker=reranker, chat=chat_service, gate=gate,
            )
            app.state.model_gate = gate
            log.info("vlmrag ready: model %s at %s, store %s", gen.model, ", ".join(gen.urls),
                     getattr(getattr(kb, "store", None), "description", "?"))
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
    for module in (chat, ask, search, snippets, ingest_files, models, health, pages):
        app.include_router(module.router)
    if STATIC_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
