"""Plain data carried between retriever stages: what is ingested, what a search returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

SnippetKind = Literal["image", "text", "image_text", "page"]
VectorName = Literal["image", "text"]


@dataclass(slots=True)
class SnippetPayload:
    """What Qdrant stores beside the vectors of one snippet."""

    kind: SnippetKind
    text: str = ""
    source: str = ""
    tags: list[str] = field(default_factory=list)
    content_hash: str = ""
    image_ref: str | None = None  # blob key of the original image (thumbnail: ``thumb_ref``)
    thumb_ref: str | None = None
    page: int | None = None
    created_at: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    ocr_text: str = ""  # text read from the image (OCR at ingestion); feeds BM25 and both prompts
    ocr_lines: list[dict[str, Any]] = field(default_factory=list)  # [{"text", "score", "box": 4 [x, y]}]

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "kind": self.kind, "text": self.text, "source": self.source, "tags": list(self.tags),
            "content_hash": self.content_hash, "image_ref": self.image_ref, "thumb_ref": self.thumb_ref,
            "page": self.page, "created_at": self.created_at, "extra": dict(self.extra),
        }
        if self.ocr_text or self.ocr_lines:  # absent, not empty, on snippets without: payloads stay as before
            data["ocr_text"], data["ocr_lines"] = self.ocr_text, list(self.ocr_lines)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SnippetPayload:
        return cls(
            kind=data.get("kind", "text"), text=data.get("text", "") or "", source=data.get("source", "") or "",
            tags=list(data.get("tags") or []), content_hash=data.get("content_hash", "") or "",
            image_ref=data.get("image_ref"), thumb_ref=data.get("thumb_ref"), page=data.get("page"),
            created_at=data.get("created_at", "") or "", extra=dict(data.get("extra") or {}),
            ocr_text=data.get("ocr_text", "") or "", ocr_lines=list(data.get("ocr_lines") or []),
        )


#: A dense vector's value: one vector, or the rows of a multi-vector (``passage`` with sections).
VectorValue = list[float] | list[list[float]]


@dataclass(frozen=True, slots=True)
class PassageSpec:
    """The text embedder that fills a collection's ``passage`` vector: its dimension and identity.

    ``sections``: the vector is a multi-vector, one row per section of the text (``retriever/sections.py``,
    scored by the best row, Qdrant's ``max_sim``); False: one vector per text (collections made before).
    The layout is the collection's, not the embedder's: the same embedder fills either.
    """

    dim: int
    embedder_id: str
    sections: bool = False

    def same_embedder(self, other: PassageSpec | None) -> bool:
        """Whether ``other`` holds vectors of the same text embedder (whatever the layout)."""
        return other is not None and (self.dim, self.embedder_id) == (other.dim, other.embedder_id)


@dataclass(slots=True)
class SparseVector:
    """A sparse vector (BM25 ``lexical``): token ids and their weights, same length."""

    indices: list[int]
    values: list[float]

    def __len__(self) -> int:
        return len(self.indices)


@dataclass(slots=True)
class PointRecord:
    """One point to upsert: id, the dense vectors it has (``image`` and/or ``text``), payload.

    ``lexical`` is the BM25 document vector of its text (``retriever.lexical.document_vector``);
    None or empty: the point is not searchable lexically.
    """

    id: str
    vectors: dict[str, VectorValue]
    payload: SnippetPayload
    lexical: SparseVector | None = None


@dataclass(slots=True)
class StoredPoint:
    """A point read back from the store (no score)."""

    id: str
    payload: SnippetPayload


@dataclass(slots=True)
class ScoredPoint:
    """One hit of a single-vector search."""

    id: str
    score: float
    payload: SnippetPayload


@dataclass(slots=True)
class SearchFilters:
    """Metadata filters; every set field must match (tags: any of them)."""

    source: str | None = None
    tags: list[str] | None = None
    kind: list[str] | None = None
    content_hash: str | None = None  # exact; e.g. "does another snippet still use this blob?"

    def is_empty(self) -> bool:
        return not (self.source or self.tags or self.kind or self.content_hash)


@dataclass(slots=True)
class Candidate:
    """A fused retrieval candidate, later scored for relevancy and selected (or dropped)."""

    id: str
    payload: SnippetPayload
    clip_score: float  # fused score used for CLIP ordering
    vector_scores: dict[str, float] = field(default_factory=dict)  # e.g. {"text->image": 0.31}
    rank: int = 0
    relevancy: float | None = None
    kept: bool = False
    reason: str | None = None
