"""The app's ASGI middleware: body size (413), request metrics, and CORS.

* ``BodySizeLimitMiddleware`` — a body over ``settings.limit_body_bytes`` gets 413 with the
  OpenAI-style error body. A too-large ``Content-Length`` is refused before the app runs; a chunked
  (or lying) body is counted as it streams and cut off at the limit, whatever the route does with
  the error it sees (we replace its response with ours). Starlette's own ``RequestBodyLimitMiddleware``
  answers plain text on some paths, hence this small one.
* ``RequestMetricsMiddleware`` — request latency (to the last byte) by method, route template and status.
* ``install_middleware(app, settings)`` — the body limit, and CORS only when
  ``settings.cors_origins`` is set (off by default). ``create_app`` calls it once.

The settings-dependent request-shape caps (``check_*``) are ``server/limits.py``: services use them.
"""

from __future__ import annotations

import asyncio
import json
import time

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from retriever.errors import PayloadTooLarge
from server.errors import body_for
from server.metrics import Metrics
from server.settings import Settings

_DRAIN_SECONDS = 5.0
_MIN_DRAIN_BYTES = 8 * 1024 * 1024


class BodySizeLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` with 413, counting streamed bytes too."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self._drain_budget = max(2 * max_bytes, _MIN_DRAIN_BYTES)

    def _error(self, size: str) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"request body is {size} bytes, the limit is {self.max_bytes} (VLMRAG_LIMIT_BODY_BYTES)",
            code="body_too_large",
        )

    async def _reject(self, receive: Receive, send: Send, exc: PayloadTooLarge, *, drain: bool) -> None:
        if drain:
            await self._drain(receive)
        body = json.dumps(body_for(exc)).encode("utf-8")
        await send({
            "type": "http.response.start", "status": 413,
            "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        })
        await send({"type": "http.response.body", "body": body})

    async def _drain(self, receive: Receive) -> None:
        """Read and drop what the client is still sending, within a byte and time budget.

        Most clients write the whole body before reading the answer; closing on unread data makes
        the kernel send a reset and the client sees a connection error instead of our 413. Servers
        (uvicorn) stop delivering the body once a response is complete, so this runs *before* it.
        """
        budget = self._drain_budget
        try:
            async with asyncio.timeout(_DRAIN_SECONDS):
                while budget > 0:
                    message = await receive()
                    if message["type"] != "http.request" or not message.get("more_body", False):
                        return
                    budget -= len(message.get("body", b""))
        except (TimeoutError, OSError):
            pass  # the connection is closed after the response anyway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            # A client waiting for "100 Continue" has sent nothing yet: answer at once. So do we when
            # the body is too big to be worth reading; that client may see a reset instead.
            drain = not _expects_continue(scope) and declared <= self._drain_budget
            await self._reject(receive, send, self._error(str(declared)), drain=drain)
            return

        received = 0
        exceeded: PayloadTooLarge | None = None
        started = False

        async def limited_receive() -> Message:
            nonlocal received, exceeded
            if exceeded is not None:
                raise exceeded  # the app asked again after the cut-off: it gets the same answer
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    exceeded = self._error(f"more than {self.max_bytes}")
                    raise exceeded
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded is not None and not started:
                return  # the app's reaction to the cut-off (often a 400) is replaced by our 413
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if exceeded is None or started:
                raise
        if exceeded is not None and not started:
            await self._reject(receive, send, exceeded, drain=True)


def _expects_continue(scope: Scope) -> bool:
    return any(name == b"expect" and value.lower() == b"100-continue" for name, value in scope.get("headers", ()))


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


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


def install_middleware(app: FastAPI, settings: Settings) -> None:
    """Body-size limit always; CORS only when ``settings.cors_origins`` lists origins."""
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.limit_body_bytes)
    if settings.cors_origins:
        # Added last = outermost: even a 413 or 401 carries the CORS headers a browser needs to read it.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "X-API-Key"],
            expose_headers=["Retry-After"],
            allow_credentials=False,  # bearer keys, not cookies
            max_age=600,
        )
