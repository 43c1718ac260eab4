"""The knowledge bases this service has opened: ``KnowledgeBases``, over the catalog.

A knowledge base (KB) is the unit of separation between teams or customers: its own Qdrant collection
(``<collection>__kb_<name>``), its own blob namespace (``kbs/<name>/`` under the blob root or S3 prefix),
its own retrieval defaults (validated by the plan's own model), an optional system-prompt addition
and a display name. ``KnowledgeBases`` opens each KB's store on first use (one CLIP model shared by
all) and closes them on shutdown; ``delete`` drops the KB's collection and blob namespace and removes
its row.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from retriever.errors import Conflict, InvalidInput, NotFound
from retriever.knowledge_base import KnowledgeBase
from server.api_models import RetrievalKnobs
from server.knowledge_bases.catalog import KBCatalog, KBSpec
from server.knowledge_bases.naming import DEFAULT_KB, NAME_RE, blob_namespace, check_name, collection_for
from server.settings import Settings

log = logging.getLogger(__name__)
#: the retrieval options a KB may set defaults for (request > KB > settings): the shared request knobs
KB_DEFAULT_FIELDS: tuple[str, ...] = tuple(RetrievalKnobs.model_fields)


OpenKB = Callable[[str, str], Awaitable[KnowledgeBase]]  # (collection, blob namespace) -> an opened KB


class KnowledgeBases:
    """Every KB of this service: the catalog plus the opened ``KnowledgeBase`` of each, on first use."""

    def __init__(self, settings: Settings, catalog: KBCatalog, open_kb: OpenKB,
                 default: KnowledgeBase | None = None) -> None:
        self.settings = settings
        self.catalog = catalog
        self._open_kb = open_kb
        self._opened: dict[str, KnowledgeBase] = {DEFAULT_KB: default} if default is not None else {}
        self._owned: set[str] = set()  # opened here (closed here); a given default belongs to the caller
        self._lock = asyncio.Lock()

    async def spec(self, name: str) -> KBSpec:
        """The KB's spec; ``NotFound`` for an unknown name (the same answer a key not bound to it gets)."""
        if name == DEFAULT_KB:
            return await self.catalog.get(DEFAULT_KB) or KBSpec(DEFAULT_KB, display_name="Default")
        if not NAME_RE.match(name or ""):
            raise NotFound(f"no knowledge base {name!r}")
        found = await self.catalog.get(name)
        if found is None:
            raise NotFound(f"no knowledge base {name!r}")
        return found

    async def names(self) -> list[str]:
        return sorted({DEFAULT_KB, *(s.name for s in await self.catalog.list())})

    async def specs(self) -> list[KBSpec]:
        return [await self.spec(n) for n in await self.names()]

    async def get(self, name: str) -> KnowledgeBase:
        """The opened KB ``name`` (opened now if it was not); ``NotFound`` if there is no such KB."""
        opened = self._opened.get(name)
        if opened is not None:
            return opened
        await self.spec(name)
        async with self._lock:
            if name not in self._opened:
                self._opened[name] = await self._open_kb(collection_for(self.settings, name), blob_namespace(name))
                self._owned.add(name)
            return self._opened[name]

    async def create(self, spec: KBSpec) -> KBSpec:
        check_name(spec.name)
        if spec.name == DEFAULT_KB:
            raise Conflict("the default knowledge base always exists; update it instead")
        if len(await self.names()) >= self.settings.limit_knowledge_bases:
            raise InvalidInput(f"this service holds {self.settings.limit_knowledge_bases} knowledge bases, its limit "
                               "(VLMRAG_LIMIT_KNOWLEDGE_BASES)", param="name", code="limit_exceeded")
        spec.retrieval = check_defaults(spec.retrieval)
        spec.created_at = spec.created_at or time.time()
        await self.catalog.insert(spec)
        try:
            await self.get(spec.name)  # creates the collection now: a broken store fails the create, not a chat
        except BaseException:
            await self.catalog.remove(spec.name)
            raise
        log.info("knowledge base %s created (collection %s)", spec.name, collection_for(self.settings, spec.name))
        return spec

    async def update(self, name: str, changes: dict[str, Any]) -> KBSpec:
        spec = await self.spec(name)
        for key, value in changes.items():
            if key == "retrieval":
                value = check_defaults(value or {})
            if key in ("display_name", "description", "system_prompt", "retrieval"):
                setattr(spec, key, value)
        if await self.catalog.get(name) is None:  # the default KB gets its row on first update
            spec.created_at = spec.created_at or time.time()
            await self.catalog.insert(spec)
        else:
            await self.catalog.replace(spec)
        return spec

    async def delete(self, name: str) -> dict[str, Any]:
        """Drop the KB's points (its collection) and blobs (its namespace), then its catalog row."""
        if name == DEFAULT_KB:
            raise Conflict("the default knowledge base cannot be deleted; delete its snippets instead")
        await self.spec(name)
        kb = await self.get(name)
        count = await kb.count()
        async with self._lock:
            self._opened.pop(name, None)
            self._owned.discard(name)
            await drop_collection(kb)
            await asyncio.to_thread(drop_blobs, kb)
        await self.catalog.remove(name)
        log.warning("knowledge base %s deleted: %d snippets and their blobs removed", name, count)
        return {"name": name, "deleted": True, "snippets": count}

    async def close(self) -> None:
        for name in list(self._owned):
            kb = self._opened.pop(name, None)
            if kb is not None:
                await kb.close()
        self._owned.clear()
        self.catalog.close()


def check_defaults(values: dict[str, Any]) -> dict[str, Any]:
    """A KB's retrieval defaults, checked with the request model's own rules."""
    from pydantic import ValidationError

    unknown = set(values) - set(KB_DEFAULT_FIELDS)
    if unknown:
        raise InvalidInput(f"retrieval defaults may set {', '.join(KB_DEFAULT_FIELDS)}; not {sorted(unknown)}",
                           param="retrieval")
    try:
        checked = RetrievalKnobs.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise InvalidInput(f"retrieval.{'.'.join(map(str, first['loc']))}: {first['msg']}", param="retrieval") from exc
    return checked.model_dump(exclude_none=True)


async def drop_collection(kb: KnowledgeBase) -> None:
    """Remove the KB's collection from its store and close the store."""
    await kb.store.drop()


def drop_blobs(kb: KnowledgeBase) -> None:
    """Remove the KB's blob namespace (nothing outside it references its blobs)."""
    kb.blobs.delete_all()
