"""Build the knowledge base and its parts from the one ``Settings``; the server lifespan and the CLI call it.

Order matters: the store is opened first (cheap, and a locked embedded store fails at once, before
a model is loaded for nothing), then the CLIP model is loaded, then the collection is checked
against the embedder identity (``Conflict`` on a mismatch).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING

from retriever.blobs import BlobStore, LocalBlobStore
from retriever.embed_cache import EmbedCache
from retriever.embedder import ClipEmbedder, load_embedder
from retriever.errors import ConfigurationError
from retriever.ingest.pipeline import IngestPipeline
from retriever.knowledge_base import KnowledgeBase
from retriever.search import Retriever
from retriever.store import open_store
from retriever.store.base import VectorStore
from server.settings import Settings

if TYPE_CHECKING:
    from PIL import Image

    from retriever.ocr import OcrEngine
    from retriever.search import OcrFn
    from retriever.text_embedder import TextEmbedder


def build_blob_store(settings: Settings, namespace: str = "") -> BlobStore:
    """The configured blob backend, ``local`` (under ``data_dir/blobs``) or ``s3``; ``namespace`` is a KB's folder."""
    namespace = namespace or settings.blob_namespace
    if settings.blob_backend == "local":
        return LocalBlobStore(settings.blob_dir / namespace if namespace else settings.blob_dir)
    if settings.blob_backend == "s3":
        from retriever.blobs_s3 import S3BlobStore  # boto3 is imported only when S3 is configured

        return S3BlobStore(settings.blob_s3_bucket, settings.blob_s3_prefix.rstrip("/") + "/" + namespace
                           if namespace else settings.blob_s3_prefix,
                           endpoint_url=settings.blob_s3_endpoint_url or None)
    raise ConfigurationError(
        f"blob backend {settings.blob_backend!r} is not available in this build; set VLMRAG_BLOB_BACKEND=local",
        param="blob_backend",
    )


def onnx_cache_dir(settings: Settings) -> Path:
    """Where ONNX exports of CLIP models are kept (one folder per embedder identity)."""
    return settings.data_dir / "onnx"


def build_embed_cache(settings: Settings) -> EmbedCache | None:
    """The query-embedding LRU of the ``embed_cache_*`` settings; None when either bound is 0."""
    if settings.embed_cache_entries <= 0 or settings.embed_cache_bytes <= 0:
        return None
    return EmbedCache(settings.embed_cache_entries, settings.embed_cache_bytes)


def build_embedder(settings: Settings) -> ClipEmbedder:
    """Load the CLIP model named by the ``clip_*`` settings, on the configured backend (blocking; seconds)."""
    return load_embedder(
        settings.clip_model, settings.clip_pretrained, settings.clip_device, settings.clip_threads,
        settings.clip_batch_size, backend=settings.clip_backend, onnx_cache_dir=onnx_cache_dir(settings),
        cache=build_embed_cache(settings), onnx_spinning=settings.clip_onnx_spinning,
    )


async def open_configured_store(settings: Settings, collection: str | None = None) -> VectorStore:
    """Open the embedded Edge store under ``data_dir`` or the Qdrant server at ``qdrant_url``."""
    store = await open_store(
        qdrant_url=settings.qdrant_url, api_key=settings.qdrant_api_key,
        path=Path(settings.embedded_store_path), collection=collection or settings.collection,
        shard_number=settings.qdrant_shard_number, replication_factor=settings.qdrant_replication_factor,
        write_consistency_factor=settings.qdrant_write_consistency_factor,
        read_consistency=settings.qdrant_read_consistency, timeout_s=settings.qdrant_timeout_s,
    )
    store.hnsw_ef = settings.hnsw_ef or None  # Edge, once HNSW is built; 0 (None): by the shard's size
    return store


def build_text_embedder(settings: Settings, cache: EmbedCache | None = None) -> TextEmbedder | None:
    """The sentence embedder of the ``passage`` vector (``VLMRAG_TEXT_EMBEDDER``); None when 'none' (blocking)."""
    from retriever.text_embedder import load_text_embedder

    return load_text_embedder(
        settings.text_embedder, backend=settings.clip_backend if settings.clip_device in ("auto", "cpu") else "torch",
        threads=settings.clip_threads, onnx_cache_dir=onnx_cache_dir(settings), cache=cache,
        spinning=settings.clip_onnx_spinning, sections=settings.text_embedder_sections,
    )


def build_pipeline(
    settings: Settings, embedder: ClipEmbedder, store: VectorStore, blobs: BlobStore,
    batch_size: int | None = None, id_namespace: str = "", ocr: OcrEngine | None = None,
    text_embedder: TextEmbedder | None = None,
) -> IngestPipeline:
    """The ingestion pipeline with the settings' batch size and image limits."""
    return IngestPipeline(
        embedder, store, blobs, batch_size=batch_size or settings.clip_batch_size,
        text_embedder=text_embedder, passage_ocr=settings.text_embedder_ocr,
        max_image_bytes=settings.limit_image_bytes, max_image_pixels=settings.limit_image_pixels,
        id_namespace=id_namespace or settings.blob_namespace,
        ocr=(lambda image, page=False: ocr.read(image, timeout_s=settings.ocr_timeout_s, page=page))
        if ocr is not None else None,
    )


def build_ocr_engine(settings: Settings) -> OcrEngine:
    """The OCR reader (rapidocr, models inside its wheel; loaded on first use), with its query-photo cache."""
    from retriever.ocr import OcrEngine
    from retriever.ocr_cache import OcrCache

    cache = OcrCache(settings.ocr_cache_entries, settings.ocr_cache_bytes) \
        if settings.ocr_cache_entries > 0 and settings.ocr_cache_bytes > 0 else None
    return OcrEngine(detect_side=settings.ocr_detect_side, coarse_side=min(settings.ocr_coarse_side,
                     settings.ocr_detect_side), timeout_s=settings.ocr_timeout_s, max_boxes=settings.ocr_max_boxes,
                     threads=settings.ocr_threads, cache=cache)


def build_query_ocr(settings: Settings, engine: OcrEngine | None) -> OcrFn | None:
    """The reader of the caller's images, bounded by ``ocr_query_timeout_s``; None when turned off."""
    if engine is None or not settings.ocr_query_enabled:
        return None

    def read_text(image: Image.Image) -> str:
        # cached: the same photo across a conversation's turns and retries is read once
        return engine.read(image, timeout_s=settings.ocr_query_timeout_s, cached=True).text

    return read_text


async def build_knowledge_base(
    settings: Settings, *, embedder: ClipEmbedder | None = None, batch_size: int | None = None,
    load_model: bool = True, collection: str | None = None, blob_namespace: str = "",
    ocr: OcrEngine | None = None, text_embedder: TextEmbedder | None = None,
) -> KnowledgeBase:
    """Store, embedder (unless given), blobs, retriever and pipeline, ready to use; close() it after.

    The text embedder is loaded with CLIP when ``embedder`` is not given; a caller that shares its
    CLIP model across knowledge bases passes its ``text_embedder`` too (None: no ``passage`` vector).

    ``load_model=False`` opens a read/delete-only knowledge base (stats, get, delete, image bytes)
    without loading CLIP and without creating the collection.
    """
    collection = collection or settings.collection
    store = await open_configured_store(settings, collection)
    if not load_model and embedder is None:
        try:
            blobs = build_blob_store(settings, blob_namespace)
        except BaseException:
            await store.close()
            raise
        return KnowledgeBase(None, store, blobs, collection=collection)
    try:
        if embedder is None:
            embedder = await asyncio.to_thread(build_embedder, settings)
            text_embedder = await asyncio.to_thread(build_text_embedder, settings, embedder.cache)
        await store.ensure_collection(embedder.dim, embedder.identity,
                                      text_embedder.spec if text_embedder is not None else None)
        blobs = build_blob_store(settings, blob_namespace)
    except BaseException:
        await store.close()
        raise
    return KnowledgeBase(
        embedder, store, blobs,
        retriever=Retriever(embedder, store, rrf_k=settings.retrieval_rrf_k, text_embedder=text_embedder),
        pipeline=build_pipeline(settings, embedder, store, blobs, batch_size, blob_namespace,
                                ocr if ocr is not None or not settings.ocr_enabled else build_ocr_engine(settings),
                                text_embedder=text_embedder),
        collection=collection, text_embedder=text_embedder,
    )
