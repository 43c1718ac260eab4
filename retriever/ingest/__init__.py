"""Ingestion: readers (folder, JSONL, COCO, PDF) → ``IngestPipeline`` (decode, embed, blobs, upsert).

``rules.py`` holds what every path shares: item checks, identity (deterministic ids), decoding caps.
"""

from __future__ import annotations

from retriever.ingest.pipeline import IngestFailure, IngestPipeline, IngestReport
from retriever.ingest.readers import (
    IngestItem,
    read_coco,
    read_file,
    read_folder,
    read_jsonl,
    read_paths,
    read_pdf,
    split_passages,
)
from retriever.ingest.rules import IngestRules, point_id_for

__all__ = [
    "IngestFailure", "IngestItem", "IngestPipeline", "IngestReport", "IngestRules", "point_id_for", "read_coco",
    "read_file", "read_folder", "read_jsonl", "read_paths", "read_pdf", "split_passages",
]
