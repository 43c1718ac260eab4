"""CLIP embeddings via open_clip: batched, L2-normalised float32 image and text vectors.

``load_embedder(model, pretrained)`` resolves a pretrained tag from the local Hugging Face /
open_clip cache first. A tag that is not cached is downloaded only when the hub answers a quick
probe (bounded to a few seconds, DNS included) and ``HF_HUB_OFFLINE`` is not set; otherwise it
fails at once with a ``ConfigurationError`` that names the model and tag and says how to supply a
local file (offline hosts would otherwise wait ~46 s on DNS retries inside huggingface_hub).

``backend="onnx"`` runs both towers on ONNX Runtime (``retriever/clip_onnx.py``: exported once,
cached, parity-checked against torch) and drops the torch copy of the weights; the identity is the
same. ``embed_query_text``/``embed_query_images`` go through an optional ``EmbedCache`` (queries
only; ingestion batches use ``embed_texts``/``embed_images`` and bypass it).
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from PIL import Image, ImageOps

from retriever.clip_text import encode_text as encode_trimmed
from retriever.clip_text import trimmable
from retriever.embed_cache import EmbedCache, array_key, text_key
from retriever.errors import ConfigurationError

if TYPE_CHECKING:  # importing it pulls in onnxruntime
    from retriever.clip_onnx import OnnxClip

Backend = Literal["torch", "onnx"]
BACKENDS: tuple[str, ...] = ("torch", "onnx")

log = logging.getLogger(__name__)

_LOCAL_DIR = "local-dir:"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# Seed for pretrained="none": every load of the same config gives the same random weights, so
# the identity "…:none:…" names one vector space across processes (tests and demos rely on it).
_RANDOM_INIT_SEED = 0
_HINT = (
    "supply local weights with VLMRAG_CLIP_PRETRAINED=/path/to/weights.safetensors "
    "or VLMRAG_CLIP_PRETRAINED=local-dir:/path/to/folder (with open_clip_model.safetensors), "
    "or pre-populate the Hugging Face cache on a machine with network access "
    "(to try vlmrag offline with tiny random-weight models: make demo)"
)


def prepare_image(image: Image.Image) -> Image.Image:
    """Apply EXIF orientation and convert to RGB (what CLIP was trained on)."""
    image = ImageOps.exif_transpose(image) or image
    return image if image.mode == "RGB" else image.convert("RGB")


@dataclass(slots=True)
class _Resolved:
    """What open_clip is asked to build, plus the identity label of the weights."""

    model_name: str  # registered name or "local-dir:PATH"
    pretrained: str | None  # a local file path or None
    weights_label: str
    overrides: dict[str, Any]


class ClipEmbedder:
    """A loaded open_clip model (torch, or its ONNX Runtime export) with its preprocess and tokenizer."""

    def __init__(
        self, model: torch.nn.Module | None, preprocess: Callable[[Image.Image], torch.Tensor],
        tokenizer: Callable[[list[str]], torch.Tensor], *, identity: str, dim: int, device: str,
        batch_size: int = 16, onnx: OnnxClip | None = None, cache: EmbedCache | None = None,
    ) -> None:
        if model is None and onnx is None:
            raise ValueError("ClipEmbedder needs a torch model or ONNX sessions")
        # open_clip models (CLIP, CustomTextCLIP) share encode_image/encode_text; Module hides them.
        # None with the ONNX backend: the sessions hold their own copy of the weights.
        self.model: Any = model.eval() if model is not None else None
        self.onnx = onnx
        self.cache = cache
        self._preprocess = preprocess
        self._tokenizer = tokenizer
        self.identity = identity
        self.dim = dim
        self.device = device
        self.batch_size = max(1, batch_size)
        # torch: the text tower runs on the token columns a batch uses where that gives the same vectors
        # (retriever/clip_text.py); the ONNX export decides the same for its own graph
        self.text_trim = model is not None and trimmable(model)

    @property
    def backend(self) -> Backend:
        return "onnx" if self.onnx is not None else "torch"

    def __repr__(self) -> str:
        return f"ClipEmbedder({self.identity!r}, device={self.device!r}, backend={self.backend!r})"

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """EXIF-orient, RGB-convert and transform one image to a CHW tensor (CPU, thread-safe)."""
        return self._preprocess(prepare_image(image))

    def embed_preprocessed(self, batch: torch.Tensor) -> np.ndarray:
        """Encode an already preprocessed (N, C, H, W) batch; returns (N, dim) normalised float32."""
        if batch.shape[0] == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self.onnx is not None:
            return self.onnx.encode_image(batch.numpy())
        with torch.inference_mode():
            features = self.model.encode_image(batch.to(self.device), normalize=True)
        return _to_numpy(features)

    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        """Embed images in batches of ``batch_size``; returns (N, dim) normalised float32."""
        out = [np.zeros((0, self.dim), dtype=np.float32)]
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            out.append(self.embed_preprocessed(torch.stack([self.preprocess(im) for im in chunk])))
        return np.concatenate(out, axis=0)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """Embed texts in batches (truncated to the model's context length); (N, dim) float32."""
        out = [np.zeros((0, self.dim), dtype=np.float32)]
        for start in range(0, len(texts), self.batch_size):
            tokens = self._tokenizer(texts[start:start + self.batch_size])
            if self.onnx is not None:
                out.append(self.onnx.encode_text(tokens.numpy()))
                continue
            with torch.inference_mode():
                tokens = tokens.to(self.device)
                features = encode_trimmed(self.model, tokens) if self.text_trim else \
                    self.model.encode_text(tokens, normalize=True)
            out.append(_to_numpy(features))
        return np.concatenate(out, axis=0)

    # --- query embedding, through the cache ---------------------------------------------------
    def embed_query_text(self, text: str) -> np.ndarray:
        """One text query's (dim,) vector, from the cache when it was asked before (read-only)."""
        if self.cache is None:
            return self.embed_texts([text])[0]
        key = text_key(text)
        cached = self.cache.get("text", key)
        if cached is not None:
            return cached
        return self.cache.put("text", key, self.embed_texts([text])[0])

    def embed_query_images(self, images: list[Image.Image]) -> np.ndarray:
        """(N, dim) vectors of query images; each image hits the cache by its preprocessed pixels."""
        if self.cache is None or not images:
            return self.embed_images(images)
        tensors = [self.preprocess(image) for image in images]
        keys = [array_key(tensor.numpy()) for tensor in tensors]
        rows: list[np.ndarray | None] = [self.cache.get("image", key) for key in keys]
        missing = [i for i, row in enumerate(rows) if row is None]
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start:start + self.batch_size]
            vectors = self.embed_preprocessed(torch.stack([tensors[i] for i in chunk]))
            for i, vector in zip(chunk, vectors, strict=True):
                rows[i] = self.cache.put("image", keys[i], vector)
        return np.stack([row for row in rows if row is not None]).astype(np.float32, copy=False)


def _to_numpy(features: torch.Tensor) -> np.ndarray:
    # normalize=True already L2-normalises; re-normalising in float32 removes fp16/bf16 drift.
    array = features.float().cpu().numpy()
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    return (array / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


def _sha256_prefix(path: Path, length: int = 12) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:length]


def _register_model(model: str) -> str:
    """Return the open_clip model name; a path to a config JSON is registered under its stem."""
    import open_clip

    if model.endswith(".json") or os.sep in model or Path(model).is_file():
        path = Path(model).expanduser()
        if not path.is_file():
            raise ConfigurationError(f"CLIP model config {path} does not exist", param="clip_model")
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigurationError(f"CLIP model config {path} is not valid JSON: {exc}") from exc
        if not all(key in config for key in ("embed_dim", "vision_cfg", "text_cfg")):
            raise ConfigurationError(
                f"CLIP model config {path} needs 'embed_dim', 'vision_cfg' and 'text_cfg' keys",
                param="clip_model",
            )
        open_clip.add_model_config(path)
        return path.stem
    if model not in open_clip.list_models():
        raise ConfigurationError(
            f"unknown CLIP model {model!r}; list the names with "
            "`python -c 'import open_clip; print(open_clip.list_models())'` "
            "or set VLMRAG_CLIP_MODEL to a path of an open_clip model-config JSON",
            param="clip_model",
        )
    return model


def _cached_tag_file(model: str, tag: str, cfg: dict[str, Any]) -> str | None:
    """Locate a tag's weights in the local caches without any network access."""
    from huggingface_hub import try_to_load_from_cache
    from open_clip.pretrained import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    hub = cfg.get("hf_hub", "")
    if hub:
        # open_clip's convention: "org/repo/" means the default file, "org/repo/file.bin" a named one.
        repo_id, filename = os.path.split(hub)
        filename = filename or HF_WEIGHTS_NAME
        candidates = [HF_SAFE_WEIGHTS_NAME, filename] if filename == HF_WEIGHTS_NAME else [filename]
        if filename.endswith(".bin"):
            candidates.insert(0, filename[:-4] + ".safetensors")
        for name in dict.fromkeys(candidates):
            found = try_to_load_from_cache(repo_id, name)
            if isinstance(found, str) and os.path.isfile(found):
                return found
    url = cfg.get("url", "")
    if url:
        path = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        if path.is_file():
            return str(path)
    return None


def _hub_reachable(timeout_s: float = 3.0) -> str | None:
    """None when the hub answers within ``timeout_s`` (DNS included), else why not."""
    import concurrent.futures

    import httpx

    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    # getaddrinfo cannot be cancelled, so the probe runs in a daemon-ish pool we do not wait for.
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    future = pool.submit(httpx.head, endpoint, timeout=timeout_s, follow_redirects=True)
    pool.shutdown(wait=False)
    try:
        future.result(timeout=timeout_s + 0.5)
    except concurrent.futures.TimeoutError:
        return f"{endpoint} did not answer within {timeout_s:.0f} s"
    except (httpx.HTTPError, OSError) as exc:  # any transport error means: no hub from here
        return f"{endpoint} is unreachable ({type(exc).__name__})"
    return None


def _download_tag_file(model: str, tag: str, cfg: dict[str, Any]) -> str:
    """Download a tag's weights through open_clip when the hub is reachable; else fail fast."""
    from open_clip.pretrained import download_pretrained

    why_not = _hub_reachable()
    if why_not is None:
        log.info("downloading CLIP weights for %s / %s (first use)", model, tag)
        try:
            target = download_pretrained(cfg)
        except (OSError, RuntimeError, ValueError) as exc:  # hub errors are OSError subclasses
            why_not = f"download failed: {exc}"
        else:
            if target and os.path.isfile(target):
                return str(target)
            why_not = "download returned no file"
    raise ConfigurationError(
        f"weights for CLIP model {model!r} pretrained tag {tag!r} are not in the local cache and "
        f"cannot be downloaded ({why_not}); {_HINT}",
        param="clip_pretrained",
    )


def _resolve(model: str, pretrained: str) -> _Resolved:
    """Turn (model, pretrained) settings into local-only open_clip arguments."""
    import open_clip

    name = _register_model(model)
    value = pretrained.strip()
    if value.lower() in ("", "none"):
        log.warning("CLIP model %s uses RANDOM weights (pretrained=none): for tests and demos only", name)
        return _Resolved(name, None, "none", {"pretrained_text": False})
    if value.startswith(_LOCAL_DIR):
        folder = Path(value[len(_LOCAL_DIR):]).expanduser()
        weights = next(
            (folder / f for f in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
             if (folder / f).is_file()), None,
        )
        if weights is None:
            raise ConfigurationError(
                f"{value}: no open_clip_model.safetensors or open_clip_pytorch_model.bin in {folder}",
                param="clip_pretrained",
            )
        label = f"{folder.name}-sha256-{_sha256_prefix(weights)}"
        if (folder / "open_clip_config.json").is_file():
            # The folder defines its own architecture and preprocessing; open_clip reads both.
            return _Resolved(f"{_LOCAL_DIR}{folder}", None, label, {})
        return _Resolved(name, str(weights), label, {})
    path = Path(value).expanduser()
    if path.suffix in _WEIGHT_SUFFIXES or path.exists():
        if not path.is_file():
            raise ConfigurationError(f"CLIP weights file {path} does not exist", param="clip_pretrained")
        return _Resolved(name, str(path), f"{path.stem}-sha256-{_sha256_prefix(path)}", {})
    cfg = open_clip.get_pretrained_cfg(name, value)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise ConfigurationError(
            f"{value!r} is not a pretrained tag of CLIP model {name!r} (known tags: {tags or 'none'}) "
            f"nor an existing weights file; {_HINT}",
            param="clip_pretrained",
        )
    found = _cached_tag_file(name, value, cfg) or _download_tag_file(name, value, cfg)
    # Loading the cached file by path skips the hub; keep the tag's preprocessing and activation.
    overrides: dict[str, Any] = {
        "image_mean": cfg.get("mean"), "image_std": cfg.get("std"),
        "image_interpolation": cfg.get("interpolation"), "image_resize_mode": cfg.get("resize_mode"),
    }
    if cfg.get("quick_gelu"):
        overrides["force_quick_gelu"] = True
    return _Resolved(name, found, value, {k: v for k, v in overrides.items() if v is not None})


def _pick_device(device: str) -> str:
    if device in ("", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigurationError(f"CLIP device {device!r} requested but CUDA is not available",
                                 param="clip_device")
    return device


def _identity(resolved: _Resolved) -> tuple[str, int, str, dict[str, Any]]:
    """(identity, dim, arch, model config) of resolved settings: from the config alone, no weights."""
    import open_clip

    if resolved.model_name.startswith(_LOCAL_DIR):
        folder = Path(resolved.model_name[len(_LOCAL_DIR):])
        config = json.loads((folder / "open_clip_config.json").read_text(encoding="utf-8"))
        model_config = dict(config.get("model_cfg", config))
        arch = folder.name
    else:
        found = open_clip.get_model_config(resolved.model_name)
        if not found:
            raise ConfigurationError(f"no open_clip config for CLIP model {resolved.model_name!r}", param="clip_model")
        model_config, arch = dict(found), resolved.model_name
    dim = int(model_config["embed_dim"])
    return f"open_clip:{arch}:{resolved.weights_label}:{dim}", dim, arch, model_config


def embedder_identity(model: str, pretrained: str) -> tuple[str, int]:
    """The identity and dimension ``load_embedder`` gives these settings, without building the model."""
    identity, dim, _, _ = _identity(_resolve(model, pretrained))
    return identity, dim


def load_embedder(
    model: str, pretrained: str, device: str = "auto", threads: int = 0, batch_size: int = 16, *,
    backend: Backend = "torch", onnx_cache_dir: Path | None = None, cache: EmbedCache | None = None,
    onnx_spinning: bool = False,
) -> ClipEmbedder:
    """Build a ClipEmbedder from settings; downloads a missing tag only if the hub answers fast.

    Args:
        backend: ``onnx`` exports (once, into ``onnx_cache_dir``) and runs ONNX Runtime on CPU; on a
            CUDA device it falls back to torch (only the CPU execution provider is installed).
        cache: the query-embedding cache used by ``embed_query_text``/``embed_query_images``.
        onnx_spinning: let ONNX Runtime's threads spin-wait between ops (retriever/clip_onnx.py::_session).
    """
    import open_clip

    if backend not in BACKENDS:
        raise ConfigurationError(f"unknown CLIP backend {backend!r}; expected one of {BACKENDS}",
                                 param="clip_backend")
    if threads > 0:
        torch.set_num_threads(threads)
    resolved = _resolve(model, pretrained)
    target = _pick_device(device)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_RANDOM_INIT_SEED)
            clip, _, preprocess = open_clip.create_model_and_transforms(
                resolved.model_name, pretrained=resolved.pretrained, device=target, **resolved.overrides,
            )
        tokenizer = open_clip.get_tokenizer(resolved.model_name)
    except ConfigurationError:
        raise
    except Exception as exc:  # open_clip raises RuntimeError/ValueError/KeyError for bad inputs
        raise ConfigurationError(
            f"could not load CLIP model {model!r} with pretrained {pretrained!r}: {exc}"
        ) from exc
    identity, dim, _arch, model_config = _identity(resolved)
    onnx = None
    if backend == "onnx" and target != "cpu":
        log.warning("VLMRAG_CLIP_BACKEND=onnx runs on CPU only; CLIP device %s uses torch", target)
    elif backend == "onnx":
        onnx = _load_onnx(clip, preprocess, tokenizer, identity, model_config, onnx_cache_dir, threads, onnx_spinning)
        clip = None  # the sessions hold the weights: drop torch's copy (else resident memory doubles)
        gc.collect()
        from retriever.clip_onnx import release_heap

        release_heap()
    log.info("loaded CLIP embedder %s on %s (%s)", identity, target, "onnxruntime" if onnx else "torch")
    return ClipEmbedder(clip, preprocess, tokenizer, identity=identity, dim=dim, device=target,
                        batch_size=batch_size, onnx=onnx, cache=cache)


def _load_onnx(
    clip: Any, preprocess: Callable[[Image.Image], torch.Tensor], tokenizer: Callable[[list[str]], torch.Tensor],
    identity: str, model_config: dict[str, Any], cache_dir: Path | None, threads: int, spinning: bool = False,
) -> OnnxClip:
    from retriever.clip_onnx import load_onnx_clip

    if cache_dir is None:
        raise ConfigurationError("the ONNX CLIP backend needs a cache folder for its export", param="clip_backend")
    image_size = tuple(preprocess(Image.new("RGB", (8, 8))).shape[-2:])  # what the transform makes
    return load_onnx_clip(clip.eval(), identity=identity, model_config=model_config,
                          image_size=(int(image_size[0]), int(image_size[1])), tokenize=tokenizer,
                          cache_dir=cache_dir, threads=threads, spinning=spinning)


def check_embedder_available(model: str, pretrained: str, device: str = "auto") -> None:
    """Fail fast with ConfigurationError when the model config, weights or device are not available.

    Resolves exactly as ``load_embedder`` does but builds no model (a startup preflight).
    """
    _resolve(model, pretrained)
    _pick_device(device)


__all__ = ["ClipEmbedder", "check_embedder_available", "load_embedder", "prepare_image"]
