"""ClipEmbedder on the tiny random-weights CLIP: shapes, determinism, weights loading, offline tags."""

from __future__ import annotations

import io
import time
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from retriever.embedder import ClipEmbedder, load_embedder
from retriever.errors import ConfigurationError
from tests.support.media import png_bytes
from tests.support.tiny_clip import TINY_CLIP_DIM, TINY_CLIP_NAME


def _save_weights(embedder: ClipEmbedder, path: Path, perturb: float = 0.0) -> Path:
    state = {k: v.detach().clone().contiguous() for k, v in embedder.model.state_dict().items()}
    if perturb:
        generator = torch.Generator().manual_seed(7)
        for value in state.values():
            if value.is_floating_point():
                value.add_(torch.randn(value.shape, generator=generator) * perturb)
    save_file(state, str(path))
    return path


def test_identity_dim_device(embedder: ClipEmbedder) -> None:
    assert embedder.identity == f"open_clip:{TINY_CLIP_NAME}:none:{TINY_CLIP_DIM}"
    assert embedder.dim == TINY_CLIP_DIM
    assert embedder.device == "cpu"


def test_image_and_text_vectors_are_normalised_float32(embedder: ClipEmbedder, sample_images) -> None:
    images = embedder.embed_images(sample_images)
    texts = embedder.embed_texts(["a red square", "a photo of a dog", "x" * 2000])  # long: truncated
    for array, rows in ((images, len(sample_images)), (texts, 3)):
        assert array.shape == (rows, TINY_CLIP_DIM) and array.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(array, axis=1), 1.0, atol=1e-5)
    assert embedder.embed_images([]).shape == (0, TINY_CLIP_DIM)
    assert embedder.embed_texts([]).shape == (0, TINY_CLIP_DIM)


def test_vectors_are_deterministic_and_distinct(embedder: ClipEmbedder, sample_images) -> None:
    first = embedder.embed_images(sample_images)
    np.testing.assert_array_equal(first, embedder.embed_images(sample_images))
    similarity = first @ first.T
    off_diagonal = similarity[~np.eye(len(first), dtype=bool)]
    assert off_diagonal.max() < 0.9999, "distinct images must give distinct vectors"
    texts = embedder.embed_texts(["one caption", "another caption"])
    assert float(texts[0] @ texts[1]) < 0.9999


def test_batching_does_not_change_vectors(embedder: ClipEmbedder, sample_images) -> None:
    whole = embedder.embed_images(sample_images)
    one_by_one = np.concatenate([embedder.embed_images([im]) for im in sample_images])
    np.testing.assert_allclose(whole, one_by_one, atol=1e-5)
    tensors = torch.stack([embedder.preprocess(im) for im in sample_images])
    np.testing.assert_allclose(embedder.embed_preprocessed(tensors), whole, atol=1e-6)


def test_random_weights_are_seeded_across_loads(tiny_clip_config: Path, embedder, sample_images) -> None:
    again = load_embedder(str(tiny_clip_config), "none", device="cpu")
    np.testing.assert_allclose(again.embed_images(sample_images[:2]), embedder.embed_images(sample_images[:2]),
                               atol=1e-6)
    assert again.identity == embedder.identity


def test_exif_orientation_is_applied(embedder: ClipEmbedder, sample_images) -> None:
    upright = sample_images[0].resize((96, 64))  # not square, so rotation matters
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the stored pixels are the upright image turned CCW
    rotated = Image.open(io.BytesIO(png_bytes(upright.transpose(Image.Transpose.ROTATE_90), exif=exif.tobytes())))
    vec_upright, vec_rotated = embedder.embed_images([upright, rotated])
    np.testing.assert_allclose(vec_rotated, vec_upright, atol=1e-5)
    raw = embedder.embed_images([upright.transpose(Image.Transpose.ROTATE_90)])[0]
    assert float(raw @ vec_upright) < 0.9999, "without EXIF handling the vectors would differ"


def test_non_rgb_modes_are_converted(embedder: ClipEmbedder, sample_images) -> None:
    rgba = sample_images[1].convert("RGBA")
    for image in (sample_images[1].convert("L"), rgba, sample_images[1].convert("P"), sample_images[1].convert("I;16")):
        assert embedder.embed_images([image]).shape == (1, TINY_CLIP_DIM)
    np.testing.assert_allclose(embedder.embed_images([rgba]), embedder.embed_images([sample_images[1]]), atol=1e-6)


def test_local_safetensors_file_loads_and_names_its_hash(
    tmp_path: Path, tiny_clip_config: Path, embedder: ClipEmbedder, sample_images
) -> None:
    weights = _save_weights(embedder, tmp_path / "tiny.safetensors", perturb=0.05)
    started = time.perf_counter()
    loaded = load_embedder(str(tiny_clip_config), str(weights), device="cpu")
    assert time.perf_counter() - started < 10
    assert loaded.identity.startswith(f"open_clip:{TINY_CLIP_NAME}:tiny-sha256-")
    assert loaded.identity != embedder.identity
    # The perturbed weights really were loaded: vectors differ from the seeded random model...
    assert not np.allclose(loaded.embed_images(sample_images[:1]), embedder.embed_images(sample_images[:1]))
    # ...and the same file loaded via local-dir: gives the same vectors.
    folder = tmp_path / "model"
    folder.mkdir()
    weights.rename(folder / "open_clip_model.safetensors")
    via_dir = load_embedder(str(tiny_clip_config), f"local-dir:{folder}", device="cpu")
    np.testing.assert_allclose(via_dir.embed_images(sample_images[:1]), loaded.embed_images(sample_images[:1]),
                               atol=1e-6)
    assert via_dir.identity.split(":")[2].endswith(loaded.identity.split(":")[2].split("-sha256-")[1])


def test_two_weight_files_have_different_identities(tmp_path: Path, tiny_clip_config: Path, embedder) -> None:
    one = _save_weights(embedder, tmp_path / "w.safetensors", perturb=0.01)
    (tmp_path / "b").mkdir()
    two = _save_weights(embedder, tmp_path / "b" / "w.safetensors", perturb=0.02)
    ids = {load_embedder(str(tiny_clip_config), str(path), device="cpu").identity for path in (one, two)}
    assert len(ids) == 2


def test_uncached_pretrained_tag_fails_fast_offline(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    started = time.perf_counter()
    with pytest.raises(ConfigurationError) as caught:
        load_embedder("ViT-B-32", "laion2b_s34b_b79k", device="cpu")
    assert time.perf_counter() - started < 10
    message = str(caught.value)
    assert "laion2b_s34b_b79k" in message and "ViT-B-32" in message
    assert "VLMRAG_CLIP_PRETRAINED" in message and "local-dir:" in message


@pytest.mark.parametrize(
    ("model", "pretrained", "expected"),
    [
        ("ViT-Nonexistent-99", "none", "open_clip.list_models"),
        ("ViT-B-32", "no_such_tag", "known tags"),
        ("ViT-B-32", "/nonexistent/weights.safetensors", "does not exist"),
        ("ViT-B-32", "local-dir:/nonexistent", "no open_clip_model.safetensors"),
        ("/nonexistent/model.json", "none", "does not exist"),
    ],
)
def test_bad_settings_are_configuration_errors(model: str, pretrained: str, expected: str) -> None:
    with pytest.raises(ConfigurationError, match=expected.replace(".", r"\.")):
        load_embedder(model, pretrained, device="cpu")


def test_config_json_without_required_keys(tmp_path: Path) -> None:
    bad = tmp_path / "broken.json"
    bad.write_text('{"embed_dim": 8}', encoding="utf-8")
    with pytest.raises(ConfigurationError, match="vision_cfg"):
        load_embedder(str(bad), "none")


def test_threads_setting_applies(tiny_clip_config: Path) -> None:
    before = torch.get_num_threads()
    try:
        load_embedder(str(tiny_clip_config), "none", device="auto", threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_uncached_tag_is_downloaded_when_the_hub_answers(monkeypatch, tmp_path: Path) -> None:
    import open_clip.pretrained

    from retriever import embedder as embedder_module

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    downloaded = tmp_path / "open_clip_model.safetensors"
    downloaded.write_bytes(b"weights")
    asked: list[dict] = []
    monkeypatch.setattr(embedder_module, "_hub_reachable", lambda timeout_s=3.0: None)
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained",
                        lambda cfg, **_: asked.append(cfg) or str(downloaded))
    resolved = embedder_module._resolve("ViT-B-32", "laion2b_s34b_b79k")
    assert resolved.pretrained == str(downloaded)
    assert resolved.weights_label == "laion2b_s34b_b79k"
    assert asked and "laion2B" in asked[0].get("hf_hub", "")


def test_failed_download_and_offline_flag_are_configuration_errors(monkeypatch, tmp_path: Path) -> None:
    import open_clip.pretrained

    from retriever import embedder as embedder_module

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(embedder_module, "_hub_reachable", lambda timeout_s=3.0: None)

    def broken(cfg, **_):
        raise OSError("connection reset")

    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", broken)
    with pytest.raises(ConfigurationError, match="download failed: connection reset"):
        embedder_module._resolve("ViT-B-32", "laion2b_s34b_b79k")
    monkeypatch.undo()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(ConfigurationError, match="HF_HUB_OFFLINE is set"):
        load_embedder("ViT-B-32", "laion2b_s34b_b79k", device="cpu")
    assert time.perf_counter() - started < 2
