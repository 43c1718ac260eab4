"""BM25 sparse vectors for the ``lexical`` named vector, identical for both store adapters.

The vectors come from Qdrant Edge's ``Bm25`` (the same token ids and term weights as Qdrant's
server-side BM25); the collection's ``lexical`` sparse vector carries the IDF modifier, so the
store multiplies in the inverse document frequency at search time and a document vector never has
to be recomputed when the collection grows. Both adapters are fed the vectors built here, which is
what makes their lexical rankings congruent.

Identifiers. Its ``word`` tokenizer splits on every non-alphanumeric character: ``E-417`` becomes
``e`` + ``417`` (so a query for ``E-417`` scores an ``E-418`` page through ``e``), ``P-100-A``
loses ``a`` (an English stop word), ``v2.3.1`` becomes ``v2`` ``3`` ``1``, while ``E417`` stays
one token that ``E-417`` never produces. So before embedding, the text is given extra tokens for
every identifier (an alphanumeric run with at least one digit, optionally joined by ``-._/``):
its parts split at separators *and* letter/digit boundaries, and the joins of each contiguous run
of two or more parts (``P-100-B``: ``p100``, ``p100b``, ``100b``). Only the tokens the tokenizer
would not produce from the identifier itself are added, so ``E-417``, ``E417`` and ``e 417`` all
end up as the token set {``e``, ``417``, ``e417``} with the same term frequencies: matchable
whole (the rare joined token, high IDF) and by parts. The same expansion runs on documents and
queries (``document_vector`` / ``query_vector``), which is all the consistency BM25 needs.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import lru_cache

from retriever.types import SnippetPayload, SparseVector

#: Expected document length in tokens for BM25's length normalisation: snippets range from a
#: caption or a display's OCR text (~10 tokens) to a manual page (~400); the default 256 would
#: treat nearly every snippet as "short". Fixed at indexing time: changing it needs a reindex.
AVG_DOC_TOKENS = 128.0
#: Identity of the tokenisation + weighting; stored vectors are only comparable within one.
LEXICAL_MODEL_ID = f"qdrant-bm25:word:english:k1.2:b0.75:avg{AVG_DOC_TOKENS:g}:ids1"
#: Identifiers with more parts than this (hashes, serial numbers) get only their full join:
#: their parts and partial joins would grow quadratically and carry no meaning.
MAX_IDENTIFIER_PARTS = 6
#: Cap on the text embedded per snippet (characters); BM25 of a huge page stays bounded in time.
MAX_TEXT_CHARS = 200_000

# An identifier candidate: alphanumeric runs joined by single separators ("E-417", "v2.3.1").
_CANDIDATE = re.compile(r"[^\W_]+(?:[-._/][^\W_]+)*")
# Pieces the word tokenizer makes of one candidate (it splits on every non-alphanumeric char).
_WORD_PIECE = re.compile(r"[^\W_]+")
# Letter/digit runs inside a piece: "E417" -> "E", "417".
_PART = re.compile(r"\d+|[^\W\d_]+")
_ASCII_DIGIT = re.compile(r"[0-9]")


def identifier_matches(text: str) -> Iterator[tuple[re.Match[str], list[str]]]:
    """Each identifier in ``text`` (an alphanumeric run with a digit, two or more parts) and its lowercase parts.

    ``E-417`` -> ``["e", "417"]``, ``v2.3.1`` -> ``["v", "2", "3", "1"]``; the answer checker
    (``retriever/verify.py``) finds identifiers exactly as BM25 expands them here.
    """
    for match in _CANDIDATE.finditer(text):
        candidate = match.group(0)
        # "well-known", "and/or": words, not identifiers (the ASCII test first: most words, in C)
        if not (_ASCII_DIGIT.search(candidate) if candidate.isascii() else any(ch.isdigit() for ch in candidate)):
            continue
        parts = [part.lower() for part in _PART.findall(candidate)]
        if len(parts) < 2:
            continue  # "417", "pump": the tokenizer already has the whole thing
        yield match, parts


def identifier_tokens(text: str) -> list[str]:
    """Extra tokens for the identifiers in ``text`` (lowercase), in order, repeats kept per occurrence."""
    extra: list[str] = []
    for match, parts in identifier_matches(text):
        add_identifier_tokens(extra, match.group(0), parts)
    return extra


def add_identifier_tokens(extra: list[str], candidate: str, parts: list[str]) -> None:
    """Append the extra tokens of one identifier (``candidate``, its ``parts``) to ``extra``."""
    produced = {piece.lower() for piece in _WORD_PIECE.findall(candidate)}
    if len(parts) > MAX_IDENTIFIER_PARTS:
        wanted = ["".join(parts)]
    else:
        wanted = parts + ["".join(parts[i:j]) for i in range(len(parts)) for j in range(i + 2, len(parts) + 1)]
    seen: set[str] = set()
    for token in wanted:
        if token not in produced and token not in seen:
            seen.add(token)
            extra.append(token)


def with_identifier_tokens(text: str, extra: list[str]) -> str:
    """``text`` followed by the identifier tokens ``extra``: the string BM25 embeds."""
    return f"{text}\n{' '.join(extra)}" if extra else text


def expand_identifiers(text: str) -> str:
    """``text`` followed by its identifier tokens (see module docstring); what BM25 embeds."""
    text = text[:MAX_TEXT_CHARS]
    return with_identifier_tokens(text, identifier_tokens(text))


@lru_cache(maxsize=1)
def _bm25():  # -> qdrant_edge.Bm25 (one per process; thread-safe, stateless after construction)
    import qdrant_edge as qe

    return qe.Bm25(qe.Bm25Config(avg_len=AVG_DOC_TOKENS))


def _convert(vector) -> SparseVector:
    return SparseVector(indices=list(vector.indices), values=[float(v) for v in vector.values])


def document_vector(text: str) -> SparseVector:
    """BM25 document vector (term-frequency weights) of a snippet's text; empty for no tokens."""
    if not text or not text.strip():
        return SparseVector([], [])
    return _convert(_bm25().embed_document(expand_identifiers(text)))


def document_token_ids(expanded: str) -> frozenset[int]:
    """The token ids of ``document_vector`` for a text already through ``expand_identifiers`` (no weights)."""
    if not expanded or not expanded.strip():
        return frozenset()
    return frozenset(_bm25().embed_document(expanded).indices)


def query_vector(text: str) -> SparseVector:
    """BM25 query vector (weight 1.0 per distinct token); empty when nothing is left to match."""
    if not text or not text.strip():
        return SparseVector([], [])
    return _convert(_bm25().embed_query(expand_identifiers(text)))


def snippet_lexical(payload: SnippetPayload) -> SparseVector | None:
    """The ``lexical`` vector of a stored snippet: its text and the text read from its image; None if empty."""
    vector = document_vector(f"{payload.text}\n{payload.ocr_text}".strip())
    return vector if len(vector) else None
