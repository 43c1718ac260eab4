"""What the text embedder reads of one passage, section by section (the ``passage`` multi-vector).

One mean-pooled vector per passage blurs a page that lists several things: a page of three error
codes, whose symptoms a customer paraphrases one at a time, looks like every other page of the same
device. Measured with all-MiniLM-L6-v2 on bench_support's pages (benchmarks/README.md, "Section
vectors"), the text embedder's own list put the right page first for 0.42 of the paraphrases with one
vector per page and 0.56-0.61 with the sections below, scored by their best match (Qdrant's
multi-vector ``max_sim``).

``passage_sections(text)`` gives the texts to embed, in order:

1. the whole text (the passage vector as before; its windows when it is long), so the best section
   is never worse than the old single vector;
2. the heading, when the text has Markdown headings (a title alone matches "how do I ..." questions);
3. each sentence, table row or list item under the nearest heading, prefixed with that heading
   (``"AquaPure 2000: error codes E-100 to E-102: E-101 Descaling required ..."``), so a section
   keeps its context. Table separators and Markdown markup are dropped.

Never cut: beyond ``MAX_SECTIONS`` sentences, neighbouring sentences are merged into that many groups,
so every word still lands in a section. A text with one sentence and no heading has one vector.
"""

from __future__ import annotations

import re

MAX_SECTIONS = 24  # sentence sections per passage (plus the whole text and its headings)
_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$")
_TABLE_RULE = re.compile(r"^\s*\|?\s*:?-{2,}:?\s*(\|\s*:?-{2,}:?\s*)*\|?\s*$")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[^a-z0-9\s])")
_MARKUP = re.compile(r"[*_`>#]+|^\s*(?:[-+]|\d+[.)])\s+")
_MIN_LETTERS = 3


def _clean(line: str) -> str:
    """A line without Markdown markup; a table row's cells joined by spaces."""
    if line.lstrip().startswith("|"):
        line = " ".join(cell.strip() for cell in line.strip().strip("|").split("|") if cell.strip())
    return " ".join(_MARKUP.sub(" ", line).split())


def _sentences(line: str) -> list[str]:
    return [s for s in (part.strip() for part in _SENTENCE_END.split(line)) if sum(c.isalpha() for c in s) >= _MIN_LETTERS]


def _merge(units: list[tuple[str, str]], limit: int) -> list[tuple[str, str]]:
    """At most ``limit`` (heading, text) units: neighbours under the same heading joined, in order."""
    if len(units) <= limit:
        return units
    n = len(units)
    merged: list[tuple[str, str]] = []
    for i in range(limit):  # ``limit`` groups of neighbours, as even as the count allows
        group = units[i * n // limit:(i + 1) * n // limit]
        merged.append((group[0][0], " ".join(text for _, text in group)))  # under its first sentence's heading
    return merged


def passage_sections(text: str, max_sections: int = MAX_SECTIONS) -> list[str]:
    """The texts whose vectors make the passage multi-vector of ``text`` (see module); [] for a blank text."""
    whole = text.strip()
    if not whole:
        return []
    headings: list[str] = []
    units: list[tuple[str, str]] = []  # (nearest heading, sentence)
    heading = ""
    for raw in whole.splitlines():
        match = _HEADING.match(raw)
        if match:
            heading = _clean(match.group(1))
            if heading and heading not in headings:
                headings.append(heading)
            continue
        if not raw.strip() or _TABLE_RULE.match(raw):
            continue
        units.extend((heading, sentence) for sentence in _sentences(_clean(raw)))
    sections = [whole, *headings]
    for head, sentence in _merge(units, max_sections):
        sections.append(f"{head}: {sentence}" if head else sentence)
    out: list[str] = []
    for section in sections:  # unique, in order (a one-sentence text is just itself)
        if section not in out and (section != _clean(whole) or section == whole):
            out.append(section)
    return out


__all__ = ["MAX_SECTIONS", "passage_sections"]
