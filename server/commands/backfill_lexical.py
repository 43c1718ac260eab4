"""``vlmrag backfill-lexical [--no-switch] [--drop-old] [--json]``: give a collection made before BM25 its
``lexical`` vector, with no downtime.

A re-index to the model the collection already has: the next version is built beside the served one
(vectors recomputed, BM25 vectors made from the stored text and OCR text), then served by an alias switch
(Qdrant server) or an atomic ``__current`` symlink swap (embedded; Edge cannot add a vector to an
existing shard). Takes ``--kb`` like every command: ``vlmrag --kb pumps backfill-lexical``.
"""

from __future__ import annotations

import argparse

from server.commands import reindex
from server.settings import Settings


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("backfill-lexical", help="Add BM25 (lexical) vectors to an older collection.",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-switch", action="store_true", help="Build the new version but keep serving the old.")
    parser.add_argument("--drop-old", action="store_true", help="Then delete every version but the served one.")
    parser.add_argument("--batch-size", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    args.to, args.pretrained, args.same_model = settings.clip_model, settings.clip_pretrained, True
    return reindex.run(args, settings)
