"""``vlmrag feedback export [--kb K] [--format jsonl|csv] [--since T] [--rating up|down] [--output FILE]``.

Reads the feedback database directly (the same ``AnswerLog`` the server writes, see server/feedback.py), so
it works while ``vlmrag serve`` runs. Newest ratings first. ``jsonl``: one ``FeedbackRecord`` per line, the
answer's record nested under ``answer``. ``csv``: one row per rating with the columns of ``CSV_COLUMNS``;
the list and object columns (``CSV_JSON_COLUMNS``) hold JSON. ``--since`` takes epoch seconds or an ISO
date/time (UTC unless it names a zone).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from datetime import UTC, datetime
from typing import IO, Any

from retriever.errors import InvalidInput
from server.feedback import RATINGS, AnswerLog, FeedbackRecord
from server.settings import Settings

CSV_COLUMNS = (
    "completion_id", "kb", "key_id", "rating", "comment", "snippet_ids", "rated_at",
    "question", "answer", "search_query", "sources", "model", "settings", "answered_at", "verification",
)
CSV_JSON_COLUMNS = ("snippet_ids", "sources", "settings", "verification")


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("feedback", help="Export the ratings of answers.", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    export = actions.add_parser("export", help="Ratings with their answers' records, as JSON lines or CSV.")
    # its own dest: the global --kb must name a KB that exists, an export may be of a deleted one
    export.add_argument("--kb", dest="feedback_kb", metavar="KB", help="Only this knowledge base's answers.")
    export.add_argument("--format", choices=("jsonl", "csv"), default="jsonl")
    export.add_argument("--since", help="Only ratings at or after this time (epoch seconds or ISO date).")
    export.add_argument("--rating", choices=RATINGS)
    export.add_argument("--output", "-o", help="Write here instead of stdout.")
    parser.set_defaults(func=run)


def parse_since(text: str | None) -> float | None:
    """Epoch seconds or an ISO date/time (naive = UTC) → epoch seconds."""
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text)
    except ValueError as exc:
        raise InvalidInput(f"--since {text!r} is neither epoch seconds nor an ISO date/time") from exc
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def csv_row(record: FeedbackRecord) -> dict[str, Any]:
    """One rating as a flat CSV row (JSON in ``CSV_JSON_COLUMNS``)."""
    a = record.answer
    row: dict[str, Any] = {
        "completion_id": record.completion_id, "kb": record.kb, "key_id": record.key_id, "rating": record.rating,
        "comment": record.comment or "", "snippet_ids": record.snippet_ids, "rated_at": repr(record.rated_at),
        "question": a.question, "answer": a.answer, "search_query": a.search_query or "", "sources": a.sources,
        "model": a.model, "settings": a.settings, "answered_at": repr(a.created_at), "verification": a.verification,
    }
    for name in CSV_JSON_COLUMNS:
        row[name] = json.dumps(row[name], ensure_ascii=False)
    return row


def write_records(records: Iterable[FeedbackRecord], fmt: str, out: IO[str]) -> int:
    """Write ``records`` as ``fmt``; returns how many."""
    count = 0
    if fmt == "csv":
        writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for record in records:
            writer.writerow(csv_row(record))
            count += 1
    else:
        for record in records:
            out.write(json.dumps(record.public(), ensure_ascii=False) + "\n")
            count += 1
    return count


def _output(path: str | None) -> AbstractContextManager[IO[str]]:
    return open(path, "w", encoding="utf-8", newline="") if path else nullcontext(sys.stdout)


def run(args: argparse.Namespace, settings: Settings) -> int:
    since = parse_since(args.since)
    kb = args.feedback_kb or args.kb
    answer_log = AnswerLog.from_settings(settings)
    try:
        with _output(args.output) as out:
            count = write_records(answer_log.export(kb, since, args.rating), args.format, out)
    finally:
        answer_log.close()
    if args.output:
        print(f"exported {count} rating(s) to {args.output}", file=sys.stderr)
    return 0
