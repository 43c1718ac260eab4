"""The one way the server's SQL tables (KB catalog, answer/feedback log) run a blocking call.

SQLAlchemy's engine is synchronous; each call runs in a worker thread and its errors are mapped
onto ``retriever.errors``: an integrity error (a duplicate key) is ``Conflict``, anything else
``StoreUnavailable`` (503 with ``Retry-After`` at the edge).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

import sqlalchemy as sa

from retriever.errors import Conflict, StoreUnavailable

T = TypeVar("T")


async def run_sql(fn: Callable[[], T], *, what: str, on_duplicate: str | None = None) -> T:
    """Run ``fn`` in a thread; ``what`` names the database in the error ("the feedback database")."""
    try:
        return await asyncio.to_thread(fn)
    except sa.exc.IntegrityError as exc:
        if on_duplicate is None:
            raise StoreUnavailable(f"{what} refused a write: {type(exc).__name__}") from exc
        raise Conflict(on_duplicate) from exc
    except sa.exc.SQLAlchemyError as exc:
        raise StoreUnavailable(f"{what} is unavailable: {type(exc).__name__}") from exc
