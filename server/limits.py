"""Request-shape caps that depend on settings (messages, characters, images, ``max_tokens``, k, pool,
uploaded files).

Each ``check_*`` raises ``InvalidInput`` (400) naming the param and the setting, so services and
routes share one wording. No FastAPI here: services import it. The body-size limit (413) and CORS
are ASGI middleware, in ``server/middleware.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

from retriever.errors import InvalidInput
from server.message_parts import Message, image_count, text_parts
from server.settings import Settings


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


def check_chat_request(settings: Settings, messages: Sequence[Message], *, max_tokens: int | None = None,
                       k: int | None = None, pool: int | None = None) -> None:
    """Every settings-dependent cap of a chat request (its messages as OpenAI dicts).

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
        content = message.get("content")
        _check_chars(settings, sum(map(len, text_parts(content))), f"messages[{i}].content")
        images = image_count([message])
        check_image_count(settings, images, per_message=True, param=f"messages[{i}].content")
        total_images += images
    check_image_count(settings, total_images, per_message=False, param="messages")
    check_max_tokens(settings, max_tokens)
    check_retrieval_caps(settings, k=k, pool=pool, param_prefix="retrieval.")

