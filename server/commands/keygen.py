"""``vlmrag keygen``: print a new random API key and the hashed entry for ``VLMRAG_API_KEYS``.

``--env-file PATH`` writes ``VLMRAG_API_KEYS=<entry>`` into a dotenv file instead (``make run`` on a
fresh checkout), so only the hash is stored and the key itself is shown once on the terminal.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
from pathlib import Path

from retriever.errors import InvalidInput
from server.auth import SCOPES, hash_key
from server.settings import Settings

KEY_PREFIX = "vlmrag-"  # a recognisable prefix lets secret scanners spot leaked keys
ENV_VAR = "VLMRAG_API_KEYS"
_ENV_LINE = re.compile(rf"^\s*(export\s+)?{ENV_VAR}\s*=", re.MULTILINE)


def generate_key() -> str:
    """A new API key: the prefix plus 256 random bits, URL-safe."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def config_entry(key: str, scope: str) -> str:
    """The ``VLMRAG_API_KEYS`` entry for ``key`` (its SHA-256, never the key itself)."""
    return f"{scope}:sha256:{hash_key(key)}"


def write_env_entry(path: Path, entry: str) -> None:
    """Append ``VLMRAG_API_KEYS=<entry>`` to the dotenv file ``path`` (created owner-only).

    Refuses when the file already sets the variable: a second line would silently replace its keys.
    """
    path = Path(path)
    existing = path.read_text(encoding="utf-8") if path.exists() else ""
    if _ENV_LINE.search(existing):
        raise InvalidInput(f"{path} already sets {ENV_VAR}; add this entry to it by hand: {entry}",
                           param="env_file")
    prefix = "" if not existing or existing.endswith("\n") else "\n"
    # 0600: the file holds only the key's hash, but other settings in it may be secrets.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as handle:
        handle.write(f"{prefix}# created by `vlmrag keygen`: the hash of an API key, never the key\n"
                     f"{ENV_VAR}={entry}\n")


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "keygen", help="Create an API key and print its VLMRAG_API_KEYS entry.",
        description="Prints a new random API key (give it to the client) and the hashed entry to "
                    "append to VLMRAG_API_KEYS (comma-separated) or to the keys file it names.",
    )
    parser.add_argument("--scope", choices=[*SCOPES, "chat+admin"], default="chat",
                        help="chat: chat/ask/search/models; admin: also ingest/delete/stats (default chat).")
    parser.add_argument("--quiet", action="store_true",
                        help="Print only 'KEY ENTRY' on one line (only KEY with --env-file).")
    parser.add_argument("--env-file", type=Path, metavar="PATH",
                        help=f"Write '{ENV_VAR}=<entry>' into this dotenv file (created if missing; refused "
                             f"if it already sets {ENV_VAR}) and print only the key.")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    key = generate_key()
    entry = config_entry(key, args.scope)
    if args.env_file is not None:
        write_env_entry(args.env_file, entry)
        if args.quiet:
            print(key)
            return 0
        print(f"Wrote the {args.scope} key's hashed entry to {args.env_file} ({ENV_VAR}).")
        print(f"API key (shown only this once, not stored anywhere; save it now): {key}")
        print(f"Clients send it as 'Authorization: Bearer {key}'.")
        return 0
    if args.quiet:
        print(key, entry)
        return 0
    print(f"API key (give to the client; shown once, not stored): {key}")
    print(f"Config entry (add to VLMRAG_API_KEYS):                {entry}")
    return 0
