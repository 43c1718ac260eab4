"""A tiny open_clip architecture (ViT width 64, 2 layers, 64 px; text width 64) for tests.

With ``pretrained="none"`` ``load_embedder`` builds it with seeded random weights in ~60 ms, so
vectors are deterministic across processes. Usage: ``python tests/support/tiny_clip.py DEST_DIR``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TINY_CLIP_NAME = "vlmrag-tiny-clip"
TINY_CLIP_DIM = 32

TINY_CLIP_CONFIG: dict[str, object] = {
    "embed_dim": TINY_CLIP_DIM,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def write_tiny_clip_config(dest_dir: Path, name: str = TINY_CLIP_NAME) -> Path:
    """Write the tiny model-config JSON into ``dest_dir`` and return its path (stem = model name)."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    path = dest_dir / f"{name}.json"
    path.write_text(json.dumps(TINY_CLIP_CONFIG, indent=2) + "\n", encoding="utf-8")
    return path


if __name__ == "__main__":
    print(write_tiny_clip_config(Path(sys.argv[1] if len(sys.argv) > 1 else ".")))
