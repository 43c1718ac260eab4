"""Zero-downtime re-index: a new CLIP model means a new vector space, so build a new collection
from the stored snippets (text from payloads, images from the blob store) while the old one
serves, then switch atomically. The old version stays until it is dropped explicitly.

Versions are named ``<collection>__v2``, ``__v3``...; a collection created before any re-index is
version 1 under its plain name.

* **Qdrant server / qdrant-client** (``AliasVersions``): the configured collection name is an
  *alias* pointing at a version, switched with one ``update_collection_aliases`` call (delete +
  create in one atomic request). A plain collection under the configured name (before the first
  re-index) cannot coexist with an alias of the same name, so the first switch clones it to
  ``__v1`` (vectors copied, nothing re-embedded), deletes it and creates the alias at once: one
  round trip without the name, once in the collection's life.
* **Qdrant Edge** (``EdgeVersions``): Edge has no aliases. Each version is its own shard directory;
  ``<collection>__current`` is a symlink to the served one, swapped with ``os.replace`` (atomic on
  POSIX). ``EdgeStore`` resolves the pointer when it opens (``store.edge.resolve_shard_dir``). An
  embedded store belongs to one process, so the switch happens in the process that holds it: the
  CLI when no server runs, or a server calling ``reindex`` with its open store and then swapping
  in ``result.store`` (load new, close old).

Writes that reach the old version during the build are copied by a catch-up pass before the
switch; processes still running the old model must be restarted with the new CLIP settings (or
first rolled onto the versioned name, see deploy/README.md).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from retriever.blobs import BlobStore
from retriever.embedder import ClipEmbedder
from retriever.errors import Conflict, InvalidInput, NotFound, VlmragError
from retriever.ingest.rules import IngestRules, has_text, passage_text
from retriever.lexical import snippet_lexical
from retriever.store.base import PASSAGE_VECTOR, VERSION_SEP, VectorStore, version_name, version_number
from retriever.store.edge import _SHARD_MARKER, CURRENT_POINTER_SUFFIX, EdgeStore, point_current_at
from retriever.store.remote import META_DIM, META_EMBEDDER, META_PASSAGE_EMBEDDER, RemoteStore
from retriever.types import PassageSpec, PointRecord, StoredPoint, VectorValue

if TYPE_CHECKING:
    from retriever.text_embedder import TextEmbedder

log = logging.getLogger(__name__)

ProgressFn = Callable[[str, int, int | None], None]  # (phase, done, total)


class Versions(Protocol):
    """Where the versions of one collection live and which one is served."""

    collection: str
    description: str

    async def current(self) -> str | None: ...
    async def versions(self) -> list[str]: ...
    async def open(self, name: str) -> VectorStore: ...
    async def switch(self, name: str) -> None: ...
    async def drop(self, name: str) -> None: ...
    async def release(self, store: VectorStore) -> None:
        """Close a store from ``open`` that is no longer needed."""


# --- Qdrant Edge: a symlink pointer ------------------------------------------------------------
class EdgeVersions:
    """Versions as sibling shard directories under ``path``; the served one named by a symlink."""

    def __init__(self, path: Path, collection: str) -> None:
        self.path = Path(path)
        self.collection = collection
        self.pointer = self.path / f"{collection}{CURRENT_POINTER_SUFFIX}"
        self.description = f"qdrant-edge:{self.path}/{collection}"

    async def current(self) -> str | None:
        if self.pointer.is_symlink():
            return Path(os.readlink(self.pointer)).name
        return self.collection if (self.path / self.collection / _SHARD_MARKER).is_file() else None

    async def versions(self) -> list[str]:
        if not self.path.is_dir():
            return []
        names = [p.name for p in self.path.iterdir()
                 if p.is_dir() and not p.is_symlink() and version_number(self.collection, p.name) is not None]
        return sorted(names, key=lambda n: version_number(self.collection, n) or 0)

    async def open(self, name: str) -> VectorStore:
        store = EdgeStore(self.path, name)
        await store.open()
        return store

    async def release(self, store: VectorStore) -> None:
        await store.close()

    async def switch(self, name: str) -> None:
        if not (self.path / name / _SHARD_MARKER).is_file():
            raise NotFound(f"no shard {self.path / name} to switch to")
        point_current_at(self.path, self.collection, name)

    async def drop(self, name: str) -> None:
        if name == await self.current():
            raise Conflict(f"{name} is the served version; switch away from it first")
        shutil.rmtree(self.path / name)


# --- Qdrant server: a collection alias ----------------------------------------------------------
class AliasVersions:
    """Versions as collections ``<name>__vN`` on one Qdrant; the configured name is an alias."""

    def __init__(self, client: Any, collection: str, *, url: str = "", **store_kwargs: Any) -> None:
        self.client = client
        self.collection = collection
        self.url = url
        self.description = f"qdrant:{url or 'qdrant-client'}/{collection}"
        self._store_kwargs = store_kwargs
        self._stores: dict[str, RemoteStore] = {}

    async def _aliases(self) -> dict[str, str]:
        response = await self.client.get_aliases()
        return {a.alias_name: a.collection_name for a in response.aliases}

    async def current(self) -> str | None:
        target = (await self._aliases()).get(self.collection)
        if target:
            return target
        return self.collection if await self.client.collection_exists(self.collection) else None

    async def versions(self) -> list[str]:
        response = await self.client.get_collections()
        names = [c.name for c in response.collections if version_number(self.collection, c.name) is not None]
        return sorted(names, key=lambda n: version_number(self.collection, n) or 0)

    async def open(self, name: str) -> VectorStore:
        # Version stores share the caller's client; closing them would close it, so they are not.
        if name not in self._stores:
            store = RemoteStore(self.client, name, url=self.url, **self._store_kwargs)
            await store.open()
            self._stores[name] = store
        return self._stores[name]

    async def release(self, store: VectorStore) -> None:
        """Nothing to do: version stores share the client, which its owner closes."""

    async def switch(self, name: str) -> None:
        from qdrant_client import models

        if not await self.client.collection_exists(name):
            raise NotFound(f"no collection {name!r} to switch to")
        aliases = await self._aliases()
        ops: list[Any] = []
        if self.collection in aliases:
            ops.append(models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=self.collection)))
        elif await self.client.collection_exists(self.collection):
            await self._retire_plain_collection()
        ops.append(models.CreateAliasOperation(
            create_alias=models.CreateAlias(collection_name=name, alias_name=self.collection)))
        await self.client.update_collection_aliases(change_aliases_operations=ops)

    async def _retire_plain_collection(self) -> None:
        """Clone the pre-alias collection to ``__v1`` (vectors as stored) and delete the plain name."""
        from qdrant_client import models

        legacy = self.collection
        clone = f"{legacy}{VERSION_SEP}1"
        info = await self.client.get_collection(legacy)
        metadata = getattr(info.config, "metadata", None) or {}
        identity, dim = metadata.get(META_EMBEDDER), metadata.get(META_DIM)
        if identity is None or not dim:
            raise Conflict(f"collection {legacy!r} has no vlmrag embedder metadata; cannot retire it safely")
        vectors = info.config.params.vectors
        passage_params = vectors.get(PASSAGE_VECTOR) if isinstance(vectors, dict) else None
        passage = PassageSpec(int(passage_params.size), str(metadata.get(META_PASSAGE_EMBEDDER) or "unknown"),
                              passage_params.multivector_config is not None) if passage_params is not None else None
        target = await self.open(clone)
        await target.ensure_collection(int(dim), identity, passage)
        offset: Any = None
        while True:
            records, offset = await self.client.scroll(legacy, limit=256, offset=offset, with_payload=True,
                                                       with_vectors=True)
            if records:
                await self.client.upsert(clone, wait=True, points=[
                    models.PointStruct(id=r.id, vector=r.vector, payload=r.payload) for r in records])
            if offset is None:
                break
        if (await self.client.count(clone, exact=True)).count != (await self.client.count(legacy, exact=True)).count:
            raise Conflict(f"cloning {legacy!r} to {clone!r} lost points; nothing was switched")
        self._stores.pop(legacy, None)
        log.warning("retiring plain collection %r (kept as %r) so that %r can become an alias",
                    legacy, clone, legacy)
        await self.client.delete_collection(legacy)

    async def drop(self, name: str) -> None:
        if name == await self.current() or name == self.collection:
            raise Conflict(f"{name} is the served version; switch away from it first")
        self._stores.pop(name, None)
        await self.client.delete_collection(name)


# --- the copy ------------------------------------------------------------------------------------
@dataclass(slots=True)
class ReindexResult:
    """What a re-index did; ``store`` is the new version, open (the caller closes or serves it)."""

    old: str | None
    new: str
    embedder: str
    copied: int = 0
    resumed: int = 0  # already present in the new version (an interrupted run, resumed)
    caught_up: int = 0
    removed: int = 0
    text_only: list[str] = field(default_factory=list)  # image unreadable: kept with its text vector
    skipped: list[str] = field(default_factory=list)  # "id: reason"
    switched: bool = False
    dropped: list[str] = field(default_factory=list)
    seconds: float = 0.0
    store: VectorStore | None = None

    def summary(self) -> dict[str, Any]:
        return {
            "old": self.old, "new": self.new, "embedder": self.embedder, "copied": self.copied,
            "resumed": self.resumed, "caught_up": self.caught_up, "removed": self.removed,
            "text_only": self.text_only, "skipped": self.skipped, "switched": self.switched,
            "dropped": self.dropped, "seconds": round(self.seconds, 3),
        }


class _PointRebuilder:
    """Turns stored snippets back into points with vectors of the new model (blocking; run in a thread).

    Stored images are decoded under the ingestion rules (``retriever/ingest/rules.py``); an image
    that no longer decodes leaves its snippet with its text vector only, or skips it without text.
    """

    def __init__(self, embedder: ClipEmbedder, blobs: BlobStore, rules: IngestRules,
                 text_embedder: TextEmbedder | None = None, passage_ocr: bool = False) -> None:
        self.embedder, self.blobs, self.rules = embedder, blobs, rules
        self.text_embedder, self.passage_ocr = text_embedder, passage_ocr
        self.skipped_ids: set[str] = set()  # reported once, not retried by the catch-up pass

    def rebuild(self, page: list[StoredPoint], result: ReindexResult) -> list[PointRecord]:
        images, image_ids, texts, text_ids = [], [], [], []
        for point in page:
            payload = point.payload
            if payload.image_ref:
                try:
                    data = self.blobs.get(payload.image_ref)
                    images.append(self.rules.decode(data, payload.image_ref).image)
                    image_ids.append(point.id)
                except VlmragError as exc:
                    if not has_text(payload.text):
                        result.skipped.append(f"{point.id}: image {payload.image_ref}: {exc.message}")
                        self.skipped_ids.add(point.id)
                        continue
                    result.text_only.append(f"{point.id}: image {payload.image_ref}: {exc.message}")
            if has_text(payload.text):
                texts.append(payload.text)
                text_ids.append(point.id)
        vectors: dict[str, dict[str, VectorValue]] = {}
        if images:
            for pid, vec in zip(image_ids, self.embedder.embed_images(images)):
                vectors.setdefault(pid, {})["image"] = vec.tolist()
        if texts:
            for pid, vec in zip(text_ids, self.embedder.embed_texts(texts)):
                vectors.setdefault(pid, {})["text"] = vec.tolist()
        if self.text_embedder is not None:  # the `passage` vector, from the stored text and OCR text
            kept = [p for p in page if p.id in vectors]
            passages = self.text_embedder.embed_for(  # the target was made with this spec (its layout)
                self.text_embedder.spec,
                [passage_text(p.payload.text, p.payload.ocr_text, self.passage_ocr, p.payload.kind) for p in kept])
            for p, vec in zip(kept, passages):
                if vec is not None:
                    vectors[p.id]["passage"] = vec
        # BM25 vectors are not copied over: recomputed from the stored text and OCR text, which is how a
        # collection made before `lexical` gets it (Edge cannot add a vector to an existing shard)
        return [PointRecord(p.id, vectors[p.id], p.payload, snippet_lexical(p.payload))
                for p in page if p.id in vectors]


async def _copy(
    source: VectorStore, target: VectorStore, rebuilder: _PointRebuilder, result: ReindexResult, batch_size: int,
    progress: ProgressFn | None, phase: str,
) -> int:
    """Embed and upsert every source point the target lacks; returns how many were written."""
    total = await source.count()
    written = done = 0
    offset: str | None = None
    while True:
        page, offset = await source.scroll(limit=batch_size, offset=offset)
        present = await target.existing_ids([p.id for p in page]) if page else set()
        todo = [p for p in page if p.id not in present and p.id not in rebuilder.skipped_ids]
        if phase == "copy":
            result.resumed += len(page) - len(todo)
        if todo:
            points = await asyncio.to_thread(rebuilder.rebuild, todo, result)
            await target.upsert(points)
            written += len(points)
        done += len(page)
        if progress:
            progress(phase, done, total)
        if offset is None:
            return written


async def _remove_deleted(source: VectorStore, target: VectorStore, batch_size: int) -> int:
    """Delete from the target what was deleted from the source during the build."""
    removed = 0
    offset: str | None = None
    while True:
        page, offset = await target.scroll(limit=batch_size, offset=offset)
        ids = [p.id for p in page]
        gone = set(ids) - (await source.existing_ids(ids) if ids else set())
        if gone:
            removed += await target.delete(sorted(gone))
        if offset is None:
            return removed


async def reindex(
    versions: Versions, embedder: ClipEmbedder, blobs: BlobStore, *, source: VectorStore | None = None,
    switch: bool = True, drop_old: bool = False, batch_size: int = 64, max_image_bytes: int = 50 << 20,
    max_image_pixels: int = 40_000_000, progress: ProgressFn | None = None, same_model: bool = False,
    text_embedder: TextEmbedder | None = None, passage_ocr: bool = False,
) -> ReindexResult:
    """Build the next version with ``embedder`` from the served one, catch up, switch, drop old.

    ``source``: the open store of the served version when the caller already holds it (a server
    holding an embedded store); otherwise it is opened here and closed before returning. An
    interrupted run is resumed: a newer version built for the same embedder is completed, not
    rebuilt. ``same_model``: rebuild with the served model when the served version lacks the BM25
    ``lexical`` vector (``vlmrag backfill-lexical``) or the ``passage`` vector of ``text_embedder``
    (``vlmrag backfill-passage``). With ``text_embedder`` the new version has ``passage`` vectors.
    """
    started = time.perf_counter()
    if batch_size < 1:
        raise InvalidInput("batch size must be at least 1")
    old = await versions.current()
    if old is None:
        raise NotFound(f"nothing to re-index: {versions.description} does not exist; ingest first")
    existing = await versions.versions()
    old_number = version_number(versions.collection, old) or 1
    numbers = [version_number(versions.collection, n) or 0 for n in existing]
    newest = max(numbers + [old_number])
    own_source = source is None
    source = source if source is not None else await versions.open(old)
    passage = text_embedder.spec if text_embedder is not None else None
    lacks = (not await source.has_lexical()) or (passage is not None and await source.passage_spec() != passage)
    if await source.embedder_id() == embedder.identity and not (same_model and lacks):
        if own_source:
            await versions.release(source)
        raise Conflict(f"{old} already uses {embedder.identity}; nothing to re-index")
    new = version_name(versions.collection, newest)
    if newest == old_number:
        new = version_name(versions.collection, newest + 1)
    target = await versions.open(new)
    try:
        await target.ensure_collection(embedder.dim, embedder.identity, passage)
        if passage is not None and await target.passage_spec() != passage:
            raise Conflict(f"{new} was started without the passage vector")
    except Conflict:  # an abandoned build for another model: start the next number
        await versions.release(target)
        new = version_name(versions.collection, newest + 1)
        target = await versions.open(new)
        await target.ensure_collection(embedder.dim, embedder.identity, passage)
    result = ReindexResult(old=old, new=new, embedder=embedder.identity)
    rebuilder = _PointRebuilder(embedder, blobs, IngestRules(max_image_bytes=max_image_bytes,
                                                             max_image_pixels=max_image_pixels),
                                text_embedder, passage_ocr)
    try:
        log.info("re-indexing %s -> %s with %s", old, new, embedder.identity)
        result.copied = await _copy(source, target, rebuilder, result, batch_size, progress, "copy")
        # What was written to / deleted from the old version while the copy ran.
        result.caught_up = await _copy(source, target, rebuilder, result, batch_size, progress, "catch-up")
        result.removed = await _remove_deleted(source, target, batch_size)
        if switch:
            # load new (open above), switch, close old: readers never see a missing version
            await versions.switch(new)
            result.switched = True
            log.info("switched %s to %s", versions.description, new)
    except BaseException:
        await versions.release(target)
        raise
    finally:
        if own_source:
            await versions.release(source)
    if drop_old and result.switched:
        result.dropped = await drop_old_versions(versions)
    result.store = target
    result.seconds = time.perf_counter() - started
    return result


async def drop_old_versions(versions: Versions) -> list[str]:
    """Delete every version except the served one; returns the names dropped."""
    current = await versions.current()
    dropped = []
    for name in await versions.versions():
        if name != current:
            await versions.drop(name)
            dropped.append(name)
    return dropped


__all__ = [
    "AliasVersions", "EdgeVersions", "ReindexResult", "Versions", "drop_old_versions", "reindex",
    "version_name", "version_number",
]
