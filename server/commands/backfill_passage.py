"""``vlmrag backfill-passage [--no-switch] [--drop-old] [--json]``: give a collection made before the text
embedder its ``passage`` vector (``VLMRAG_TEXT_EMBEDDER``), with no downtime.

A re-index to the CLIP model the collection already has: the next version is built beside the served one
(CLIP and BM25 vectors recomputed, ``passage`` vectors embedded from the stored text and OCR text), then
served by an alias switch (Qdrant server) or an atomic ``__current`` symlink swap (embedded; neither Edge
nor a Qdrant server adds a named vector to an existing collection). Interrupted: run it again, it resumes.
Takes ``--kb`` like every command: ``vlmrag --kb pumps backfill-passage``.
"""

from __future__ import annotations

import argparse

from server.commands import reindex
from server.settings import Settings


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("backfill-passage", help="Add the text embedder's passage vectors to a collection.",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-switch", action="store_true", help="Build the new version but keep serving the old.")
    parser.add_argument("--drop-old", action="store_true", help="Then delete every version but the served one.")
    parser.add_argument("--batch-size", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    args.to, args.pretrained, args.same_model = settings.clip_model, settings.clip_pretrained, True
    args.needs_text_embedder = True
    return reindex.run(args, settings)
