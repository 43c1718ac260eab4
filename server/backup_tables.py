"""The SQL part of a backup: the KB catalog and the answer/feedback log, as rows in ``db/<table>.jsonl``.

Consistent reads while the server writes: a SQLite database is first copied with SQLite's online
backup API (``sqlite3.Connection.backup``: a consistent copy page by page, writers barely held up)
and its rows read from the copy; any other database (PostgreSQL) is read in one ``REPEATABLE READ``
read-only transaction, one snapshot for all its tables. Rows are kept as JSON (the columns are text,
numbers and nulls), so an archive from SQLite restores into PostgreSQL and back: the migration path
of the shared state. A backup of some KBs keeps only their rows.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from retriever.backup import ArchiveReader, ArchiveWriter
from retriever.errors import StoreUnavailable
from server.feedback import AnswerLog, answers, feedback, feedback_database_url
from server.knowledge_bases.catalog import CATALOG_TABLE, KBCatalog, database_url
from server.settings import Settings

#: table -> its column naming the KB (the catalog's is its primary key)
KB_COLUMN = {"knowledge_bases": "name", "answers": "kb", "feedback": "kb"}
TABLES: dict[str, sa.Table] = {"knowledge_bases": CATALOG_TABLE, "answers": answers, "feedback": feedback}


def member(table: str) -> str:
    return f"db/{table}.jsonl"


@dataclass(slots=True)
class DatabaseUrls:
    catalog: str
    log: str

    @classmethod
    def from_settings(cls, settings: Settings) -> DatabaseUrls:
        return cls(database_url(settings), feedback_database_url(settings))

    def by_url(self) -> dict[str, list[str]]:
        """Each database and the tables it holds (catalog and log may share one)."""
        groups: dict[str, list[str]] = {}
        groups.setdefault(self.catalog, []).append("knowledge_bases")
        groups.setdefault(self.log, []).extend(["answers", "feedback"])
        return groups


def _ensure_tables(urls: DatabaseUrls) -> None:
    """Create the tables where missing (a fresh data dir), the way the server does at startup."""
    KBCatalog(urls.catalog).close()
    AnswerLog(urls.log).close()


@contextlib.contextmanager
def _snapshot(url: str) -> Iterator[sa.Connection]:
    """A connection that sees one moment of database ``url`` (see the module doc)."""
    engine = sa.create_engine(url)
    copy: Path | None = None
    try:
        if engine.dialect.name == "sqlite" and engine.url.database not in (None, "", ":memory:"):
            engine.dispose()
            fd, name = tempfile.mkstemp(prefix="vlmrag-backup-", suffix=".sqlite3")
            os.close(fd)
            copy = Path(name)
            with contextlib.closing(sqlite3.connect(str(engine.url.database))) as source, \
                    contextlib.closing(sqlite3.connect(name)) as dest:
                source.backup(dest)  # the online backup API: a consistent copy while the server writes
            engine = sa.create_engine(f"sqlite:///{name}")
            with engine.connect() as conn:
                yield conn
        else:
            with engine.connect().execution_options(isolation_level="REPEATABLE READ") as conn, conn.begin():
                if engine.dialect.name == "postgresql":
                    conn.execute(sa.text("SET TRANSACTION READ ONLY"))
                yield conn
    finally:
        engine.dispose()
        if copy is not None:
            copy.unlink(missing_ok=True)


def _jsonable(row: Any) -> dict[str, Any]:
    return dict(row._mapping)


def dump_tables(settings: Settings, writer: ArchiveWriter, kbs: list[str] | None) -> dict[str, int]:
    """Write the rows of the catalog and the answer log (of ``kbs`` only, when given); returns rows per table."""
    urls = DatabaseUrls.from_settings(settings)
    counts: dict[str, int] = {}
    try:
        _ensure_tables(urls)
        for url, tables in urls.by_url().items():
            with _snapshot(url) as conn:
                for name in tables:
                    table = TABLES[name]
                    query = sa.select(table).order_by(*table.primary_key.columns)
                    if kbs is not None:
                        query = query.where(table.c[KB_COLUMN[name]].in_(kbs))
                    rows = [json.dumps(_jsonable(r), ensure_ascii=False, sort_keys=True) for r in conn.execute(query)]
                    writer.add_bytes(member(name), ("\n".join(rows) + "\n" if rows else "").encode("utf-8"))
                    counts[name] = len(rows)
    except (sa.exc.SQLAlchemyError, sqlite3.Error) as exc:
        raise StoreUnavailable(f"backing up the catalog and answer log failed: {exc}") from exc
    return counts


def archived_rows(reader: ArchiveReader, table: str) -> list[dict[str, Any]]:
    if member(table) not in reader.members:
        return []
    text = reader.read(member(table)).decode("utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def load_tables(settings: Settings, reader: ArchiveReader, renames: dict[str, str], *, replace: bool) -> dict[str, int]:
    """Write the archived rows of the KBs in ``renames`` (archived name -> restored name); rows per table.

    One transaction per database. The catalog row of a KB is replaced; answers and ratings already
    present (the same completion id) are kept, unless ``replace``, which first removes the restored
    KBs' rows.
    """
    urls = DatabaseUrls.from_settings(settings)
    counts: dict[str, int] = {}
    try:
        _ensure_tables(urls)
        for url, tables in urls.by_url().items():
            engine = sa.create_engine(url)
            try:
                with engine.begin() as conn:
                    if replace and "answers" in tables:  # feedback first: it references answers
                        conn.execute(feedback.delete().where(feedback.c.kb.in_(list(renames.values()))))
                        conn.execute(answers.delete().where(answers.c.kb.in_(list(renames.values()))))
                    for name in tables:
                        counts[name] = _load_table(conn, name, archived_rows(reader, name), renames)
            finally:
                engine.dispose()
    except (sa.exc.SQLAlchemyError, sqlite3.Error) as exc:
        raise StoreUnavailable(f"restoring the catalog and answer log failed: {exc}") from exc
    return counts


def _load_table(conn: sa.Connection, name: str, rows: list[dict[str, Any]], renames: dict[str, str]) -> int:
    table, column = TABLES[name], KB_COLUMN[name]
    written = 0
    for row in rows:
        if row.get(column) not in renames:
            continue
        row = {k: v for k, v in row.items() if k in table.c}
        row[column] = renames[row[column]]
        if name == "knowledge_bases":
            spec = json.loads(row["spec"])
            spec["name"] = row["name"]
            row["spec"] = json.dumps(spec)
            conn.execute(table.delete().where(table.c.name == row["name"]))
        else:
            key = table.c.completion_id
            if conn.execute(sa.select(key).where(key == row["completion_id"])).first() is not None:
                continue
        conn.execute(table.insert().values(**row))
        written += 1
    return written
