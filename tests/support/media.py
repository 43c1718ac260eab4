"""Test media built in memory: encoded images, PDFs, data URLs, and SSE bodies (built and parsed).

One implementation of each, for every test module: ``noise_image``, ``encode_image``, ``png_bytes``,
``jpeg_bytes``, ``noise_png``, ``pdf_bytes`` (image pages), ``text_pdf`` (text pages), ``data_url``,
``sse_body``, ``sse_events``, ``sse_payloads``.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterable
from typing import Any

import numpy as np
from PIL import Image

SSE_DONE = "[DONE]"


# --- images ---------------------------------------------------------------------------------------
def noise_image(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    """A deterministic RGB noise image (incompressible, so truncation really cuts pixel data)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def encode_image(image: Image.Image, fmt: str, **options: Any) -> bytes:
    """``image`` encoded by Pillow as ``fmt`` ("PNG", "JPEG", "GIF", ...) with its save options."""
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def png_bytes(image: Image.Image, **options: Any) -> bytes:
    return encode_image(image, "PNG", **options)


def jpeg_bytes(image: Image.Image, **options: Any) -> bytes:
    return encode_image(image, "JPEG", **options)


def noise_png(size: int, seed: int = 7) -> bytes:
    """An incompressible square PNG of about 3·size² bytes (for size-limit tests)."""
    return png_bytes(noise_image(size, size, seed))


# --- PDFs -----------------------------------------------------------------------------------------
def pdf_bytes(pages: list[Image.Image]) -> bytes:
    """A PDF with one page per image (Pillow's writer)."""
    return encode_image(pages[0], "PDF", save_all=True, append_images=pages[1:])


def text_pdf(pages: list[str]) -> bytes:
    """A minimal valid PDF, one Helvetica text line per page (xref offsets computed)."""
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b""]  # 2 is filled in below
    kids = []
    for text in pages:
        stream = f"BT /F1 18 Tf 20 100 Td ({text}) Tj ET".encode()
        page_no, content_no = len(objects) + 1, len(objects) + 2
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 400 200] /Contents {content_no} 0 R "
                       "/Resources << /Font << /F1 99 0 R >> >> >>".encode())
        objects.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
        kids.append(f"{page_no} 0 R")
    font_no = len(objects) + 1
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    objects = [o.replace(b"99 0 R", f"{font_no} 0 R".encode()) for o in objects]
    objects[1] = f"<< /Type /Pages /Kids [{' '.join(kids)}] /Count {len(pages)} >>".encode()
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{o:010d} 00000 n \n".encode() for o in offsets)
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


# --- data URLs ------------------------------------------------------------------------------------
def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


# --- server-sent events ---------------------------------------------------------------------------
def sse_body(events: Iterable[dict[str, Any]]) -> str:
    """An OpenAI-style SSE body: one ``data:`` event per JSON payload, then ``data: [DONE]``."""
    return "".join(f"data: {json.dumps(e)}\n\n" for e in events) + f"data: {SSE_DONE}\n\n"


def sse_events(text: str) -> list[Any]:
    """The ``data:`` payloads of an SSE body in order, JSON-decoded; ``[DONE]`` as the string."""
    out: list[Any] = []
    for event in text.replace("\r\n", "\n").split("\n\n"):
        data = "\n".join(line[5:].lstrip() for line in event.split("\n") if line.startswith("data:"))
        if data:
            out.append(data if data == SSE_DONE else json.loads(data))
    return out


def sse_payloads(text: str) -> list[dict[str, Any]]:
    """The JSON payloads of an SSE body, in order, up to ``[DONE]``."""
    events = sse_events(text)
    return events[:events.index(SSE_DONE)] if SSE_DONE in events else events
