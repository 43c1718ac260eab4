"""Ingestion: readers (folder, JSONL, COCO, PDF) → ``IngestPipeline`` (decode, embed, blobs, upsert)."""

from __future__ import annotations

from retriever.ingest.pipeline import IngestFailure, IngestPipeline, IngestReport, point_id_for
from retriever.ingest.readers import (
    IngestItem,
    read_coco,
    read_folder,
    read_jsonl,
    read_paths,
    read_pdf,
    split_passages,
)

__all__ = [
    "IngestFailure", "IngestItem", "IngestPipeline", "IngestReport", "point_id_for", "read_coco",
    "read_folder", "read_jsonl", "read_paths", "read_pdf", "split_passages",
]
