"""The ONNX Runtime CLIP backend on the tiny random CLIP: export, parity, cache reuse, refusal."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from retriever import clip_onnx
from retriever.embedder import ClipEmbedder, load_embedder
from retriever.errors import ConfigurationError
from server.wiring import build_embedder, onnx_cache_dir
from tests.support.settings import bare_settings


def _load(config: Path, cache_dir: Path) -> ClipEmbedder:
    return load_embedder(str(config), "none", device="cpu", backend="onnx", onnx_cache_dir=cache_dir)


def _tamper(path: Path, scale: float = 0.5) -> None:
    """Add noise to the largest float initializer of an exported graph (what a bad copy would do)."""
    model = onnx.load(str(path))
    biggest = max((t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT),
                  key=lambda t: int(np.prod(t.dims)))
    values = numpy_helper.to_array(biggest)
    noisy = values + np.random.default_rng(3).normal(0, scale, values.shape).astype(values.dtype)
    biggest.CopyFrom(numpy_helper.from_array(noisy, biggest.name))
    onnx.save(model, str(path))


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="module")
def onnx_embedder(tiny_clip_config: Path, onnx_cache: Path) -> ClipEmbedder:
    return _load(tiny_clip_config, onnx_cache)


def test_export_keeps_identity_and_drops_torch(onnx_embedder: ClipEmbedder, embedder: ClipEmbedder,
                                               onnx_cache: Path) -> None:
    assert onnx_embedder.backend == "onnx" and embedder.backend == "torch"
    assert onnx_embedder.identity == embedder.identity and onnx_embedder.dim == embedder.dim
    assert onnx_embedder.model is None, "the torch copy of the weights must be dropped"
    assert onnx_embedder.onnx is not None
    folder = onnx_embedder.onnx.folder
    assert folder.parent == onnx_cache and not [p for p in onnx_cache.iterdir() if p.name.startswith(".")]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["identity"] == embedder.identity
    assert manifest["max_abs_diff"] <= clip_onnx.PARITY_TOLERANCE
    assert set(manifest["files"]) == {"image.onnx", "text.onnx"}


def test_vectors_match_torch(onnx_embedder: ClipEmbedder, embedder: ClipEmbedder, sample_images) -> None:
    texts = ["a red square", "a photo of a dog", "x" * 2000]
    np.testing.assert_allclose(onnx_embedder.embed_texts(texts), embedder.embed_texts(texts), atol=1e-5)
    got = onnx_embedder.embed_images(sample_images)
    np.testing.assert_allclose(got, embedder.embed_images(sample_images), atol=1e-5)
    assert got.dtype == np.float32 and got.shape == (len(sample_images), embedder.dim)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # batch sizes other than the export's example (2) work: the batch axis is dynamic
    one_by_one = np.concatenate([onnx_embedder.embed_images([im]) for im in sample_images])
    np.testing.assert_allclose(one_by_one, got, atol=1e-5)
    assert onnx_embedder.embed_texts([]).shape == (0, embedder.dim)


def test_cached_export_is_reused(tiny_clip_config: Path, onnx_embedder: ClipEmbedder, onnx_cache: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def no_export(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cached export must not be exported again")

    monkeypatch.setattr(clip_onnx, "_export", no_export)
    again = _load(tiny_clip_config, onnx_cache)
    assert again.onnx is not None and onnx_embedder.onnx is not None
    assert again.onnx.folder == onnx_embedder.onnx.folder
    assert again.onnx.max_diff <= clip_onnx.PARITY_TOLERANCE


def test_tampered_cache_is_discarded_and_exported_again(
    tiny_clip_config: Path, embedder: ClipEmbedder, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    sample_images,
) -> None:
    first = _load(tiny_clip_config, tmp_path)
    assert first.onnx is not None
    _tamper(first.onnx.folder / "image.onnx")
    with caplog.at_level(logging.WARNING, logger="retriever.clip_onnx"):
        second = _load(tiny_clip_config, tmp_path)
    assert "disagrees with torch" in caplog.text
    assert second.onnx is not None and second.onnx.max_diff <= clip_onnx.PARITY_TOLERANCE
    np.testing.assert_allclose(second.embed_images(sample_images[:2]), embedder.embed_images(sample_images[:2]),
                               atol=1e-5)


def test_unreadable_cache_is_exported_again(tiny_clip_config: Path, tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    first = _load(tiny_clip_config, tmp_path)
    assert first.onnx is not None
    (first.onnx.folder / "text.onnx").write_bytes(b"not a graph")
    with caplog.at_level(logging.WARNING, logger="retriever.clip_onnx"):
        second = _load(tiny_clip_config, tmp_path)
    assert "unusable" in caplog.text and second.onnx is not None


def test_export_that_disagrees_is_refused(tiny_clip_config: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    real_export = clip_onnx._export

    def bad_export(model: object, folder: Path, *args: object) -> None:
        real_export(model, folder, *args)  # type: ignore[arg-type]
        _tamper(folder / "text.onnx")

    monkeypatch.setattr(clip_onnx, "_export", bad_export)
    with pytest.raises(ConfigurationError, match="disagrees with torch.*VLMRAG_CLIP_BACKEND=torch"):
        _load(tiny_clip_config, tmp_path)
    assert list(tmp_path.iterdir()) == [], "a refused export leaves nothing behind"


def test_unknown_backend_and_missing_cache_dir(tiny_clip_config: Path) -> None:
    with pytest.raises(ConfigurationError, match="unknown CLIP backend"):
        load_embedder(str(tiny_clip_config), "none", device="cpu", backend="tensorrt")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="cache folder"):
        load_embedder(str(tiny_clip_config), "none", device="cpu", backend="onnx")


def test_wiring_exports_under_the_data_dir(tiny_clip_config: Path, tmp_path: Path) -> None:
    settings = bare_settings(data_dir=tmp_path, clip_model=str(tiny_clip_config), clip_pretrained="none",
                             clip_device="cpu", clip_backend="onnx", embed_cache_entries=16)
    built = build_embedder(settings)
    assert built.backend == "onnx" and built.onnx is not None
    assert built.onnx.folder.parent == onnx_cache_dir(settings) == tmp_path / "onnx"
    assert built.cache is not None and built.cache.max_entries == 16
    torch_one = build_embedder(settings.model_copy(update={"clip_backend": "torch", "embed_cache_entries": 0}))
    assert torch_one.backend == "torch" and torch_one.cache is None


def test_spinning_is_off_unless_asked_for(tiny_clip_config: Path, tmp_path: Path) -> None:
    key = "session.intra_op.allow_spinning"
    settings = bare_settings(data_dir=tmp_path, clip_model=str(tiny_clip_config), clip_pretrained="none",
                             clip_device="cpu", clip_backend="onnx")
    for spinning, expected in ((False, "0"), (True, "1")):
        built = build_embedder(settings.model_copy(update={"clip_onnx_spinning": spinning}))
        assert built.onnx is not None
        for session in (built.onnx.image_session, built.onnx.text_session):
            assert session.get_session_options().get_session_config_entry(key) == expected
