"""CLIP's text tower on the used token columns (retriever/clip_text.py): the vectors of the full length."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from retriever import clip_text
from retriever.embedder import ClipEmbedder, load_embedder

TEXTS = ["pump", "What does E-417 mean on the pump P-100-A?", "valve " * 100]  # the last fills the context


def _full(model: torch.nn.Module, tokens: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return model.encode_text(tokens, normalize=True).float().numpy()


def test_used_length_is_up_to_the_last_token_of_the_batch() -> None:
    tokens = np.zeros((2, 10), dtype=np.int64)
    tokens[0, :3] = [5, 6, 9]
    tokens[1, :5] = [5, 0, 7, 8, 9]  # a padding id inside a text is not its end
    assert clip_text.used_length(tokens) == 5
    assert clip_text.used_length(torch.from_numpy(tokens[:1])) == 3
    assert clip_text.used_length(np.zeros((1, 10), dtype=np.int64)) == 1


def test_cut_tokens_give_the_full_length_vectors(embedder: ClipEmbedder) -> None:
    model = embedder.model
    assert clip_text.trimmable(model) and embedder.text_trim
    tokens = embedder._tokenizer(TEXTS)
    short = tokens[:2]
    assert clip_text.used_length(short) < short.shape[1], "the test must actually cut columns"
    with torch.inference_mode():
        for batch in (short, tokens, tokens[:1], tokens[2:]):
            cut = clip_text.encode_text(model, batch).float().numpy()
            assert np.abs(cut - _full(model, batch)).max() < 1e-5
    # and through the embedder, mixed lengths in one batch
    assert np.abs(embedder.embed_texts(TEXTS) - _full(model, tokens)).max() < 1e-5


def test_models_that_a_cut_would_change_keep_the_full_length(embedder: ClipEmbedder) -> None:
    last = copy.deepcopy(embedder.model)
    last.text_pool_type = "last"  # reads the last column: padding counts
    bidirectional = copy.deepcopy(embedder.model)
    bidirectional.attn_mask = None  # every token sees the padding after it
    for model in (last, bidirectional):
        assert not clip_text.trimmable(model)
        wrapped = ClipEmbedder(model, embedder._preprocess, embedder._tokenizer, identity="x", dim=embedder.dim,
                               device="cpu")
        assert not wrapped.text_trim
        tokens = embedder._tokenizer(TEXTS[:2])
        assert np.abs(wrapped.embed_texts(TEXTS[:2]) - _full(model, tokens)).max() < 1e-6


@pytest.fixture(scope="module")
def onnx_embedder(tiny_clip_config: Path, tmp_path_factory: pytest.TempPathFactory) -> ClipEmbedder:
    return load_embedder(str(tiny_clip_config), "none", device="cpu", backend="onnx",
                         onnx_cache_dir=tmp_path_factory.mktemp("onnx-trim"))


def test_onnx_text_graph_takes_the_used_columns(onnx_embedder: ClipEmbedder, embedder: ClipEmbedder) -> None:
    onnx = onnx_embedder.onnx
    assert onnx is not None and onnx.text_trim
    assert json.loads((onnx.folder / "manifest.json").read_text())["text_trim"] is True
    (tokens_input,) = onnx.text_session.get_inputs()
    assert isinstance(tokens_input.shape[1], str), "the token axis must be dynamic"
    tokens = embedder._tokenizer(TEXTS)
    seen: list[int] = []
    session = onnx.text_session

    class Spy:
        def run(self, names, feeds):
            seen.append(feeds["tokens"].shape[1])
            return session.run(names, feeds)

    onnx.text_session = Spy()
    try:
        got = onnx_embedder.embed_texts(TEXTS[:2])
    finally:
        onnx.text_session = session
    assert seen == [clip_text.used_length(tokens[:2])] and seen[0] < tokens.shape[1]
    assert np.abs(got - _full(embedder.model, tokens[:2])).max() < 1e-4
    assert np.abs(onnx_embedder.embed_texts(TEXTS) - _full(embedder.model, tokens)).max() < 1e-4
