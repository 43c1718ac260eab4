"""Fixtures live in tests/support/fixtures_*.py, one module per area, registered here."""

pytest_plugins = [
    "tests.support.fixtures_retriever",
    "tests.support.fixtures_vllm",
    "tests.support.fixtures_server",
    "tests.support.fixtures_browser",
    "tests.support.fixtures_mcp",
    "tests.support.fixtures_postgres",
]
