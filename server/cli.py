"""The ``vlmrag`` command line: one subcommand per module under ``server/commands/``.

Each command module defines ``register(subparsers) -> None`` which adds its parser and sets
``func=run`` where ``run(args, settings) -> int`` returns the exit code. Errors from the vlmrag
error tree are printed as one line (no stack trace) and mapped to exit codes here.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from retriever.errors import InvalidInput, VlmragError
from server.settings import Settings

# name -> (module, one-line help). Order is the order shown in --help. Only the module of the
# command being run is imported: most of them pull in torch and qdrant-client (seconds), which
# `vlmrag --help` or `vlmrag keygen` should not pay for.
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("server.commands.serve", "Run the HTTP API (OpenAI-compatible chat, search, snippets)."),
    "ingest": ("server.commands.ingest", "Add images, text, JSONL, COCO captions or PDFs to the knowledge base."),
    "search": ("server.commands.search", "CLIP search of the knowledge base (text and/or image)."),
    "stats": ("server.commands.stats", "Knowledge-base statistics."),
    "delete": ("server.commands.delete", "Delete snippets by source or id."),
    "eval": ("server.commands.eval", "Evaluate CLIP vs re-ranked adaptive selection on a COCO-captions set."),
    "reindex": ("server.commands.reindex", "Re-embed the knowledge base with a new CLIP model, no downtime."),
    "optimize": ("server.commands.optimize", "Build HNSW for the embedded store (through the server when one holds it)."),
    "backfill-lexical": ("server.commands.backfill_lexical", "Add BM25 (lexical) vectors to an older collection."),
    "keygen": ("server.commands.keygen", "Create an API key and print its VLMRAG_API_KEYS entry."),
    "kb": ("server.commands.kb", "Create, list, show, update and delete knowledge bases."),
    "feedback": ("server.commands.feedback", "Export the ratings of answers (JSON lines or CSV)."),
    "mcp": ("server.commands.mcp", "Serve the knowledge base as MCP tools over stdio (for Claude Desktop, Cursor, ...)."),
}
COMMAND_MODULES = tuple(module for module, _ in COMMANDS.values())


def chosen_command(argv: Sequence[str]) -> str | None:
    """The subcommand named in ``argv`` (skipping global options), or None."""
    skip_next = False
    for arg in argv:
        if skip_next:
            skip_next = False
        elif arg in ("--data-dir", "--kb"):
            skip_next = True
        elif not arg.startswith("-"):
            return arg if arg in COMMANDS else None
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The CLI parser; with ``command`` only that command's module is imported (others get stubs)."""
    parser = argparse.ArgumentParser(
        prog="vlmrag", description="Multimodal RAG: CLIP retrieval over Qdrant, VLM re-ranking, answers via vLLM."
    )
    parser.add_argument("--data-dir", help="Overrides VLMRAG_DATA_DIR.")
    parser.add_argument("--kb", help="The knowledge base ingest, search, stats, delete, reindex work on (default: default).")
    parser.add_argument("-v", "--verbose", action="store_true", help="Debug logging.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, summary) in COMMANDS.items():
        if command is None or name == command:
            importlib.import_module(module_name).register(subparsers)
        else:
            subparsers.add_parser(name, help=summary)
    return parser


def settings_problems(exc: ValidationError) -> str:
    """``VLMRAG_PORT: Input should be a valid integer; ...`` (messages only: values may be secrets)."""
    problems = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error.get("loc") else ""
        problems.append(f"VLMRAG_{field.upper()}: {error['msg']}" if field else str(error["msg"]))
    return "; ".join(problems)


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(chosen_command(arguments) or "")
    args = parser.parse_args(arguments)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    overrides = {"data_dir": args.data_dir} if args.data_dir else {}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:  # a bad VLMRAG_* value: one line naming the variables, no trace
        print(f"error: invalid settings: {settings_problems(exc)}", file=sys.stderr)
        return 2
    try:
        if args.kb:
            from server.knowledge_bases import settings_for_kb

            settings = settings_for_kb(settings, args.kb)
        return int(args.func(args, settings) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except VlmragError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2 if isinstance(exc, InvalidInput) else 1


if __name__ == "__main__":
    sys.exit(main())
