"""The catalog of knowledge bases: one SQL table (``knowledge_bases``), shared by replicas.

SQLite under the data dir by default; PostgreSQL or another SQLAlchemy URL (``VLMRAG_DATABASE_URL``)
when several replicas share a Qdrant server. The ``default`` KB needs no row (one is made on first
update to hold its defaults).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import sqlalchemy as sa

from retriever.errors import NotFound, StoreUnavailable
from server.knowledge_bases.naming import DEFAULT_KB, NAME_RE, blob_namespace, collection_for
from server.settings import Settings
from server.sql import run_sql

_metadata = sa.MetaData()
_table = sa.Table(
    "knowledge_bases", _metadata,
    sa.Column("name", sa.String(48), primary_key=True),
    sa.Column("spec", sa.Text, nullable=False),  # JSON of KBSpec
    sa.Column("created_at", sa.Float, nullable=False),
)
#: the table itself, for the backup's dump and load (server/backup_tables.py)
CATALOG_TABLE = _table


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


def database_url(settings: Settings) -> str:
    """The configured database, or SQLite under the data dir."""
    return settings.database_url or settings.sqlite_url("vlmrag.sqlite3")


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


async def kb_defaults(settings: Settings) -> dict[str, Any]:
    """The retrieval defaults of the KB these settings are for (``settings_for_kb``); {} when it has none."""
    from server.knowledge_bases.naming import kb_of

    catalog = KBCatalog(database_url(settings))
    try:
        spec = await catalog.get(kb_of(settings))
    finally:
        catalog.close()
    return dict(spec.retrieval) if spec is not None else {}


class KBCatalog:
    """The ``knowledge_bases`` table; blocking calls run in a thread."""

    def __init__(self, url: str) -> None:
        self.engine = sa.create_engine(url, pool_pre_ping=True)
        try:
            _metadata.create_all(self.engine, tables=[_table])
        except sa.exc.SQLAlchemyError as exc:
            raise StoreUnavailable(f"the knowledge-base catalog at {self.engine.url!r} is unavailable: {exc}") from exc

    async def _run(self, fn: Callable[[], Any]) -> Any:
        return await run_sql(fn, what="the knowledge-base catalog",
                             on_duplicate="a knowledge base with that name exists already")

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
