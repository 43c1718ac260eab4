"""Map every failure to an OpenAI-style error body: ``{"error": {"message", "type", "param", "code"}}``.

* ``retriever.errors`` tree → its own status (503/429 get ``Retry-After``);
* pydantic validation (bad JSON, wrong types) → 400 ``invalid_request_error`` naming the param;
* Starlette ``HTTPException`` (unknown route, wrong method) → its status;
* anything else → 500 with a generic message; the traceback goes to the log, never the body.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from retriever.errors import VlmragError

log = logging.getLogger(__name__)

_HTTP_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 405: "invalid_request_error", 409: "conflict_error",
    413: "invalid_request_error", 415: "invalid_request_error", 422: "invalid_request_error",
    429: "rate_limit_error", 502: "upstream_error", 503: "service_unavailable",
}

ErrorHook = Callable[[str, int], None]


# Documented on every route (OpenAPI), so clients and schema-driven tests see the real contract:
# validation failures are 400 (not FastAPI's 422 default), and every error has the same envelope.
_DOCUMENTED_ERRORS = {
    400: "Invalid request (bad JSON, wrong field, a limit exceeded).",
    401: "Missing or wrong API key.",
    403: "The API key lacks the scope.",
    404: "No such resource.",
    405: "Method not allowed.",
    409: "Conflict.",
    413: "Body, image bytes or image pixels over a limit.",
    415: "Unsupported media type or image format.",
    422: "Well-formed but unusable input (e.g. a corrupt image).",
    429: "Rate limit exceeded; see Retry-After.",
    502: "The model server answered nonsense.",
    503: "The model server or the store is unavailable, or the server is overloaded; see Retry-After.",
}


def error_responses() -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for ``FastAPI(responses=...)``: every error status with the error envelope."""
    from server.protocol import ErrorResponse  # here: protocol is wire models only, errors is imported early

    return {status: {"model": ErrorResponse, "description": text} for status, text in _DOCUMENTED_ERRORS.items()}


def error_body(message: str, type_: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """The OpenAI error envelope."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def body_for(exc: VlmragError) -> dict[str, Any]:
    """The error body of a vlmrag error."""
    return error_body(exc.message, exc.error_type, param=exc.param, code=exc.code)


def headers_for(exc: VlmragError) -> dict[str, str]:
    """``Retry-After`` (whole seconds, at least 1) for errors that carry one."""
    if exc.retry_after is None:
        return {}
    return {"Retry-After": str(max(1, math.ceil(exc.retry_after)))}


def as_vlmrag_error(exc: BaseException) -> VlmragError:
    """Any exception as a vlmrag error; unknown ones become a generic 500 (details only logged)."""
    if isinstance(exc, VlmragError):
        return exc
    log.error("unexpected error", exc_info=exc)
    err = VlmragError("internal error; see the server log", code="internal_error")
    return err


def sse_error_event(exc: BaseException) -> str:
    """One SSE event carrying the error body (a stream that fails after it started)."""
    return f"data: {json.dumps(body_for(as_vlmrag_error(exc)))}\n\n"


def _param_of(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "form", "header")]
    return ".".join(parts) or None


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None, str]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None, "invalid_request"
    first = errors[0]
    loc = tuple(first.get("loc", ()))
    if first.get("type") == "json_invalid":
        return "request body is not valid JSON", None, "invalid_json"
    param = _param_of(loc)
    msg = str(first.get("msg", "invalid value"))
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return (f"{param}: {msg}{more}" if param else f"{msg}{more}"), param, "invalid_value"


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def _allowed_methods(request: Request) -> str:
    """Every method the path accepts. Starlette's 405 names only the first route that matched the
    path, so ``GET`` and ``POST`` on one path as two routes would each hide the other; asking every
    route whether it fully matches the path with each method also sees into included routers."""
    allowed = [
        method for method in _METHODS
        if any(route.matches({**request.scope, "method": method})[0] == Match.FULL
               for route in request.app.router.routes)
    ]
    return ", ".join(allowed)


def install_error_handlers(app: FastAPI, on_error: ErrorHook | None = None) -> None:
    """Register the handlers; ``on_error(type, status)`` is called once per error (metrics)."""

    def note(type_: str, status: int) -> None:
        if on_error is not None:
            on_error(type_, status)

    async def vlmrag_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, VlmragError)
        if exc.status_code >= 500:
            log.warning("%s %s -> %d %s: %s", request.method, request.url.path, exc.status_code,
                        exc.code, exc.message)
        note(exc.error_type, exc.status_code)
        return JSONResponse(body_for(exc), status_code=exc.status_code, headers=headers_for(exc))

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        message, param, code = _validation_message(exc)
        note("invalid_request_error", 400)
        return JSONResponse(error_body(message, "invalid_request_error", param=param, code=code), 400)

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        type_ = _HTTP_TYPES.get(exc.status_code, "server_error" if exc.status_code >= 500 else
                                "invalid_request_error")
        note(type_, exc.status_code)
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = _allowed_methods(request) or headers.get("Allow", "")
        return JSONResponse(
            error_body(str(exc.detail), type_, code=f"http_{exc.status_code}"),
            status_code=exc.status_code, headers=headers,
        )

    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        note("server_error", 500)
        return JSONResponse(
            error_body("internal error; see the server log", "server_error", code="internal_error"), 500,
        )

    app.add_exception_handler(VlmragError, vlmrag_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected_error)
