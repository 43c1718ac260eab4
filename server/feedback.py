"""The answer log and answer feedback: a record of every answer (enough to replay it) and the ratings callers give.

Two tables through SQLAlchemy Core, the same SQL on every backend: SQLite by default
(``data_dir/feedback.sqlite3``, WAL mode so ``vlmrag feedback export`` reads while the server writes) or the
database at ``VLMRAG_FEEDBACK_DATABASE_URL`` (else ``VLMRAG_DATABASE_URL``), e.g. PostgreSQL shared by replicas.

* ``answers``: one row per answered completion: who received it (``key_id``), the KB, the question, the
  search query, every candidate with its scores and whether it was kept, the model, the resolved retrieval
  plan, the answer text and the time, and the answer's check against its sources (``verification``, JSON).
* ``feedback``: at most one rating per answer (rating again replaces it), with an optional comment and the
  snippets it is about.

A rating is accepted only from the key that received the answer; any other key, like an unknown id, gets
``NotFound`` (404), so nobody learns that someone else's completion exists. Answers nobody rated are
pruned after ``feedback_answer_retention_days``. Blocking calls run in a thread; recording an answer never
fails a chat (``ChatService._log_answer`` logs, counts and goes on).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, TypeVar

import sqlalchemy as sa

from retriever.errors import InvalidInput, NotFound, StoreUnavailable
from server.settings import Settings
from server.sql import run_sql

log = logging.getLogger(__name__)

Rating = Literal["up", "down"]
RATINGS: tuple[str, ...] = ("up", "down")
MAX_ANSWER_CHARS = 50_000  # the stored answer text; the model's max_tokens bounds it long before this
MAX_SNIPPET_IDS = 64
_PRUNE_EVERY_S = 3600.0
T = TypeVar("T")

_metadata = sa.MetaData()
answers = sa.Table(
    "answers", _metadata,
    sa.Column("completion_id", sa.String(100), primary_key=True),
    sa.Column("key_id", sa.String(100), nullable=False),
    sa.Column("kb", sa.String(48), nullable=False),
    sa.Column("question", sa.Text, nullable=False),
    sa.Column("search_query", sa.Text),
    sa.Column("sources", sa.Text, nullable=False),  # JSON list
    sa.Column("model", sa.String(200), nullable=False),
    sa.Column("settings", sa.Text, nullable=False),  # JSON object
    sa.Column("answer", sa.Text, nullable=False, default=""),
    sa.Column("created_at", sa.Float, nullable=False, index=True),
    sa.Column("verification", sa.Text),  # JSON object (server/api_models.py::Verification); null: not checked
)
# Columns added after the first release, created on an existing table at startup: name -> SQL type.
_ADDED_ANSWER_COLUMNS = {"verification": "TEXT"}
feedback = sa.Table(
    "feedback", _metadata,
    sa.Column("completion_id", sa.String(100), sa.ForeignKey("answers.completion_id"), primary_key=True),
    sa.Column("key_id", sa.String(100), nullable=False),
    sa.Column("kb", sa.String(48), nullable=False),  # the answer's, copied: listing filters on it
    sa.Column("rating", sa.String(8), nullable=False),
    sa.Column("comment", sa.Text),
    sa.Column("snippet_ids", sa.Text, nullable=False),  # JSON list
    sa.Column("rated_at", sa.Float, nullable=False),
    sa.Index("ix_feedback_kb_rated", "kb", "rated_at"),
    sa.Index("ix_feedback_rated", "rated_at", "completion_id"),
)


@dataclass(slots=True)
class AnswerRecord:
    """One answer as it went out: enough to replay the retrieval and compare the answer."""

    completion_id: str
    key_id: str
    kb: str
    question: str
    search_query: str | None
    sources: list[dict[str, Any]]  # [{"id", "index", "relevancy", "clip_score", "kept", "source", "page", "kind"}]
    model: str
    settings: dict[str, Any]  # the resolved retrieval plan (k, threshold, scorer, query…) and what was observed
    created_at: float  # epoch seconds
    answer: str = ""
    verification: dict[str, Any] | None = None  # the claims and their verdicts, as the answer went out

    def public(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class FeedbackRecord:
    """A rating of one answer, with the answer's record."""

    completion_id: str
    key_id: str
    kb: str
    rating: str
    comment: str | None
    snippet_ids: list[str]
    rated_at: float
    answer: AnswerRecord

    def public(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class FeedbackPage:
    items: list[FeedbackRecord] = field(default_factory=list)
    next_cursor: str | None = None


def feedback_database_url(settings: Settings) -> str:
    """``feedback_database_url``, else ``database_url``, else SQLite under the data dir."""
    return settings.feedback_database_url or settings.database_url or settings.sqlite_url("feedback.sqlite3")


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL: the CLI's export reads while the server writes; busy_timeout: writers wait for each other
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


def encode_cursor(rated_at: float, completion_id: str) -> str:
    raw = json.dumps([rated_at, completion_id]).encode("utf-8")
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, str]:
    """The (rated_at, completion_id) of ``next_cursor``; ``InvalidInput`` for anything else."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        rated_at, completion_id = json.loads(raw)
        if isinstance(rated_at, bool) or not isinstance(rated_at, int | float) or not isinstance(completion_id, str):
            raise TypeError("bad cursor")
        return float(rated_at), completion_id
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError) as exc:
        raise InvalidInput("cursor is not a next_cursor this API returned", param="cursor",
                           code="invalid_cursor") from exc


class AnswerLog:
    """The ``answers`` and ``feedback`` tables; build once (``from_settings``), ``close()`` on shutdown."""

    def __init__(self, url: str, *, retention_days: float = 0.0, max_comment_chars: int = 2000) -> None:
        self.engine = sa.create_engine(url, pool_pre_ping=True)
        if self.engine.dialect.name == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        self.retention_s = retention_days * 86400.0
        self.max_comment_chars = max_comment_chars
        self._pruned_at = 0.0
        try:
            _metadata.create_all(self.engine)
            self._add_missing_columns()
        except sa.exc.SQLAlchemyError as exc:
            self.engine.dispose()
            raise StoreUnavailable(f"the feedback database at {self.engine.url!r} is unavailable: {exc}") from exc

    def _add_missing_columns(self) -> None:
        """An answer log made by an older vlmrag lacks the newer columns: add them (nullable, no rewrite)."""
        present = {c["name"] for c in sa.inspect(self.engine).get_columns("answers")}
        for name, sql_type in _ADDED_ANSWER_COLUMNS.items():
            if name not in present:
                with self.engine.begin() as conn:
                    conn.execute(sa.text(f"ALTER TABLE answers ADD COLUMN {name} {sql_type}"))
                log.info("answer log: added column answers.%s", name)

    @classmethod
    def from_settings(cls, settings: Settings) -> AnswerLog:
        return cls(feedback_database_url(settings), retention_days=settings.feedback_answer_retention_days,
                   max_comment_chars=settings.limit_feedback_comment_chars)

    async def _run(self, fn: Callable[[], T]) -> T:
        return await run_sql(fn, what="the feedback database")

    # ------------------------------------------------------------------ answers
    async def record(self, record: AnswerRecord) -> None:
        """Store one answer (and, at most hourly, forget unrated answers past the retention)."""
        row = {
            "completion_id": record.completion_id, "key_id": record.key_id, "kb": record.kb,
            "question": record.question, "search_query": record.search_query,
            "sources": json.dumps(record.sources, ensure_ascii=False), "model": record.model,
            "settings": json.dumps(record.settings, ensure_ascii=False, default=str),
            "answer": record.answer[:MAX_ANSWER_CHARS], "created_at": record.created_at,
            "verification": json.dumps(record.verification, ensure_ascii=False)
            if record.verification is not None else None,
        }

        def write() -> None:
            with self.engine.begin() as conn:
                conn.execute(answers.insert().values(**row))
            if self.retention_s and time.time() - self._pruned_at > _PRUNE_EVERY_S:
                self._pruned_at = time.time()
                self._prune(time.time() - self.retention_s)

        await self._run(write)

    def _prune(self, before: float) -> int:
        rated = sa.select(feedback.c.completion_id).where(feedback.c.completion_id == answers.c.completion_id)
        with self.engine.begin() as conn:
            gone = conn.execute(answers.delete().where(answers.c.created_at < before, ~rated.exists())).rowcount
        if gone:
            log.info("answer log: forgot %d unrated answers older than the retention", gone)
        return gone

    async def get_answer(self, completion_id: str) -> AnswerRecord | None:
        def read() -> AnswerRecord | None:
            with self.engine.connect() as conn:
                row = conn.execute(sa.select(answers).where(answers.c.completion_id == completion_id)).first()
            return _answer(row._mapping) if row else None
        return await self._run(read)

    # ------------------------------------------------------------------ feedback
    async def add_feedback(
        self, completion_id: str, key_id: str, rating: str, comment: str | None = None,
        snippet_ids: Sequence[str] | None = None,
    ) -> FeedbackRecord:
        """Rate an answer ``key_id`` received (again: replaces its rating); ``NotFound`` for any other."""
        if rating not in RATINGS:
            raise InvalidInput(f"rating must be one of {', '.join(RATINGS)}", param="rating")
        if comment is not None and len(comment) > self.max_comment_chars:
            raise InvalidInput(f"comment has {len(comment)} characters, the limit is {self.max_comment_chars} "
                               "(VLMRAG_LIMIT_FEEDBACK_COMMENT_CHARS)", param="comment", code="comment_too_long")
        ids = list(dict.fromkeys(snippet_ids or []))
        if len(ids) > MAX_SNIPPET_IDS:
            raise InvalidInput(f"snippet_ids may name at most {MAX_SNIPPET_IDS} snippets", param="snippet_ids")

        def write() -> FeedbackRecord:
            with self.engine.begin() as conn:
                row = conn.execute(sa.select(answers).where(answers.c.completion_id == completion_id)).first()
                if row is None or row.key_id != key_id:  # someone else's answer reads exactly like none
                    raise NotFound(f"no answer {completion_id!r} for this key", param="completion_id")
                answer = _answer(row._mapping)
                unknown = sorted(set(ids) - {s.get("id") for s in answer.sources})
                if unknown:
                    raise InvalidInput(f"snippet_ids {unknown[:3]} are not among this answer's sources",
                                       param="snippet_ids")
                rated_at = time.time()
                values = {"key_id": key_id, "kb": answer.kb, "rating": rating, "comment": comment,
                          "snippet_ids": json.dumps(ids), "rated_at": rated_at}
                updated = conn.execute(
                    feedback.update().where(feedback.c.completion_id == completion_id).values(**values)
                ).rowcount
                if not updated:
                    conn.execute(feedback.insert().values(completion_id=completion_id, **values))
            return FeedbackRecord(completion_id, key_id, answer.kb, rating, comment, ids, rated_at, answer)

        try:
            return await self._run(write)
        except StoreUnavailable as exc:
            if isinstance(exc.__cause__, sa.exc.IntegrityError):  # two first ratings at once: the second updates
                return await self._run(write)
            raise

    def page(
        self, kb: str | None = None, since: float | None = None, rating: str | None = None, limit: int = 50,
        cursor: str | None = None, *, kbs: Sequence[str] | None = None,
    ) -> FeedbackPage:
        """Newest ratings first; ``kbs`` limits them to those KBs (a key bound to some). Blocking."""
        query = (sa.select(feedback, *_answer_columns())
                 .join(answers, answers.c.completion_id == feedback.c.completion_id)
                 .order_by(feedback.c.rated_at.desc(), feedback.c.completion_id.desc())
                 .limit(limit + 1))
        if kb is not None:
            query = query.where(feedback.c.kb == kb)
        if kbs is not None:
            query = query.where(feedback.c.kb.in_(list(kbs)))
        if since is not None:
            query = query.where(feedback.c.rated_at >= since)
        if rating is not None:
            query = query.where(feedback.c.rating == rating)
        if cursor:
            at, last = decode_cursor(cursor)
            query = query.where(sa.or_(feedback.c.rated_at < at,
                                       sa.and_(feedback.c.rated_at == at, feedback.c.completion_id < last)))
        with self.engine.connect() as conn:
            rows = [r._mapping for r in conn.execute(query)]
        items = [_feedback(r) for r in rows[:limit]]
        more = len(rows) > limit and items
        return FeedbackPage(items, encode_cursor(items[-1].rated_at, items[-1].completion_id) if more else None)

    async def list_feedback(
        self, kb: str | None = None, since: float | None = None, rating: str | None = None, limit: int = 50,
        cursor: str | None = None, *, kbs: Sequence[str] | None = None,
    ) -> FeedbackPage:
        if cursor:
            decode_cursor(cursor)  # a bad cursor is the caller's 400, not the database's 503
        return await self._run(lambda: self.page(kb, since, rating, limit, cursor, kbs=kbs))

    def export(self, kb: str | None = None, since: float | None = None, rating: str | None = None,
               batch: int = 500) -> Iterator[FeedbackRecord]:
        """Every matching rating, newest first, read page by page (the CLI; blocking)."""
        cursor: str | None = None
        while True:
            try:
                found = self.page(kb, since, rating, batch, cursor)
            except sa.exc.SQLAlchemyError as exc:
                raise StoreUnavailable(f"the feedback database is unavailable: {exc}") from exc
            yield from found.items
            if found.next_cursor is None:
                return
            cursor = found.next_cursor

    def close(self) -> None:
        self.engine.dispose()


def _answer_columns() -> list[sa.Label[Any]]:
    return [c.label(f"answer_{c.name}") for c in answers.columns]


def _answer(row: Any, prefix: str = "") -> AnswerRecord:
    p = prefix
    return AnswerRecord(
        completion_id=row[p + "completion_id"], key_id=row[p + "key_id"], kb=row[p + "kb"],
        question=row[p + "question"], search_query=row[p + "search_query"], sources=json.loads(row[p + "sources"]),
        model=row[p + "model"], settings=json.loads(row[p + "settings"]), created_at=row[p + "created_at"],
        answer=row[p + "answer"] or "",
        verification=json.loads(row[p + "verification"]) if row[p + "verification"] else None,
    )


def _feedback(row: Any) -> FeedbackRecord:
    return FeedbackRecord(
        completion_id=row["completion_id"], key_id=row["key_id"], kb=row["kb"], rating=row["rating"],
        comment=row["comment"], snippet_ids=json.loads(row["snippet_ids"]), rated_at=row["rated_at"],
        answer=_answer(row, "answer_"),
    )
