"""Snippet images as MCP image content: the thumbnail (or the original) of each result, bounded in bytes.

``settings.mcp_images`` picks which image goes out (``thumbnail``, ``full`` or ``none``);
``settings.mcp_image_max_bytes`` bounds each one: a bigger image, or one in a format assistants do not
show, is re-encoded as a JPEG, smaller each round, until it fits (or is left out).
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
from collections.abc import Sequence

import mcp_types as types
from PIL import Image

from retriever.errors import VlmragError
from retriever.images import MEDIA_TYPES, THUMBNAIL_MEDIA_TYPE, sniff_format
from retriever.knowledge_base import KnowledgeBase
from retriever.types import StoredPoint

log = logging.getLogger(__name__)

SHOWN_TYPES = frozenset(MEDIA_TYPES.values())  # jpeg, png, webp, gif: what MCP clients display
_MIN_SIDE = 32  # below this a re-encoded image says nothing: left out instead


def bounded_image(data: bytes, media_type: str, max_bytes: int) -> tuple[bytes, str] | None:
    """``data`` as is when it is a shown type within ``max_bytes``; else a JPEG re-encoded to fit, or None."""
    if media_type in SHOWN_TYPES and len(data) <= max_bytes:
        return data, media_type
    try:
        with Image.open(io.BytesIO(data)) as opened:
            image = opened.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    while min(image.size) >= _MIN_SIDE:
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=80)
        if out.tell() <= max_bytes:
            return out.getvalue(), "image/jpeg"
        image = image.resize((max(1, int(image.width * 0.7)), max(1, int(image.height * 0.7))),
                             Image.Resampling.BICUBIC)
    return None


def _read(kb: KnowledgeBase, points: Sequence[StoredPoint], mode: str, max_bytes: int) -> dict[str, tuple[bytes, str]]:
    found: dict[str, tuple[bytes, str]] = {}
    for point in points:
        p = point.payload
        use_thumbnail = mode == "thumbnail" and bool(p.thumb_ref)
        ref = p.thumb_ref if use_thumbnail else p.image_ref
        if not ref:
            continue
        try:
            data = kb.blobs.get(ref)
        except VlmragError as exc:  # a missing blob costs the image, never the result
            log.warning("no image for snippet %s: %s", point.id, exc.message)
            continue
        fmt = sniff_format(data)
        media_type = THUMBNAIL_MEDIA_TYPE if use_thumbnail else MEDIA_TYPES.get(fmt or "", "application/octet-stream")
        bounded = bounded_image(data, media_type, max_bytes)
        if bounded is not None:
            found[point.id] = bounded
    return found


async def snippet_images(
    kb: KnowledgeBase, points: Sequence[StoredPoint], mode: str, max_bytes: int,
) -> dict[str, tuple[bytes, str]]:
    """Snippet id -> (bytes, media type) of each point's image by ``mode``; snippets without one are absent."""
    if mode == "none" or not any(p.payload.image_ref for p in points):
        return {}
    return await asyncio.to_thread(_read, kb, points, mode, max_bytes)  # blob reads: one thread hop for all


def image_content(data: bytes, media_type: str, result_id: str) -> types.ImageContent:
    """One MCP image content block; ``_meta`` names the result it belongs to."""
    return types.ImageContent(type="image", data=base64.b64encode(data).decode("ascii"), mime_type=media_type,
                              _meta={"vlmrag/id": result_id})
