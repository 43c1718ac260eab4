"""The one error hierarchy of vlmrag; the HTTP edge (server/errors.py) and the CLI map it.

    VlmragError                      base; never raised itself
    ├── InvalidInput                 the caller's mistake                      -> 400
    │   ├── PayloadTooLarge          body / image bytes / pixels over a limit  -> 413
    │   ├── UnsupportedMediaType     content type or image format refused      -> 415
    │   └── UnprocessableInput       well-formed but unusable (corrupt image)  -> 422
    ├── Unauthorized                 no or wrong API key                       -> 401
    ├── Forbidden                    key lacks the scope                       -> 403
    ├── NotFound                     no such snippet / blob                    -> 404
    ├── Conflict                     e.g. embedder mismatch with a collection  -> 409
    ├── RateLimited                  per-key token bucket empty                -> 429 + Retry-After
    ├── UpstreamUnavailable          ours: vLLM / store down, overloaded       -> 503 + Retry-After
    │   ├── StoreUnavailable         Qdrant unreachable, embedded path locked
    │   ├── ModelUnavailable         vLLM unreachable / timing out / 5xx
    │   └── Overloaded               concurrency queue full
    ├── UpstreamError                upstream answered nonsense               -> 502
    └── ConfigurationError           bad settings, missing weights (startup)   -> 500 at startup only
"""

from __future__ import annotations


class VlmragError(Exception):
    """Base of every error vlmrag raises on purpose."""

    status_code: int = 500
    error_type: str = "server_error"
    code: str | None = None

    def __init__(
        self, message: str, *, param: str | None = None, code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.retry_after = retry_after


class InvalidInput(VlmragError):
    status_code = 400
    error_type = "invalid_request_error"


class PayloadTooLarge(InvalidInput):
    status_code = 413
    code = "payload_too_large"


class UnsupportedMediaType(InvalidInput):
    status_code = 415
    code = "unsupported_media_type"


class UnprocessableInput(InvalidInput):
    status_code = 422
    code = "unprocessable"


class Unauthorized(VlmragError):
    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(VlmragError):
    status_code = 403
    error_type = "permission_error"
    code = "insufficient_scope"


class NotFound(VlmragError):
    status_code = 404
    error_type = "not_found_error"
    code = "not_found"


class Conflict(VlmragError):
    status_code = 409
    error_type = "conflict_error"
    code = "conflict"


class RateLimited(VlmragError):
    status_code = 429
    error_type = "rate_limit_error"
    code = "rate_limited"


class UpstreamUnavailable(VlmragError):
    status_code = 503
    error_type = "service_unavailable"
    code = "upstream_unavailable"

    def __init__(self, message: str, **kwargs: object) -> None:
        kwargs.setdefault("retry_after", 5.0)
        super().__init__(message, **kwargs)  # type: ignore[arg-type]


class StoreUnavailable(UpstreamUnavailable):
    code = "store_unavailable"


class ModelUnavailable(UpstreamUnavailable):
    code = "model_unavailable"


class Overloaded(UpstreamUnavailable):
    code = "overloaded"


class UpstreamError(VlmragError):
    status_code = 502
    error_type = "upstream_error"
    code = "bad_upstream_response"


class ConfigurationError(VlmragError):
    status_code = 500
    error_type = "configuration_error"
    code = "configuration_error"
