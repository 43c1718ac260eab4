"""Services hold the work and import no web framework: the CLI, tests and a second transport call them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NO_WEB = [*sorted((ROOT / "server" / "services").glob("*.py")), ROOT / "server" / "limits.py",
          ROOT / "server" / "message_parts.py"]


def _imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", NO_WEB, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_fastapi_or_starlette(path: Path) -> None:
    assert not _imported(path) & {"fastapi", "starlette"}


def test_routes_hold_no_suffix_dispatch() -> None:
    """Only retriever/ingest/readers.py decides what a file suffix means (one table, READERS)."""
    for path in sorted((ROOT / "server").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        assert "IMAGE_SUFFIXES" not in text and "TEXT_SUFFIXES" not in text, path
