"""Named knowledge bases: the catalog (SQL, shared by replicas) and the opened ``KnowledgeBase`` of each.

A knowledge base (KB) is the unit of separation between teams or customers: its own Qdrant collection
(``<collection>__kb_<name>``), its own blob namespace (``kbs/<name>/`` under the blob root or S3 prefix),
its own retrieval defaults (k, threshold, margin, min_k, pool, scorer, mode), an optional system-prompt
addition and a display name.

The ``default`` KB is today's single collection and blob root, so an existing data dir or collection
opens unchanged: it needs no catalog row (one is made on first use to hold its defaults). Other KBs are
rows of the ``knowledge_bases`` table in the database at ``VLMRAG_DATABASE_URL`` (SQLite under the data
dir by default; PostgreSQL or another SQLAlchemy URL when several replicas share a Qdrant server).

``KnowledgeBases`` opens each KB's store on first use (one CLIP model shared by all) and closes them on
shutdown; ``delete`` drops the KB's collection and blob namespace and removes its row.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import sqlalchemy as sa

from retriever.errors import Conflict, InvalidInput, NotFound, StoreUnavailable
from retriever.knowledge_base import KnowledgeBase
from retriever.store.edge import EdgeStore
from retriever.store.remote import RemoteStore
from server.auth import Principal
from server.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_KB = "default"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,47}$")
#: the retrieval options a KB may set defaults for (request > KB > settings)
KB_DEFAULT_FIELDS = ("k", "threshold", "margin", "min_k", "pool", "scorer", "mode")

_metadata = sa.MetaData()
_table = sa.Table(
    "knowledge_bases", _metadata,
    sa.Column("name", sa.String(48), primary_key=True),
    sa.Column("spec", sa.Text, nullable=False),  # JSON of KBSpec
    sa.Column("created_at", sa.Float, nullable=False),
)


@dataclass(slots=True)
class KBSpec:
    """What the catalog holds for one KB."""

    name: str
    display_name: str = ""
    description: str = ""
    system_prompt: str = ""  # appended to the system prompt as the operator's instructions
    retrieval: dict[str, Any] = field(default_factory=dict)  # defaults, keys from KB_DEFAULT_FIELDS
    created_at: float = 0.0

    def public(self) -> dict[str, Any]:
        return asdict(self)


def check_name(name: str) -> str:
    """A KB name: lower-case letters, digits, ``-``/``_``, at most 48 characters."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidInput(f"knowledge base name {name!r} must match {NAME_RE.pattern}", param="kb")
    return name


def database_url(settings: Settings) -> str:
    """The configured database, or SQLite under the data dir."""
    return settings.database_url or settings.sqlite_url("vlmrag.sqlite3")


def collection_for(settings: Settings, name: str) -> str:
    return settings.collection if name == DEFAULT_KB else f"{settings.collection}__kb_{name}"


def blob_namespace(name: str) -> str:
    return "" if name == DEFAULT_KB else f"kbs/{name}/"


def kb_of(settings: Settings) -> str:
    """The KB ``settings_for_kb`` made these settings for (its blob namespace names it), else the default."""
    return settings.blob_namespace.strip("/").rsplit("/", 1)[-1] if settings.blob_namespace else DEFAULT_KB


def settings_for_kb(settings: Settings, name: str) -> Settings:
    """Settings whose one collection and blob namespace are KB ``name``'s (the CLI's ``--kb``).

    ``NotFound`` for a KB the catalog does not hold.
    """
    if name == DEFAULT_KB:
        return settings
    catalog = KBCatalog(database_url(settings))
    try:
        if not NAME_RE.match(name) or asyncio.run(catalog.get(name)) is None:
            raise NotFound(f"no knowledge base {name!r} (vlmrag kb list)")
    finally:
        catalog.close()
    return settings.model_copy(update={"collection": collection_for(settings, name),
                                       "blob_namespace": blob_namespace(name)})


class KBCatalog:
    """The ``knowledge_bases`` table; blocking calls run in a thread."""

    def __init__(self, url: str) -> None:
        self.engine = sa.create_engine(url, pool_pre_ping=True)
        try:
            _metadata.create_all(self.engine, tables=[_table])
        except sa.exc.SQLAlchemyError as exc:
            raise StoreUnavailable(f"the knowledge-base catalog at {self.engine.url!r} is unavailable: {exc}") from exc

    async def _run(self, fn: Callable[[], Any]) -> Any:
        try:
            return await asyncio.to_thread(fn)
        except sa.exc.IntegrityError as exc:
            raise Conflict("a knowledge base with that name exists already") from exc
        except sa.exc.SQLAlchemyError as exc:
            raise StoreUnavailable(f"the knowledge-base catalog is unavailable: {exc}") from exc

    @staticmethod
    def _spec(row: Any) -> KBSpec:
        data = json.loads(row.spec)
        return KBSpec(**{k: v for k, v in data.items() if k in KBSpec.__dataclass_fields__})

    async def list(self) -> list[KBSpec]:
        def read() -> list[KBSpec]:
            with self.engine.connect() as conn:
                return [self._spec(r) for r in conn.execute(sa.select(_table).order_by(_table.c.name))]
        return await self._run(read)

    async def get(self, name: str) -> KBSpec | None:
        def read() -> KBSpec | None:
            with self.engine.connect() as conn:
                row = conn.execute(sa.select(_table).where(_table.c.name == name)).first()
                return self._spec(row) if row else None
        return await self._run(read)

    async def insert(self, spec: KBSpec) -> None:
        def write() -> None:
            with self.engine.begin() as conn:
                conn.execute(_table.insert().values(name=spec.name, spec=json.dumps(spec.public()),
                                                    created_at=spec.created_at))
        await self._run(write)

    async def replace(self, spec: KBSpec) -> None:
        def write() -> None:
            with self.engine.begin() as conn:
                conn.execute(_table.update().where(_table.c.name == spec.name).values(spec=json.dumps(spec.public())))
        await self._run(write)

    async def remove(self, name: str) -> None:
        def write() -> None:
            with self.engine.begin() as conn:
                conn.execute(_table.delete().where(_table.c.name == name))
        await self._run(write)

    def close(self) -> None:
        self.engine.dispose()


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


def kb_from_model(model: str | None, alias: str) -> str | None:
    """``"vlmrag/pumps"`` → ``"pumps"`` (the KB an unchanged OpenAI client picks by model name); else None."""
    if model and model.startswith(alias + "/"):
        return model[len(alias) + 1:] or None
    return None


def choose_kb(principal: Principal | None, requested: str | None = None, *, model: str | None = None,
              alias: str = "vlmrag") -> str:
    """The KB a request runs against: asked for by name or model id, else the caller's first bound KB.

    A KB the caller is not bound to is ``NotFound``, exactly like one that does not exist: a key never
    learns that another tenant's KB (or snippet) exists.
    """
    by_model = kb_from_model(model, alias)
    if requested and by_model and requested != by_model:
        raise InvalidInput(f"model {model!r} names knowledge base {by_model!r} but kb is {requested!r}",
                           param="kb")
    name = requested or by_model
    bound = principal.kbs if principal is not None else None
    if name is None:
        name = DEFAULT_KB if bound is None or DEFAULT_KB in bound else bound[0]
    if principal is None or not principal.may_use(name):
        raise NotFound(f"no knowledge base {name!r}")
    return name


def check_defaults(values: dict[str, Any]) -> dict[str, Any]:
    """A KB's retrieval defaults, checked with the request model's own rules."""
    from pydantic import ValidationError

    from server.api_models import RetrievalKnobs

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
    store = kb.store
    if isinstance(store, RemoteStore):
        await store.client.delete_collection(store.collection)
        await kb.close()
    elif isinstance(store, EdgeStore):
        await kb.close()
        await asyncio.to_thread(shutil.rmtree, store.shard_dir, True)
    else:  # another adapter: delete every point, keep the empty collection
        ids = [p.id async for p in _all_points(kb)]
        if ids:
            await store.delete(ids)
        await kb.close()


async def _all_points(kb: KnowledgeBase):  # type: ignore[no-untyped-def]
    offset: str | None = None
    while True:
        page, offset = await kb.store.scroll(1000, offset)
        for point in page:
            yield point
        if offset is None or not page:
            return


def drop_blobs(kb: KnowledgeBase) -> None:
    """Remove the KB's blob namespace (nothing outside it references its blobs)."""
    delete_all = getattr(kb.blobs, "delete_all", None)
    if delete_all is not None:
        delete_all()
