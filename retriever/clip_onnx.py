"""ONNX Runtime for the CLIP image and text towers: exported once from the loaded open_clip model.

``load_onnx_clip`` looks for an export in ``cache_dir/<key>/`` (``image.onnx``, ``text.onnx``,
``manifest.json``), the key derived from the embedder identity, the model config and the export
format, so another model or weights label never reuses it. Without one it exports the towers
(the TorchScript exporter, opset 17: it needs no onnxscript and gave the fastest graph) into a
temporary folder beside it and renames it into place, so a crash or a concurrent second process
never leaves half an export where the next start looks.

Every export, new or cached, is checked against the torch model on a few fixed inputs (both
towers, batch 1 and 2) before it is used: the largest absolute difference of the L2-normalised
vectors is logged, and above ``tolerance`` the export is refused. A cached export that disagrees
(tampered with, or written by other code) is discarded and exported again once; a fresh export
that disagrees raises ``ConfigurationError``. The embedder identity does not change: the vectors
are the same vector space, so collections need no re-index.

The sessions release the GIL while they run, so a query embedding in a worker thread leaves the
event loop free, as torch does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retriever.clip_text import TrimmedTextTower, trimmable, used_length
from retriever.errors import ConfigurationError

log = logging.getLogger(__name__)

#: bump when the exported graph changes (wrapper, opset, names): old cache entries are then ignored
#: (2: the text tower takes the used token columns only, ``retriever/clip_text.py``)
EXPORT_FORMAT = 2
OPSET = 17
#: max |onnx - torch| over the normalised vectors an export may show (float32 rounding is ~1e-6)
PARITY_TOLERANCE = 1e-4
IMAGE_FILE = "image.onnx"
TEXT_FILE = "text.onnx"
MANIFEST_FILE = "manifest.json"
_PARITY_TEXTS = ("a photo of a dog", "the pressure gauge on pump P-101 reads 4 bar", "x " * 200)


class _ImageTower(torch.nn.Module):
    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels, normalize=True)


class _TextTower(torch.nn.Module):
    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens, normalize=True)


def normalize_rows(array: np.ndarray) -> np.ndarray:
    """Float32 rows of unit length (the towers normalise already; this removes rounding drift)."""
    array = np.asarray(array, dtype=np.float32)
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    return (array / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


@dataclass(slots=True)
class OnnxClip:
    """The two ONNX Runtime sessions of one CLIP model; both return (N, dim) normalised float32."""

    image_session: Any  # onnxruntime.InferenceSession
    text_session: Any
    folder: Path
    max_diff: float  # of the parity check that admitted this export
    text_trim: bool = False  # the text graph takes the used token columns only (retriever/clip_text.py)

    def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        """Embed a preprocessed (N, C, H, W) float32 batch."""
        (out,) = self.image_session.run(None, {"pixels": np.ascontiguousarray(pixels, dtype=np.float32)})
        return normalize_rows(out)

    def encode_text(self, tokens: np.ndarray) -> np.ndarray:
        """Embed an (N, context_length) int64 token batch (cut to its used columns where the graph allows)."""
        if self.text_trim:
            tokens = tokens[:, :used_length(tokens)]
        (out,) = self.text_session.run(None, {"tokens": np.ascontiguousarray(tokens, dtype=np.int64)})
        return normalize_rows(out)


def release_heap() -> None:
    """Hand freed heap pages back to the OS (glibc only; elsewhere a no-op).

    Building a session parses the whole graph (weights included) into many small protobuf
    allocations that are freed once the initializers exist; glibc keeps those pages, which left the
    ONNX backend ~580 MiB above torch for ViT-B-32 (2.16 GiB RSS vs 1.51) until trimmed (1.58 GiB).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # musl, macOS: no malloc_trim
        return
    trim(0)


def export_key(identity: str, model_config: dict[str, Any]) -> str:
    """The cache folder name: a readable slug of the identity plus a hash of what shapes the graph."""
    material = json.dumps(
        {"identity": identity, "config": model_config, "format": EXPORT_FORMAT, "opset": OPSET,
         "torch": torch.__version__.split("+")[0]}, sort_keys=True, default=str,
    )
    slug = "".join(c if c.isalnum() or c in "-." else "-" for c in identity)[:80]
    return f"{slug}-{hashlib.sha256(material.encode()).hexdigest()[:16]}"


def _session(path: Path, threads: int, spinning: bool = False) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    # ORT's intra-op threads spin-wait between ops by default. Beside the event loop, an inline Edge
    # search and JSON work on few cores that steals the CPU they need: with a concurrent scan in the
    # process, text encode p50 41 ms without spinning vs 57 ms with, and the scan 220 vs 306 ms;
    # alone they tie (31 ms), see benchmarks/README.md. Dedicated cores: VLMRAG_CLIP_ONNX_SPINNING=true.
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = max(0, threads)  # 0 = one per physical core, ORT's default
    options.inter_op_num_threads = 1  # one query at a time per call; parallelism is inside the ops
    options.log_severity_level = 3  # ORT warns about every folded Shape op of a TorchScript export
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def _open(folder: Path, threads: int, max_diff: float = float("nan"), spinning: bool = False,
          text_trim: bool = False) -> OnnxClip:
    return OnnxClip(_session(folder / IMAGE_FILE, threads, spinning), _session(folder / TEXT_FILE, threads, spinning),
                    folder, max_diff, text_trim)


def _parity_inputs(image_size: tuple[int, int], tokenize: Callable[[list[str]], torch.Tensor]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1234)
    pixels = torch.randn((3, 3, *image_size), generator=generator)  # the range of normalised pixels
    return pixels, tokenize(list(_PARITY_TEXTS))


def parity_diff(model: Any, clip: OnnxClip, image_size: tuple[int, int],
                tokenize: Callable[[list[str]], torch.Tensor]) -> float:
    """Max |onnx - torch| of normalised vectors over a few images and texts, at batch 1 and 2 (texts of
    one length and of two, so a cut text graph is checked with padding inside its batch)."""
    pixels, tokens = _parity_inputs(image_size, tokenize)
    with torch.inference_mode():
        want_image = normalize_rows(model.encode_image(pixels, normalize=True).float().numpy())
        want_text = normalize_rows(model.encode_text(tokens, normalize=True).float().numpy())
    got_image = np.concatenate([clip.encode_image(pixels[:1].numpy()), clip.encode_image(pixels[1:].numpy())])
    got_text = np.concatenate([clip.encode_text(tokens[:1].numpy()), clip.encode_text(tokens[1:].numpy())])
    got_pair = clip.encode_text(tokens[:2].numpy())  # two short texts of different lengths
    if got_image.shape != want_image.shape or got_text.shape != want_text.shape:
        return float("inf")
    diff = max(float(np.abs(got_image - want_image).max()), float(np.abs(got_text - want_text).max()),
               float(np.abs(got_pair - want_text[:2]).max()))
    return diff if np.isfinite(diff) else float("inf")


def _export(model: Any, folder: Path, image_size: tuple[int, int],
            tokenize: Callable[[list[str]], torch.Tensor]) -> bool:
    """Both towers into ``folder``; True when the text graph takes the used token columns only."""
    pixels, tokens = _parity_inputs(image_size, tokenize)
    text_trim = trimmable(model)
    text: tuple[torch.nn.Module, torch.Tensor, dict[int, str]]
    if text_trim:  # the token axis is dynamic: the graph is fed the used columns only
        text = (TrimmedTextTower(model), tokens[:2, :used_length(tokens[:2])], {0: "batch", 1: "tokens"})
    else:
        text = (_TextTower(model), tokens[:2], {0: "batch"})
    # nn.MultiheadAttention's inference fast path (one fused aten op) has no ONNX symbolic: trace the
    # plain attention ops instead (ORT fuses them again).
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
            for tower, example, axes, name, path in (
                (_ImageTower(model), pixels[:2], {0: "batch"}, "pixels", folder / IMAGE_FILE),
                (*text, "tokens", folder / TEXT_FILE),
            ):
                torch.onnx.export(
                    tower.eval(), (example,), str(path), input_names=[name], output_names=["embedding"],
                    dynamic_axes={name: axes, "embedding": {0: "batch"}}, opset_version=OPSET,
                    dynamo=False, do_constant_folding=True,
                )
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return text_trim


def _write_manifest(folder: Path, identity: str, max_diff: float, seconds: float, text_trim: bool) -> None:
    import onnx
    import onnxruntime as ort

    manifest = {
        "identity": identity, "format": EXPORT_FORMAT, "opset": OPSET, "max_abs_diff": max_diff, "text_trim": text_trim,
        "export_seconds": round(seconds, 2), "torch": torch.__version__, "onnx": onnx.__version__,
        "onnxruntime": ort.__version__, "files": {f: (folder / f).stat().st_size for f in (IMAGE_FILE, TEXT_FILE)},
    }
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def _admit_cached(folder: Path, model: Any, identity: str, image_size: tuple[int, int],
                  tokenize: Callable[[list[str]], torch.Tensor], threads: int, tolerance: float,
                  spinning: bool = False) -> OnnxClip | None:
    """The cached export if it opens and agrees with torch; None (and the folder removed) if not."""
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
        if manifest.get("identity") != identity:
            raise ValueError(f"it was made for {manifest.get('identity')!r}")
        clip = _open(folder, threads, spinning=spinning, text_trim=bool(manifest.get("text_trim")))
        clip.max_diff = parity_diff(model, clip, image_size, tokenize)
    except Exception as exc:  # noqa: BLE001 - any unreadable export is simply made again
        log.warning("cached ONNX export %s is unusable (%s: %s): exporting again", folder, type(exc).__name__, exc)
    else:
        if clip.max_diff <= tolerance:
            log.info("ONNX export %s reused (max abs diff vs torch %.2e)", folder, clip.max_diff)
            return clip
        log.warning("cached ONNX export %s disagrees with torch (max abs diff %.2e > %.0e): exporting again",
                    folder, clip.max_diff, tolerance)
    shutil.rmtree(folder, ignore_errors=True)
    return None


def load_onnx_clip(
    model: Any, *, identity: str, model_config: dict[str, Any], image_size: tuple[int, int],
    tokenize: Callable[[list[str]], torch.Tensor], cache_dir: Path, threads: int = 0,
    tolerance: float = PARITY_TOLERANCE, spinning: bool = False,
) -> OnnxClip:
    """ONNX sessions for ``model`` (an open_clip CLIP on CPU), from the cache or exported now; parity-checked."""
    folder = Path(cache_dir) / export_key(identity, model_config)
    if (folder / MANIFEST_FILE).is_file():
        cached = _admit_cached(folder, model, identity, image_size, tokenize, threads, tolerance, spinning)
        if cached is not None:
            return cached
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        started = time.perf_counter()
        try:
            text_trim = _export(model, tmp, image_size, tokenize)
        except Exception as exc:  # the exporter raises many types for models it cannot trace
            raise ConfigurationError(
                f"could not export CLIP model {identity} to ONNX ({type(exc).__name__}: {exc}); "
                "set VLMRAG_CLIP_BACKEND=torch", param="clip_backend",
            ) from exc
        try:
            clip = _open(tmp, threads, spinning=spinning, text_trim=text_trim)
            clip.max_diff = parity_diff(model, clip, image_size, tokenize)
        except Exception as exc:  # ORT refusing the graph it was just given
            raise ConfigurationError(
                f"ONNX Runtime cannot run the export of CLIP model {identity} ({type(exc).__name__}: {exc}); "
                "set VLMRAG_CLIP_BACKEND=torch", param="clip_backend",
            ) from exc
        seconds = time.perf_counter() - started
        log.info("exported CLIP %s to ONNX in %.1f s: max abs diff vs torch %.2e (tolerance %.0e)",
                 identity, seconds, clip.max_diff, tolerance)
        if not clip.max_diff <= tolerance:
            raise ConfigurationError(
                f"the ONNX export of CLIP model {identity} disagrees with torch (max abs diff "
                f"{clip.max_diff:.2e} > {tolerance:.0e}); refusing it: set VLMRAG_CLIP_BACKEND=torch",
                param="clip_backend",
            )
        _write_manifest(tmp, identity, clip.max_diff, seconds, text_trim)
        try:
            os.rename(tmp, folder)  # atomic; fails when another process put its export there first
        except OSError:
            log.info("another process exported %s first; using this process's identical copy", folder)
            return clip  # the sessions hold the graphs in memory: the temporary files can go
        clip.folder = folder
        return clip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = [
    "PARITY_TOLERANCE", "OnnxClip", "export_key", "load_onnx_clip", "normalize_rows", "parity_diff", "release_heap",
]
