"""Decode and validate untrusted image bytes: format allow-list, size and pixel limits, EXIF, RGB.

Every failure is one of ``retriever.errors``: ``UnsupportedMediaType`` (415) for a format outside
JPEG/PNG/WebP/GIF (or not an image at all), ``UnprocessableInput`` (422) for empty, truncated or
corrupt data, ``PayloadTooLarge`` (413) for bytes over ``max_bytes`` or pixels over ``max_pixels``.

Bomb guard: the format is sniffed from magic bytes and only that one Pillow plugin is asked to open
the data (no other parser ever sees it); the pixel count is read from the header by ``Image.open``
and refused *before* any pixel is decoded. We never mutate ``PIL.Image.MAX_IMAGE_PIXELS`` (a
process-wide global shared with every other Pillow user): Pillow's own guard stays at its default
(warning above ~89 Mpx, ``DecompressionBombError`` above ~179 Mpx) and is only a second line of
defence; its error is mapped to ``PayloadTooLarge`` too. Our explicit ``max_pixels`` check is the
one that decides, so a configured limit below Pillow's is always enforced.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from retriever.errors import InvalidInput, PayloadTooLarge, UnprocessableInput, UnsupportedMediaType

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF")
MEDIA_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif"}
SUFFIXES = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif"}
THUMBNAIL_MEDIA_TYPE = "image/jpeg"
THUMBNAIL_SUFFIX = ".jpg"

# Formats we recognise only to name them in the 415 message (never opened).
_REFUSED_MAGIC = (
    (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"BM", "BMP"), (b"\x00\x00\x01\x00", "ICO"),
    (b"%PDF", "PDF"), (b"8BPS", "PSD"), (b"\xff\x0a", "JPEG XL"), (b"\x00\x00\x00\x0cJXL ", "JPEG XL"),
)
_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(?:;[\w.+-]+=[^;,]*)*)(?P<b64>;base64)?,",
                       re.IGNORECASE)
# Pillow raises a zoo of exception types on bad data; all of them mean "corrupt".
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, IndexError, TypeError)


@dataclass(slots=True)
class DecodedImage:
    """A validated image: RGB pixels (EXIF orientation applied) plus facts about the original bytes."""

    image: Image.Image
    format: str  # "JPEG" | "PNG" | "WEBP" | "GIF" (from content, never from the file name)
    width: int  # after EXIF orientation, i.e. ``image.size``
    height: int
    sha256: str  # of the original bytes

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES[self.format]

    @property
    def suffix(self) -> str:
        return SUFFIXES[self.format]


def sniff_format(data: bytes) -> str | None:
    """The allowed format these bytes start with, or None."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def data_url(data: bytes, media_type: str | None = None) -> str:
    """A base64 ``data:`` URL of ``data``; the media type is sniffed from the magic bytes when not given."""
    if media_type is None:  # vLLM decodes by content; the label is for humans and strict clients
        media_type = MEDIA_TYPES.get(sniff_format(data) or "", "application/octet-stream")
    return f"data:{media_type};base64,{base64.b64encode(data).decode('ascii')}"


def _refused_name(data: bytes) -> str | None:
    for magic, name in _REFUSED_MAGIC:
        if data.startswith(magic):
            return name
    if data[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypavif"):
        return "HEIF/AVIF"
    return None


def _what(filename: str | None) -> str:
    return f"{filename}: " if filename else ""


def decode_image(
    data: bytes, *, max_bytes: int, max_pixels: int, filename: str | None = None,
    draft_size: int | None = None,
) -> DecodedImage:
    """Validate and decode image bytes into RGB; raises 413/415/422 errors (see module docstring).

    Args:
        draft_size: if set, a JPEG may be decoded at a reduced scale (libjpeg DCT scaling) whose
            shorter side stays >= this; much faster for big photos that are only embedded and
            thumbnailed. ``width``/``height`` then describe the decoded image.
    """
    what = _what(filename)
    if not data:
        raise UnprocessableInput(f"{what}empty image (0 bytes)", param="image")
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"{what}image is {len(data)} bytes, the limit is {max_bytes}", param="image")
    fmt = sniff_format(data)
    if fmt is None:
        name = _refused_name(data)
        kind = f"{name} images are not supported" if name else "not a recognised image format"
        raise UnsupportedMediaType(f"{what}{kind} (allowed: JPEG, PNG, WebP, GIF)", param="image")
    try:
        # formats=[fmt]: only the sniffed plugin parses the data; Image.open reads just the header.
        img = Image.open(io.BytesIO(data), formats=[fmt])
    except Image.DecompressionBombError as exc:
        raise PayloadTooLarge(f"{what}image has too many pixels ({exc})", param="image") from exc
    except UnidentifiedImageError as exc:
        raise UnprocessableInput(f"{what}corrupt {fmt} header: not decodable", param="image") from exc
    except _DECODE_ERRORS as exc:
        raise UnprocessableInput(f"{what}corrupt {fmt} header: {exc}", param="image") from exc
    width, height = img.size
    if width <= 0 or height <= 0:
        raise UnprocessableInput(f"{what}image has no pixels ({width}x{height})", param="image")
    if width * height > max_pixels:
        raise PayloadTooLarge(
            f"{what}image is {width}x{height} = {width * height} pixels, the limit is {max_pixels}",
            param="image",
        )
    try:
        if fmt == "JPEG" and draft_size:
            img.draft("RGB", (draft_size, draft_size))
        img.seek(0)  # animated GIF/WebP: the first frame
        img.load()
        ImageOps.exif_transpose(img, in_place=True)  # in place: no extra copy of a big photo
        rgb = _to_rgb(img)
    except Image.DecompressionBombError as exc:
        img.close()
        raise PayloadTooLarge(f"{what}image has too many pixels ({exc})", param="image") from exc
    except _DECODE_ERRORS as exc:
        img.close()
        raise UnprocessableInput(f"{what}corrupt or truncated {fmt} image: {exc}", param="image") from exc
    return DecodedImage(
        image=rgb, format=fmt, width=rgb.width, height=rgb.height, sha256=hashlib.sha256(data).hexdigest()
    )


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode → 8-bit RGB; transparency is composited on white (not black)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode == "I":
        # 16-bit (or 32-bit int) grey: keep the top 8 bits; convert("L") would clip to white.
        arr: np.ndarray = np.asarray(img).astype(np.uint32)
        shift = 8 if arr.max(initial=0) > 255 else 0
        return Image.fromarray((arr >> shift).clip(0, 255).astype(np.uint8), mode="L").convert("RGB")
    if mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float32))
        return Image.fromarray(arr.clip(0, 255).astype(np.uint8), mode="L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # CMYK, YCbCr, P, L, 1, LAB...


def make_thumbnail(image: Image.Image, size: int = 256, quality: int = 85, *, comment: str = "") -> bytes:
    """A JPEG whose longer side is at most ``size`` px (``THUMBNAIL_MEDIA_TYPE``), tagged with ``comment``."""
    thumb = image.copy()
    thumb.thumbnail((size, size), Image.Resampling.BICUBIC)
    if thumb.mode != "RGB":
        thumb = _to_rgb(thumb)
    out = io.BytesIO()
    # The ingest pipeline passes the original's content hash: two originals that decode to the same
    # pixels (a re-saved PNG) then still get distinct thumbnail blobs, so a thumbnail is referenced
    # only by points of one content_hash and deletion can check references with one indexed count.
    extra = {"comment": comment.encode("utf-8")} if comment else {}
    thumb.save(out, format="JPEG", quality=quality, optimize=False, **extra)
    return out.getvalue()


def parse_data_url(url: str, *, max_bytes: int | None = None) -> tuple[str, bytes]:
    """Split a ``data:image/...;base64,...`` URL into (media type, bytes).

    Any other URL is refused: remote fetching is the server's job, behind its own switch.
    """
    url = url.strip()
    if not url.lower().startswith("data:"):
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme in ("http", "https"):
            raise InvalidInput("remote image URLs are disabled (the server's VLMRAG_REMOTE_IMAGES_ENABLED); "
                               "send the image inline as a data URL", param="image_url", code="remote_image_refused")
        raise InvalidInput("image_url must be a data:image/...;base64,... URL", param="image_url")
    match = _DATA_URL.match(url)
    if not match:
        raise InvalidInput("malformed data URL", param="image_url")
    mime = (match.group("mime") or "").lower()
    if not mime.startswith("image/"):
        raise UnsupportedMediaType(f"data URL media type {mime or 'missing'!r} is not an image",
                                   param="image_url")
    if not match.group("b64"):
        raise InvalidInput("data URL must be base64-encoded (';base64,')", param="image_url")
    payload = "".join(url[match.end():].split())  # tolerate line breaks in long data URLs
    if max_bytes is not None and len(payload) * 3 // 4 > max_bytes:
        # refuse before decoding: the decoded size is known from the text length
        raise PayloadTooLarge(f"image is about {len(payload) * 3 // 4} bytes, the limit is {max_bytes}",
                              param="image_url")
    try:
        data = base64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput(f"data URL is not valid base64: {exc}", param="image_url") from exc
    return mime, data
