"""Vector store adapters: ``open_store`` picks Qdrant Edge (embedded) or qdrant-client (URL).

``qdrant_url``: empty -> Qdrant Edge under ``path``; ``":memory:"`` or ``"local:PATH"`` ->
qdrant-client's in-process local mode (tests, congruence checks; slow beyond ~35k points);
anything else -> a Qdrant server via the async qdrant-client.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from retriever.errors import StoreUnavailable
from retriever.store.base import VectorStore
from retriever.store.edge import EdgeStore
from retriever.store.remote import RemoteStore

__all__ = ["EdgeStore", "RemoteStore", "VectorStore", "open_store"]


async def open_store(
    *, qdrant_url: str, api_key: str, path: Path, collection: str, shard_number: int = 1,
    replication_factor: int = 1, write_consistency_factor: int = 1,
    read_consistency: str | int = "majority", timeout_s: float = 10.0,
) -> VectorStore:
    """Open the configured store; an unreachable server or a locked path raises StoreUnavailable."""
    from qdrant_client import AsyncQdrantClient

    url = qdrant_url.strip()
    if not url:
        store = EdgeStore(Path(path), collection)
        await store.open()
        return store
    if url == ":memory:" or url.startswith("local:"):
        location = url[len("local:"):] if url.startswith("local:") else ""
        try:
            client = (AsyncQdrantClient(location=":memory:") if not location
                      else AsyncQdrantClient(path=location))
        except (RuntimeError, OSError) as exc:  # local mode locks its folder per process
            raise StoreUnavailable(f"qdrant-client local store {location} is unavailable: {exc}") from exc
        remote = RemoteStore(client, collection)
        await remote.open()
        return remote
    # check_compatibility=False: its version probe is an extra blocking round trip at startup;
    # remote.open() below verifies the server answers anyway.
    client = AsyncQdrantClient(
        url=url, api_key=api_key or None, timeout=max(1, int(timeout_s)), check_compatibility=False,
    )
    remote = RemoteStore(
        client, collection, shard_number=shard_number, replication_factor=replication_factor,
        write_consistency_factor=write_consistency_factor, read_consistency=read_consistency, url=url,
    )
    try:
        # A black-holed host would otherwise wait for the OS connect timeout.
        await asyncio.wait_for(remote.open(), timeout=timeout_s)
    except TimeoutError as exc:
        await client.close()
        raise StoreUnavailable(f"Qdrant at {url} did not answer within {timeout_s:g} s") from exc
    except Exception:
        await client.close()
        raise
    return remote
