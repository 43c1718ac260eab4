"""Input limits at the HTTP edge: body size (ASGI middleware), CORS, and request-shape caps.

* ``BodySizeLimitMiddleware`` — a body over ``settings.limit_body_bytes`` gets 413 with the
  OpenAI-style error body. A too-large ``Content-Length`` is refused before the app runs; a chunked
  (or lying) body is counted as it streams and cut off at the limit, whatever the route does with
  the error it sees (we replace its response with ours). Starlette's own ``RequestBodyLimitMiddleware``
  answers plain text on some paths, hence this small one.
* ``install_middleware(app, settings)`` — the body limit, and CORS only when
  ``settings.cors_origins`` is set (off by default). ``create_app`` calls it once.
* ``check_*`` validators — the caps that depend on settings (messages, characters, images,
  ``max_tokens``, k, pool, uploaded files); each raises ``InvalidInput`` (400) naming the param and
  the setting, so services and routes share one wording.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable, Sequence
from typing import Any

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from retriever.errors import InvalidInput, PayloadTooLarge
from server.errors import body_for
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


# --- request-shape caps -----------------------------------------------------------------------


def _cap(value: int | None, limit: int, param: str, setting: str, what: str) -> None:
    if value is not None and value > limit:
        raise InvalidInput(f"{param} is {value}, the limit is {limit} {what} ({setting})",
                           param=param, code="limit_exceeded")


def check_retrieval_caps(settings: Settings, *, k: int | None = None, pool: int | None = None,
                         param_prefix: str = "") -> None:
    """``k`` <= ``limit_k`` and ``pool`` <= ``limit_pool``."""
    _cap(k, settings.limit_k, f"{param_prefix}k", "VLMRAG_LIMIT_K", "snippets")
    _cap(pool, settings.limit_pool, f"{param_prefix}pool", "VLMRAG_LIMIT_POOL", "candidates")


def check_max_tokens(settings: Settings, max_tokens: int | None, param: str = "max_tokens") -> None:
    """``max_tokens`` <= ``limit_max_tokens``."""
    _cap(max_tokens, settings.limit_max_tokens, param, "VLMRAG_LIMIT_MAX_TOKENS", "tokens")


def _check_chars(settings: Settings, count: int, param: str) -> None:
    if count > settings.limit_message_chars:
        raise InvalidInput(
            f"{param} has {count} characters, the limit is {settings.limit_message_chars} "
            "(VLMRAG_LIMIT_MESSAGE_CHARS)", param=param, code="message_too_long",
        )


def check_text_chars(settings: Settings, text: str | None, param: str) -> None:
    """One text (a message, a question) <= ``limit_message_chars`` characters."""
    if text is not None:
        _check_chars(settings, len(text), param)


def check_image_count(settings: Settings, count: int, *, per_message: bool, param: str) -> None:
    """Images in one message <= ``limit_images_per_message``; in one request <= ``limit_images_per_request``."""
    limit, setting, per = (
        (settings.limit_images_per_message, "VLMRAG_LIMIT_IMAGES_PER_MESSAGE", "per message") if per_message
        else (settings.limit_images_per_request, "VLMRAG_LIMIT_IMAGES_PER_REQUEST", "per request")
    )
    if count > limit:
        raise InvalidInput(f"{param} has {count} images, the limit is {limit} {per} ({setting})",
                           param=param, code="too_many_images")


def check_upload_count(settings: Settings, count: int, param: str = "files") -> None:
    """Files in one multipart request <= ``limit_upload_files``."""
    if count > settings.limit_upload_files:
        raise InvalidInput(f"{param}: {count} files uploaded, the limit is {settings.limit_upload_files} "
                           "(VLMRAG_LIMIT_UPLOAD_FILES)", param=param, code="too_many_files")


def _parts(content: Any) -> Iterable[Any]:
    return content if isinstance(content, list) else ()


def check_chat_request(settings: Settings, messages: Sequence[Any], *, max_tokens: int | None = None,
                       k: int | None = None, pool: int | None = None) -> None:
    """Every settings-dependent cap of a chat request (``server.protocol.ChatMessage`` list).

    Counts characters of the text parts and images of the ``image_url`` parts of each message;
    raises ``InvalidInput`` (400) for the first cap exceeded.
    """
    if len(messages) > settings.limit_messages:
        raise InvalidInput(
            f"messages has {len(messages)} entries, the limit is {settings.limit_messages} (VLMRAG_LIMIT_MESSAGES)",
            param="messages", code="too_many_messages",
        )
    total_images = 0
    for i, message in enumerate(messages):
        content = getattr(message, "content", None)
        if isinstance(content, str):
            check_text_chars(settings, content, f"messages[{i}].content")
            continue
        chars = images = 0
        for part in _parts(content):
            if getattr(part, "type", None) == "image_url":
                images += 1
            else:
                chars += len(getattr(part, "text", "") or "")
        _check_chars(settings, chars, f"messages[{i}].content")
        check_image_count(settings, images, per_message=True, param=f"messages[{i}].content")
        total_images += images
    check_image_count(settings, total_images, per_message=False, param="messages")
    check_max_tokens(settings, max_tokens)
    check_retrieval_caps(settings, k=k, pool=pool, param_prefix="retrieval.")

