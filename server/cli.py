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

# Order is the order shown in --help.
COMMAND_MODULES = (
    "server.commands.serve",
    "server.commands.ingest",
    "server.commands.search",
    "server.commands.stats",
    "server.commands.delete",
    "server.commands.eval",
    "server.commands.reindex",
    "server.commands.keygen",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlmrag", description="Multimodal RAG: CLIP retrieval over Qdrant, VLM re-ranking, answers via vLLM."
    )
    parser.add_argument("--data-dir", help="Overrides VLMRAG_DATA_DIR.")
    parser.add_argument("-v", "--verbose", action="store_true", help="Debug logging.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:  # a command not built yet must not break the others
            if exc.name != name:
                raise
            continue
        module.register(subparsers)
    return parser


def settings_problems(exc: ValidationError) -> str:
    """``VLMRAG_PORT: Input should be a valid integer; ...`` (messages only: values may be secrets)."""
    problems = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error.get("loc") else ""
        problems.append(f"VLMRAG_{field.upper()}: {error['msg']}" if field else str(error["msg"]))
    return "; ".join(problems)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
        return int(args.func(args, settings) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except VlmragError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2 if isinstance(exc, InvalidInput) else 1


if __name__ == "__main__":
    sys.exit(main())
