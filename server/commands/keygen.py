"""``vlmrag keygen``: print a new random API key and the hashed entry for ``VLMRAG_API_KEYS``."""

from __future__ import annotations

import argparse
import secrets

from server.auth import SCOPES, hash_key
from server.settings import Settings

KEY_PREFIX = "vlmrag-"  # a recognisable prefix lets secret scanners spot leaked keys


def generate_key() -> str:
    """A new API key: the prefix plus 256 random bits, URL-safe."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def config_entry(key: str, scope: str) -> str:
    """The ``VLMRAG_API_KEYS`` entry for ``key`` (its SHA-256, never the key itself)."""
    return f"{scope}:sha256:{hash_key(key)}"


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "keygen", help="Create an API key and print its VLMRAG_API_KEYS entry.",
        description="Prints a new random API key (give it to the client) and the hashed entry to "
                    "append to VLMRAG_API_KEYS (comma-separated) or to the keys file it names.",
    )
    parser.add_argument("--scope", choices=[*SCOPES, "chat+admin"], default="chat",
                        help="chat: chat/ask/search/models; admin: also ingest/delete/stats (default chat).")
    parser.add_argument("--quiet", action="store_true", help="Print only 'KEY ENTRY' on one line.")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    key = generate_key()
    entry = config_entry(key, args.scope)
    if args.quiet:
        print(key, entry)
        return 0
    print(f"API key (give to the client; shown once, not stored): {key}")
    print(f"Config entry (add to VLMRAG_API_KEYS):                {entry}")
    return 0
