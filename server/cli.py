"""The ``vlmrag`` command line: one subcommand per module under ``server/commands/``.

Each command module defines ``register(subparsers) -> None`` which adds its parser and sets
``func=run`` where ``run(args, settings) -> int`` returns the exit code. Errors from the vlmrag
error tree are printed as one line (no stack trace) and mapped to exit codes here.

The global options (``--data-dir``, ``--kb``, ``-v``) go before or after the command
(``vlmrag ingest --kb pumps manuals/`` is ``vlmrag --kb pumps ingest manuals/``). Logs go to stderr:
ours from INFO, other libraries' (open_clip's "Parsing model identifier", httpx's requests…) only
from WARNING, unless ``-v`` shows everything from DEBUG.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

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
    "backfill-passage": ("server.commands.backfill_passage", "Add the text embedder's passage vectors to a collection."),
    "keygen": ("server.commands.keygen", "Create an API key and print its VLMRAG_API_KEYS entry."),
    "kb": ("server.commands.kb", "Create, list, show, update and delete knowledge bases."),
    "feedback": ("server.commands.feedback", "Export the ratings of answers (JSON lines or CSV)."),
    "backup": ("server.commands.backup", "Write a consistent archive of the knowledge bases (points, blobs, rows)."),
    "restore": ("server.commands.restore", "Restore a backup archive into a new version, switched atomically."),
    "mcp": ("server.commands.mcp", "Serve the knowledge base as MCP tools over stdio (for Claude Desktop, Cursor, ...)."),
}
COMMAND_MODULES = tuple(module for module, _ in COMMANDS.values())
# The loggers of our packages: INFO and up is shown; other libraries' only from WARNING (without -v).
OWN_LOGGERS = ("server", "retriever", "prompts")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_GLOBAL_OPTIONS: tuple[tuple[tuple[str, ...], dict[str, Any]], ...] = (
    (("--data-dir",), {"default": None, "help": "Overrides VLMRAG_DATA_DIR."}),
    (("--kb",), {"default": None,
                 "help": "The knowledge base ingest, search, stats, delete, reindex work on (default: default)."}),
    (("-v", "--verbose"), {"action": "store_true", "default": False,
                           "help": "Debug logging, other libraries' INFO and DEBUG logs included."}),
)


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
    add_global_options(parser)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, summary) in COMMANDS.items():
        if command is None or name == command:
            importlib.import_module(module_name).register(subparsers)
        else:
            subparsers.add_parser(name, help=summary)
    for sub in _subparsers_under(parser):
        add_global_options(sub.add_argument_group("global options (also before the command)"), after_command=True)
    return parser


def add_global_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, *, after_command: bool = False) -> None:
    """``--data-dir``, ``--kb``, ``-v``; after the command, one the command has itself (``feedback export --kb``)
    stays the command's."""
    taken = set(parser._option_string_actions)  # a group shares its parser's
    for flags, options in _GLOBAL_OPTIONS:
        if not taken.intersection(flags):
            # SUPPRESS after the command: an option not given there leaves the one given before it alone.
            parser.add_argument(*flags, **{**options, **({"default": argparse.SUPPRESS} if after_command else {})})


def _subparsers_under(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """Every command's parser, and their actions' (``kb create``, ``feedback export``…)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):  # aliases share a parser
                yield sub
                yield from _subparsers_under(sub)


@contextmanager
def cli_logging(verbose: bool) -> Iterator[None]:
    """Logs to stderr for one command: ours from INFO, other libraries' from WARNING (all from DEBUG if verbose).

    Undone on exit, so ``main`` called in-process (tests) leaves logging as it found it.
    """
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    if not verbose:
        handler.addFilter(_own_or_warning)
    previous = root.level
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)


def _own_or_warning(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or record.name.partition(".")[0] in OWN_LOGGERS


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
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    with cli_logging(args.verbose):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
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
