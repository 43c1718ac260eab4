"""Readers turn inputs (folder, JSONL manifest, COCO captions, PDF) into ``IngestItem``s.

Readers never raise for one bad input: they yield an item with ``error`` set, which the pipeline
reports (file and reason) and skips. Images are not read here: an item carries the image path (or a
loader for a rendered PDF page), so listing a large folder is cheap and decoding happens in the
pipeline's worker threads.

``source`` conventions (what ``--source`` filters and ``vlmrag delete --source`` match):
files found under a folder ``ROOT`` are ``<ROOT name>/<relative path>``; a single file is its name;
JSONL lines use their ``"source"`` field, else the image path relative to the manifest (or
``<manifest name>#L<n>`` for text-only lines); COCO images use their ``file_name``; PDF pages use the
file name with the page number in ``page`` (1-based). A sidecar JSON may set ``"source"``.
"""

from __future__ import annotations

import io
import json
import logging
import re
import threading
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

from retriever.errors import InvalidInput, PayloadTooLarge, UnprocessableInput, VlmragError
from retriever.images import parse_data_url
from retriever.types import SnippetKind

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".webp", ".gif"})
# Recognised as images only to report them as unsupported (415) instead of silently ignoring them.
REFUSED_IMAGE_SUFFIXES = frozenset({".bmp", ".tif", ".tiff", ".heic", ".heif", ".avif", ".ico", ".svg"})
TEXT_SUFFIXES = frozenset({".txt", ".md", ".markdown", ".rst"})
SIDECAR_SUFFIXES = (".json", ".txt", ".md")  # first found wins
PASSAGE_CHARS = 1000
PDF_RENDER_LONG_SIDE = 1024
# PDFium is not thread-safe, not even across documents: every call into it takes this lock
# (a lock, not a client: it guards the process-wide native library).
_PDFIUM_LOCK = threading.RLock()
_HEADING = re.compile(r"^#{1,6}[ \t]+\S", re.MULTILINE)  # Markdown ATX headings


@dataclass(slots=True)
class IngestItem:
    """One snippet to ingest: an image (path, bytes or loader), text, or both, with metadata."""

    source: str
    key: str  # stable, human-readable identity of the input (file, line, page) for reports
    text: str = ""
    image_path: Path | None = None
    image_bytes: bytes | None = None
    image_loader: Callable[[], bytes] | None = None  # e.g. renders a PDF page on demand
    image_name: str | None = None  # for error messages and media-type hints
    tags: list[str] = field(default_factory=list)
    page: int | None = None
    kind: SnippetKind | None = None  # None: derived from what is present
    extra: dict[str, Any] = field(default_factory=dict)
    error: str | None = None  # set by a reader: the item is reported as failed and skipped

    @property
    def has_image(self) -> bool:
        return self.image_path is not None or self.image_bytes is not None or self.image_loader is not None

    def read_image(self, max_bytes: int) -> bytes:
        """The image bytes (file, loader or inline); ``PayloadTooLarge``/``UnprocessableInput`` on failure."""
        name = self.image_name or self.source
        if self.image_bytes is not None:
            return self.image_bytes
        if self.image_loader is not None:
            try:
                return self.image_loader()
            except VlmragError:
                raise
            except Exception as exc:  # a PDF page pdfium cannot render, a loader's I/O error
                raise UnprocessableInput(f"{name}: cannot render/load image: {exc}") from exc
        if self.image_path is None:
            raise InvalidInput(f"{name}: no image")
        try:
            size = self.image_path.stat().st_size
            if size > max_bytes:  # refuse before reading a huge file into memory
                raise PayloadTooLarge(f"{name}: image is {size} bytes, the limit is {max_bytes}")
            return self.image_path.read_bytes()
        except OSError as exc:
            raise UnprocessableInput(f"{name}: cannot read file: {exc.strerror or exc}") from exc


def failed_item(source: str, reason: str, key: str | None = None) -> IngestItem:
    """An item that only reports a reader-level failure."""
    return IngestItem(source=source, key=key or source, error=reason)


# --- text ----------------------------------------------------------------------------------------


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    if b"\x00" in data[:8192]:
        raise InvalidInput(f"{path.name} looks binary, not text")
    return data.decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n")


def split_passages(text: str, max_chars: int = PASSAGE_CHARS) -> list[str]:
    """Split text into passages: a new one at every Markdown heading, and before ``max_chars``.

    Paragraphs are packed together up to ``max_chars``; a longer paragraph is cut at whitespace
    (never mid-word unless a single word is longer than ``max_chars``). Each section's heading is
    repeated at the top of its continuation passages so every passage keeps its context.
    """
    sections: list[tuple[str, str]] = []  # (heading line, body)
    starts = [m.start() for m in _HEADING.finditer(text)]
    bounds = [0, *starts, len(text)]
    for begin, end in pairwise(bounds):
        block = text[begin:end].strip("\n")
        if not block.strip():
            continue
        first, _, rest = block.partition("\n")
        if begin in starts:
            sections.append((first.strip(), rest))
        else:
            sections.append(("", block))
    passages: list[str] = []
    for heading, body in sections:
        budget = max(max_chars - len(heading) - 1, max_chars // 2) if heading else max_chars
        chunks = _pack(body, budget)
        if not chunks:  # a heading with no body says nothing on its own
            continue
        passages.extend(f"{heading}\n{chunk}" if heading else chunk for chunk in chunks)
    return [p.strip() for p in passages if p.strip()]


def _pack(body: str, limit: int) -> list[str]:
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", body) if p.strip()]
    chunks: list[str] = []
    current = ""
    for para in paragraphs:
        for piece in _cut(para, limit):
            if current and len(current) + 2 + len(piece) > limit:
                chunks.append(current)
                current = piece
            else:
                current = f"{current}\n\n{piece}" if current else piece
    if current:
        chunks.append(current)
    return chunks


def _cut(paragraph: str, limit: int) -> list[str]:
    pieces = []
    while len(paragraph) > limit:
        cut = paragraph.rfind(" ", 0, limit + 1)
        cut = max(cut, paragraph.rfind("\n", 0, limit + 1))
        if cut <= 0:  # one enormous "word" (a URL, base64...): cut hard
            cut = limit
        pieces.append(paragraph[:cut].rstrip())
        paragraph = paragraph[cut:].lstrip()
    if paragraph:
        pieces.append(paragraph)
    return pieces


def read_text_file(path: Path, source: str, tags: Iterable[str] = ()) -> Iterator[IngestItem]:
    """A text/Markdown file as passages (kind ``text``)."""
    try:
        text = _read_text(path)
    except (OSError, InvalidInput) as exc:
        yield failed_item(source, _reason(exc))
        return
    for index, passage in enumerate(split_passages(text)):
        yield IngestItem(source=source, key=f"{source}#passage={index}", text=passage, tags=list(tags),
                         extra={"passage": index})


# --- images + sidecars ---------------------------------------------------------------------------


def _sidecar(image: Path) -> Path | None:
    for suffix in SIDECAR_SUFFIXES:
        candidate = image.with_suffix(suffix)
        if candidate.is_file():
            return candidate
    return None


def image_item(path: Path, source: str) -> IngestItem:
    """An image file with its sidecar caption (``.json`` / ``.txt`` / ``.md`` of the same stem)."""
    item = IngestItem(source=source, key=source, image_path=path, image_name=path.name)
    sidecar = _sidecar(path)
    if sidecar is None:
        return item
    try:
        if sidecar.suffix == ".json":
            meta = json.loads(sidecar.read_text(encoding="utf-8"))
            if not isinstance(meta, dict):
                raise InvalidInput("sidecar JSON must be an object")
            _apply_meta(item, meta)
        else:
            item.text = _read_text(sidecar).strip()
    except (OSError, ValueError, InvalidInput) as exc:
        item.error = f"sidecar {sidecar.name}: {_reason(exc)}"
    return item


def _apply_meta(item: IngestItem, meta: dict[str, Any]) -> None:
    """Copy caption/text, tags, source, page from a metadata object; the rest goes to ``extra``."""
    text = meta.get("caption", meta.get("text"))
    if text is not None:
        if not isinstance(text, str):
            raise InvalidInput("'caption'/'text' must be a string")
        item.text = text.strip()
    tags = meta.get("tags")
    if tags is not None:
        if isinstance(tags, str):
            tags = [t.strip() for t in tags.split(",")]
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise InvalidInput("'tags' must be a list of strings")
        item.tags = [t for t in tags if t]
    if meta.get("source"):
        item.source = str(meta["source"])
    if meta.get("page") is not None:
        try:
            item.page = int(meta["page"])
        except (TypeError, ValueError) as exc:
            raise InvalidInput("'page' must be an integer") from exc
    reserved = {"caption", "text", "tags", "source", "page", "image"}
    item.extra.update({k: v for k, v in meta.items() if k not in reserved})


# --- folder --------------------------------------------------------------------------------------


def read_folder(root: Path) -> Iterator[IngestItem]:
    """Every image (with sidecar), text/Markdown file, PDF and JSONL manifest under ``root``."""
    root = Path(root)
    base = root.resolve().name or "root"
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        suffix = path.suffix.lower()
        if suffix not in READERS:
            log.debug("ingest: skipping %s (unknown file type)", path)
        elif not (suffix in _SIDECAR_CANDIDATES and _is_sidecar(path)):
            yield from read_file(path, f"{base}/{rel.as_posix()}")


def _is_sidecar(path: Path) -> bool:
    return any(path.with_suffix(s).is_file() or path.with_suffix(s.upper()).is_file()
               for s in (*IMAGE_SUFFIXES, *REFUSED_IMAGE_SUFFIXES))


# --- JSONL ---------------------------------------------------------------------------------------


def read_jsonl(path: Path) -> Iterator[IngestItem]:
    """One snippet per line: ``{"image": path relative to the manifest or data URL, "text", "source",
    "tags", "page", ...}``; every other key lands in ``extra``. A bad line is a failed item."""
    path = Path(path)
    try:
        handle = path.open("r", encoding="utf-8", errors="replace")
    except OSError as exc:
        yield failed_item(path.name, _reason(exc))
        return
    with handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            key = f"{path.name}#L{lineno}"
            try:
                yield _jsonl_item(path, line, key)
            except (ValueError, InvalidInput) as exc:
                yield failed_item(key, f"line {lineno}: {_reason(exc)}", key=key)


def _jsonl_item(manifest: Path, line: str, key: str) -> IngestItem:
    record = json.loads(line)
    if not isinstance(record, dict):
        raise InvalidInput("each line must be a JSON object")
    item = IngestItem(source=key, key=key)
    image = record.get("image")
    if image is not None:
        if not isinstance(image, str) or not image:
            raise InvalidInput("'image' must be a non-empty string")
        if image.startswith("data:"):
            _, item.image_bytes = parse_data_url(image)
            item.image_name = key
        else:
            image_path = (manifest.parent / image)
            if not image_path.is_file():
                raise InvalidInput(f"image {image!r} not found next to the manifest")
            item.image_path, item.image_name = image_path, image
            item.source = Path(image).as_posix()
    _apply_meta(item, record)
    if image is None and not item.text:
        raise InvalidInput("a line needs 'image' or 'text'")
    return item


# --- COCO captions -------------------------------------------------------------------------------


def is_coco_captions(data: object) -> bool:
    """Whether a parsed JSON looks like a COCO captions file."""
    return (isinstance(data, dict) and isinstance(data.get("images"), list)
            and isinstance(data.get("annotations"), list))


def read_coco(annotations_json: Path, images_dir: Path | None = None) -> Iterator[IngestItem]:
    """COCO captions: one snippet per image, text = its FIRST caption (annotation order), all captions
    in ``extra["captions"]`` and the image id in ``extra["coco_image_id"]`` (evaluation ground truth).
    ``images_dir`` defaults to a folder found next to the JSON (see ``find_coco_images_dir``)."""
    annotations_json = Path(annotations_json)
    try:
        data = json.loads(annotations_json.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        yield failed_item(annotations_json.name, _reason(exc))
        return
    if not is_coco_captions(data):
        yield failed_item(annotations_json.name, "not a COCO captions file (needs 'images' and 'annotations')")
        return
    folder = Path(images_dir) if images_dir else find_coco_images_dir(annotations_json, data)
    captions: dict[Any, list[str]] = {}
    for ann in data["annotations"]:
        if isinstance(ann, dict) and isinstance(ann.get("caption"), str):
            captions.setdefault(ann.get("image_id"), []).append(ann["caption"].strip())
    for image in data["images"]:
        if not isinstance(image, dict) or "file_name" not in image:
            yield failed_item(annotations_json.name, f"image entry without file_name: {str(image)[:80]}")
            continue
        name = str(image["file_name"])
        key = f"coco:{image.get('id')}"
        path = folder / name
        if not path.is_file():
            yield failed_item(name, f"image file not found in {folder}", key=key)
            continue
        caps = captions.get(image.get("id"), [])
        yield IngestItem(source=name, key=key, text=caps[0] if caps else "", image_path=path, image_name=name,
                         extra={"captions": caps, "coco_image_id": image.get("id")})


def find_coco_images_dir(annotations_json: Path, data: dict[str, Any] | None = None) -> Path:
    """Guess the image folder: ``captions_val2017.json`` → ``val2017/`` beside it or one level up,
    else the JSON's own folder."""
    stem = annotations_json.stem
    split = stem.split("_", 1)[1] if "_" in stem else stem
    for parent in (annotations_json.parent, annotations_json.parent.parent):
        for name in (split, "images", stem):
            if (parent / name).is_dir():
                return parent / name
    return annotations_json.parent


def _read_json(path: Path, source: str) -> Iterator[IngestItem]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        yield failed_item(source, _reason(exc))
        return
    if is_coco_captions(data):
        yield from read_coco(path)
    else:
        yield failed_item(source, "unrecognised JSON (expected COCO captions or an image sidecar)")


# --- PDF -----------------------------------------------------------------------------------------


def read_pdf(path: Path, *, source: str | None = None) -> Iterator[IngestItem]:
    """Each page → kind ``page``: text extracted now, image rendered (long side ≤ 1024 px, JPEG) when
    the pipeline asks for it. An unreadable page is a failed item; the other pages continue."""
    import pypdfium2 as pdfium

    path = Path(path)
    source = source or path.name
    try:
        with _PDFIUM_LOCK:
            document = pdfium.PdfDocument(path)
            pages = len(document)
    except (pdfium.PdfiumError, OSError, ValueError) as exc:
        yield failed_item(source, f"unreadable PDF: {_reason(exc)}")
        return
    for index in range(pages):
        number = index + 1
        key = f"{source}#page={number}"
        try:
            with _PDFIUM_LOCK:
                page = document[index]
                textpage = page.get_textpage()
                text = textpage.get_text_bounded()
                textpage.close()
                page.close()
        except (pdfium.PdfiumError, OSError, ValueError) as exc:
            yield failed_item(source, f"page {number}: unreadable ({_reason(exc)})", key=key)
            continue
        text = re.sub(r"[ \t]+", " ", text.replace("\r\n", "\n").replace("\r", "\n")).strip()
        yield IngestItem(
            source=source, key=key, text=text, image_loader=_PageRenderer(document, index),
            image_name=f"{path.name} page {number}", page=number, kind="page",
        )


class _PageRenderer:
    """Renders one PDF page to JPEG bytes on demand (the document stays open while items live)."""

    def __init__(self, document: Any, index: int) -> None:
        self._document = document
        self._index = index

    def __call__(self) -> bytes:
        with _PDFIUM_LOCK:
            page = self._document[self._index]
            try:
                width, height = page.get_size()
                scale = PDF_RENDER_LONG_SIDE / max(width, height, 1.0)
                image = page.render(scale=scale).to_pil()
            finally:
                page.close()
        out = io.BytesIO()
        image.convert("RGB").save(out, format="JPEG", quality=90)
        return out.getvalue()


# --- dispatch ------------------------------------------------------------------------------------

Reader = Callable[[Path, str], Iterator[IngestItem]]  # (file, its source) -> its items


def _read_image(path: Path, source: str) -> Iterator[IngestItem]:
    yield image_item(path, source)  # refused formats get the pipeline's 415 reason


def _read_pdf(path: Path, source: str) -> Iterator[IngestItem]:
    return read_pdf(path, source=source)


def _read_manifest(path: Path, source: str) -> Iterator[IngestItem]:
    return read_jsonl(path)  # each line names its own source


# Suffix -> reader: the one table every path dispatches by (`vlmrag ingest` through read_paths and
# read_folder, POST /v1/ingest/files through read_file). A new reader is one line here.
READERS: dict[str, Reader] = {
    **dict.fromkeys(IMAGE_SUFFIXES | REFUSED_IMAGE_SUFFIXES, _read_image),
    **dict.fromkeys(TEXT_SUFFIXES, read_text_file),
    ".pdf": _read_pdf,
    ".json": _read_json,  # COCO captions (a sidecar is read with its image)
    ".jsonl": _read_manifest,
}
# Files that stand on their own. A manifest (JSONL, COCO JSON) names image files beside it: an upload
# has none, and must not reach the server's own files through one.
STANDALONE_SUFFIXES = frozenset(IMAGE_SUFFIXES | REFUSED_IMAGE_SUFFIXES | TEXT_SUFFIXES | {".pdf"})
_SIDECAR_CANDIDATES = frozenset({*TEXT_SUFFIXES, ".json"})  # skipped in a folder when an image has their stem


def read_file(
    path: Path, source: str, *, accept: Collection[str] = READERS.keys(), hint: str = "",
) -> Iterator[IngestItem]:
    """One file's items, by its suffix; one failed item (``unsupported file type``, then ``hint``) when no
    reader in ``accept`` takes it."""
    suffix = path.suffix.lower()
    reader = READERS.get(suffix) if suffix in accept else None
    if reader is None:
        yield failed_item(source, f"unsupported file type {suffix or '(none)'!r}" + (f": {hint}" if hint else ""))
        return
    yield from reader(path, source)


def read_paths(paths: Iterable[str | Path], *, coco_images_dir: Path | None = None) -> Iterator[IngestItem]:
    """Each path: a folder (``read_folder``), else one file by ``read_file`` (COCO with ``coco_images_dir``)."""
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            yield from read_folder(path)
        elif not path.exists():
            yield failed_item(str(raw), "no such file or directory")
        elif coco_images_dir is not None and path.suffix.lower() == ".json":
            yield from read_coco(path, coco_images_dir)
        else:
            yield from read_file(path, path.name or str(path))


def _reason(exc: BaseException) -> str:
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    return message
