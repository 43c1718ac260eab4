"""A corpus of bad and odd images, generated in memory, for decoder, ingestion and API tests.

``bad_image_corpus()`` returns ``{filename: (bytes, expected_status)}`` where the status is what
the API should answer for that upload under the default limits (10 MB, 40 Mpx): 200 decodes fine,
413 ``PayloadTooLarge``, 415 ``UnsupportedMediaType``, 422 ``UnprocessableInput``.
``STATUS_ERRORS`` maps a status to the ``retriever.errors`` class ``decode_image`` must raise.
"""

from __future__ import annotations

import functools
import io
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from retriever.errors import PayloadTooLarge, UnprocessableInput, UnsupportedMediaType
from tests.support.media import encode_image, noise_image

OK = 200
STATUS_ERRORS = {413: PayloadTooLarge, 415: UnsupportedMediaType, 422: UnprocessableInput}


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


@functools.lru_cache(maxsize=4)
def bomb_png(width: int = 20_000, height: int = 20_000) -> bytes:
    """A valid 1-bit grey PNG of ``width`` x ``height`` zero pixels: tens of KB on disk, built in <1 s."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte "none" + packed bits
    comp = zlib.compressobj(9)
    rows_per_block = max(1, (4 << 20) // len(row))
    parts = []
    remaining = height
    while remaining:
        n = min(rows_per_block, remaining)
        parts.append(comp.compress(row * n))
        remaining -= n
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", b"".join(parts))
            + _png_chunk(b"IEND", b""))


def exif_rotated_jpeg() -> bytes:
    """Stored 40x20 (left half red, right half blue) with EXIF orientation 6: displays 20x40, red on top."""
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode_image(img, "JPEG", exif=exif, quality=95)


def animated_gif() -> bytes:
    """Three 16x16 frames: red, green, blue; the first frame (red) is the one that counts."""
    frames = [Image.new("RGB", (16, 16), color) for color in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    return encode_image(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def png16() -> bytes:
    """A 16-bit greyscale PNG, every pixel 40000 (→ 156 after keeping the top 8 bits)."""
    arr = np.full((12, 10), 40000, dtype=np.uint16)
    return encode_image(Image.fromarray(arr), "PNG")  # uint16 → mode "I;16"


def bad_image_corpus() -> dict[str, tuple[bytes, int]]:
    """Every case: ``{filename: (bytes, expected_status)}`` (see module docstring)."""
    jpeg = encode_image(noise_image(64, 48, seed=1), "JPEG", quality=90)
    png = encode_image(noise_image(64, 48, seed=2), "PNG")
    zip_buf = io.BytesIO()
    with zipfile.ZipFile(zip_buf, "w") as zf:
        zf.writestr("payload.html", "<html><script>alert(1)</script></html>")
    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    return {
        # --- fine, if odd -----------------------------------------------------------------------
        "good.jpg": (jpeg, OK),
        "good.png": (png, OK),
        "good.webp": (encode_image(noise_image(32, 32, seed=3), "WEBP"), OK),
        "png_named.jpg": (png, OK),  # format comes from content, not the extension
        "cmyk.jpg": (encode_image(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG"), OK),
        "animated.gif": (animated_gif(), OK),
        "exif_rotated.jpg": (exif_rotated_jpeg(), OK),
        "grey16.png": (png16(), OK),
        "palette_transparent.png": (encode_image(palette, "PNG", transparency=0), OK),
        "grey_alpha.png": (encode_image(Image.new("LA", (8, 8), (10, 128)), "PNG"), OK),
        "polyglot_jpeg_zip.jpg": (jpeg + zip_buf.getvalue(), OK),  # a valid JPEG with a ZIP appended
        "gif_html_comment.gif": (encode_image(Image.new("RGB", (8, 8), (0, 0, 0)), "GIF",
                                              comment=b"<html><script>alert(1)</script></html>"), OK),
        # --- refused: too big -------------------------------------------------------------------
        "bomb_20000x20000.png": (bomb_png(20_000, 20_000), 413),
        "bomb_8000x8000.png": (bomb_png(8_000, 8_000), 413),  # under Pillow's own guard, over ours
        # --- refused: not a supported format ----------------------------------------------------
        "text_named.png": (b"hello, I am plain text pretending to be a PNG\n", 415),
        "html_named.gif": (b"<!doctype html><html><body>GIF89a</body></html>", 415),
        "image.tiff": (encode_image(noise_image(16, 16, seed=4), "TIFF"), 415),
        "image.bmp": (encode_image(noise_image(16, 16, seed=5), "BMP"), 415),
        # --- refused: corrupt -------------------------------------------------------------------
        "zero_bytes.jpg": (b"", 422),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], 422),
        "truncated.png": (png[: len(png) // 2], 422),
        "header_only.jpg": (jpeg[:4], 422),
        "png_magic_garbage.png": (b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, 422),
    }


def write_bad_images(folder: Path) -> dict[str, tuple[Path, int]]:
    """Write the corpus into ``folder``; returns ``{filename: (path, expected_status)}``."""
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, (data, status) in bad_image_corpus().items():
        path = folder / name
        path.write_bytes(data)
        written[name] = (path, status)
    return written
