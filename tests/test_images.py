"""decode_image / make_thumbnail / parse_data_url: every bad image maps to exactly the right error."""

from __future__ import annotations

import base64
import io

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, PngImagePlugin

from retriever.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType, VlmragError
from retriever.images import decode_image, make_thumbnail, parse_data_url
from tests.support.bad_images import OK, STATUS_ERRORS, bad_image_corpus, bomb_png
from tests.support.media import jpeg_bytes, noise_image

LIMITS = {"max_bytes": 10 * 1024 * 1024, "max_pixels": 40_000_000}
CORPUS = bad_image_corpus()


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_corpus_outcome(name: str) -> None:
    data, status = CORPUS[name]
    if status == OK:
        decoded = decode_image(data, filename=name, **LIMITS)
        assert decoded.image.mode == "RGB"
        assert decoded.image.size == (decoded.width, decoded.height)
        assert decoded.format in ("JPEG", "PNG", "WEBP", "GIF")
        return
    with pytest.raises(VlmragError) as info:
        decode_image(data, filename=name, **LIMITS)
    assert type(info.value) is STATUS_ERRORS[status], info.value
    assert info.value.status_code == status
    assert name in info.value.message  # the reason names the file


def test_exif_orientation_is_applied() -> None:
    decoded = decode_image(CORPUS["exif_rotated.jpg"][0], **LIMITS)
    assert decoded.image.size == (20, 40)  # stored 40x20, orientation 6 = rotate 90° clockwise
    top, bottom = decoded.image.getpixel((10, 5)), decoded.image.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60  # the stored left (red) half ends up on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_odd_modes_become_sensible_rgb() -> None:
    assert decode_image(CORPUS["animated.gif"][0], **LIMITS).image.getpixel((8, 8)) == (255, 0, 0)
    cmyk = decode_image(CORPUS["cmyk.jpg"][0], **LIMITS).image.getpixel((16, 16))
    assert cmyk[0] > 200 and cmyk[1] < 60 and cmyk[2] < 60
    assert decode_image(CORPUS["grey16.png"][0], **LIMITS).image.getpixel((0, 0)) == (156, 156, 156)
    # transparent palette pixels are composited on white, not black
    assert decode_image(CORPUS["palette_transparent.png"][0], **LIMITS).image.getpixel((0, 0)) == (255, 255, 255)
    assert decode_image(CORPUS["png_named.jpg"][0], **LIMITS).format == "PNG"


def test_sha256_and_media_type() -> None:
    import hashlib

    data = CORPUS["good.webp"][0]
    decoded = decode_image(data, **LIMITS)
    assert decoded.sha256 == hashlib.sha256(data).hexdigest()
    assert (decoded.media_type, decoded.suffix) == ("image/webp", ".webp")


def test_byte_limit() -> None:
    data = CORPUS["good.jpg"][0]
    with pytest.raises(PayloadTooLarge, match="bytes"):
        decode_image(data, max_bytes=len(data) - 1, max_pixels=10**8)
    assert decode_image(data, max_bytes=len(data), max_pixels=10**8).width == 64


def test_pixel_limit_below_pillows_own() -> None:
    with pytest.raises(PayloadTooLarge, match="64x48"):
        decode_image(CORPUS["good.png"][0], max_bytes=10**7, max_pixels=64 * 48 - 1)


@pytest.mark.parametrize("size", [(20_000, 20_000), (8_000, 8_000)])
def test_bomb_is_refused_before_any_pixel_is_decoded(size: tuple[int, int], monkeypatch) -> None:
    def explode(self: object) -> None:
        raise AssertionError("a bomb must never be decoded")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", explode)
    with pytest.raises(PayloadTooLarge):
        decode_image(bomb_png(*size), **LIMITS)


def test_pillow_global_limit_is_not_mutated() -> None:
    before = Image.MAX_IMAGE_PIXELS
    for data, _ in CORPUS.values():
        try:
            decode_image(data, **LIMITS)
        except VlmragError:
            pass
    assert Image.MAX_IMAGE_PIXELS == before


def test_draft_decodes_big_jpeg_smaller() -> None:
    big = jpeg_bytes(noise_image(2048, 1536, seed=7), quality=80)
    assert decode_image(big, **LIMITS).image.size == (2048, 1536)
    small = decode_image(big, draft_size=256, **LIMITS).image
    assert small.mode == "RGB" and 256 <= min(small.size) < 1536


def test_thumbnail() -> None:
    image = decode_image(CORPUS["exif_rotated.jpg"][0], **LIMITS).image.resize((600, 1200))
    thumb = Image.open(io.BytesIO(make_thumbnail(image, size=256)))
    assert thumb.format == "JPEG" and thumb.size == (128, 256)


# --- data URLs -------------------------------------------------------------------------------------


def test_data_url_roundtrip() -> None:
    data = CORPUS["good.png"][0]
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    assert parse_data_url(url) == ("image/png", data)
    wrapped = "data:image/png;base64," + "\n".join(base64.encodebytes(data).decode().split())
    assert parse_data_url(wrapped)[1] == data


@pytest.mark.parametrize(
    ("url", "error", "match"),
    [
        ("https://example.com/cat.jpg", InvalidInput, "remote image URLs are disabled"),
        ("http://10.0.0.1/x.png", InvalidInput, "remote image URLs are disabled"),
        ("file:///etc/passwd", InvalidInput, "data:image"),
        ("data:image/png;base64,@@@not-base64@@@", InvalidInput, "base64"),
        ("data:text/html;base64,PGgxPg==", UnsupportedMediaType, "not an image"),
        ("data:image/svg+xml,<svg/>", InvalidInput, "base64"),
        ("data:image/png;base64", InvalidInput, "malformed"),
    ],
)
def test_data_url_refusals(url: str, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match) as info:
        parse_data_url(url)
    assert type(info.value) is error


def test_data_url_size_checked_before_decoding() -> None:
    url = "data:image/png;base64," + "A" * 4000
    with pytest.raises(PayloadTooLarge):
        parse_data_url(url, max_bytes=1000)


# --- fuzz: nothing but our own errors, ever ---------------------------------------------------------

_SEEDS = [CORPUS[name][0] for name in ("good.jpg", "good.png", "good.webp", "animated.gif")]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.sampled_from(_SEEDS), cut=st.integers(0, 4000), flips=st.lists(st.tuples(
    st.integers(0, 4000), st.integers(1, 255)), max_size=8))
def test_mangled_images_raise_only_our_errors(seed: bytes, cut: int, flips: list[tuple[int, int]]) -> None:
    data = bytearray(seed[: max(cut, 1)])
    for position, xor in flips:
        if position < len(data):
            data[position] ^= xor
    try:
        decoded = decode_image(bytes(data), **LIMITS)
    except VlmragError as exc:
        assert isinstance(exc, InvalidInput)
    else:
        assert decoded.image.mode == "RGB"


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_raise_only_our_errors(data: bytes) -> None:
    try:
        decode_image(data, **LIMITS)
    except InvalidInput:
        pass
