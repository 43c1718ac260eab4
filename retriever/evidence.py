"""Evidence-aware relevancy without a model: what every list found, on one documented scale.

The ``clip`` scorer's relevancy, (1 + best cosine) / 2, ignores the BM25 and OCR evidence that found
a candidate, so its threshold is a rank cut. This scorer reads the evidence itself, from the query
(its text and the text OCR read from its images) and the candidate (its text and OCR text):

* **Identifiers decide when the query names any** (codes, part numbers, versions; the same
  identifier tokenization as BM25 and the answer check, ``retriever/verify.py::identifier_facts``).
  A candidate holding all of them scores in [0.95, 1.0]; some of them in [0.6, 0.9) by the share
  held; none of them at most ``NO_IDENTIFIER_CAP`` (0.3): a question about ``E-417`` is not
  answered by the page of ``E-471``, however similar it looks.
* **Otherwise words and similarity**: ``coverage`` is the share of the query's BM25 tokens (stemmed,
  stop words out) the candidate holds, giving 0.1 + 0.8 x coverage; a dense list's cosine counts by
  how far it stands out of its own list, (c - median) / (1 - median), giving 0.2 + 0.75 x that, so
  a flat list (every display photo looks alike to CLIP; random weights) is weak evidence and a
  near-identical image strong; the text embedder's list (``text->passage``) counts by
  (c - median) / ``PASSAGE_SPAN``, its cosines' own band. The candidate gets the larger of the two.

So ``threshold`` means the same in every mode: 0.5 keeps a candidate that holds the query's
identifiers, shares most of its words, or is a clear outlier of a dense list; a question the KB
cannot answer (a code it does not hold, an off-topic question) keeps nothing.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from functools import lru_cache

from retriever import lexical
from retriever.types import Candidate, SnippetPayload

ALL_IDENTIFIERS = 0.95  # every identifier of the query held: [0.95, 1.0] by word coverage
SOME_IDENTIFIERS = 0.6  # some held: [0.6, 0.9) by the share held
NO_IDENTIFIER_CAP = 0.3  # the query names identifiers the candidate lacks: at most this
WORDS_FLOOR, WORDS_SPAN = 0.1, 0.8  # no identifiers in the query: 0.1 + 0.8 x coverage
DENSE_FLOOR, DENSE_SPAN = 0.2, 0.75  # 0.2 + 0.75 x how far the cosine stands out of its list
#: The text embedder's list (``text->passage``): a sentence model's cosines live in a narrower band than
#: CLIP's self-matches (a paraphrase scores 0.3-0.6, never ~1.0), so its standout is (c - median) /
#: PASSAGE_SPAN: 0.2 above the list's median is half-way (0.575), 0.4 above it full (0.95).
#: Chosen on bench_support.py seed 0 (all-MiniLM-L6-v2); held-out seeds in benchmarks/README.md.
PASSAGE_SPAN = 0.4
PASSAGE_LIST = "->passage"  # retriever/store/base.py::PASSAGE_VECTOR (not imported: settings import this module)


def query_identifiers(*texts: str) -> set[str]:
    """The identifier keys (``E-417`` -> ``e417``) in the query's text and its images' OCR text."""
    from retriever.verify import identifier_facts

    return {key for text in texts if text for _start, _end, key in identifier_facts(text)}


def payload_text(payload: SnippetPayload) -> str:
    """The text a snippet's evidence is read from: its text and the text read from its image."""
    return f"{payload.text or ''}\n{payload.ocr_text or ''}"


def _candidate_text(candidate: Candidate) -> str:
    return payload_text(candidate.payload)


FEATURE_CACHE_ENTRIES = 4096  # snippet texts whose features are kept (texts up to FEATURE_CACHE_CHARS)
FEATURE_CACHE_CHARS = 16_384  # a longer text (a long page) is worked out each time: the cache stays ~100 MB at most


def text_features(text: str) -> tuple[frozenset[int], frozenset[str]]:
    """A snippet text's BM25 token ids and identifier keys. The same snippets come back query after
    query (and the ``evidence`` fusion scores every list's hits), so short texts are worked out once."""
    return _cached_features(text) if len(text) <= FEATURE_CACHE_CHARS else _features(text)


def _features(text: str) -> tuple[frozenset[int], frozenset[str]]:
    """``(frozenset(lexical.document_vector(text).indices), frozenset(query_identifiers(text)))`` in one
    pass over the text's identifiers: BM25's expansion and the identifier keys find the same ones."""
    from retriever.verify import _identifiers, match_facts

    if len(text) > lexical.MAX_TEXT_CHARS:  # BM25 reads a cut text, the identifiers the whole: apart
        return frozenset(lexical.document_vector(text).indices), frozenset(query_identifiers(text))
    extra: list[str] = []
    keys: set[str] = set()
    for match, offset, parts in _identifiers(text):
        lexical.add_identifier_tokens(extra, match.group(0), parts)
        keys.update(key for _start, _end, key in match_facts(match, offset, parts))
    return lexical.document_token_ids(lexical.with_identifier_tokens(text, extra)), frozenset(keys)


_cached_features = lru_cache(maxsize=FEATURE_CACHE_ENTRIES)(_features)


def _coverage(query_tokens: set[int], held: frozenset[int]) -> float:
    if not query_tokens:
        return 0.0
    return len(query_tokens & held) / len(query_tokens)


def _dense_standout(candidates: Sequence[Candidate]) -> dict[str, float]:
    """Per candidate, its best (c - median) / (1 - median) over the dense lists that returned it, in [0, 1]."""
    lists: dict[str, list[float]] = {}
    for cand in candidates:
        for name, score in cand.vector_scores.items():
            if not name.endswith("->lexical"):
                lists.setdefault(name, []).append(score)
    medians = {name: statistics.median(scores) for name, scores in lists.items() if len(scores) >= 3}
    out: dict[str, float] = {}
    for cand in candidates:
        best = 0.0
        for name, score in cand.vector_scores.items():
            median = medians.get(name)
            if median is None or median >= 1.0:
                continue
            span = PASSAGE_SPAN if name.endswith(PASSAGE_LIST) else 1.0 - median
            best = max(best, (score - median) / span)
        out[cand.id] = min(1.0, max(0.0, best))
    return out


def evidence_relevancy(query_text: str, image_text: str, candidates: Sequence[Candidate]) -> dict[str, float]:
    """Relevancy in [0, 1] per candidate id from the query's identifiers, words and the dense lists (see module)."""
    wanted = query_identifiers(query_text, image_text)
    query_tokens = set(lexical.query_vector(f"{query_text}\n{image_text}".strip()).indices)
    standout = _dense_standout(candidates)
    scores: dict[str, float] = {}
    for cand in candidates:
        tokens, identifiers = text_features(_candidate_text(cand))
        coverage = _coverage(query_tokens, tokens)
        words = WORDS_FLOOR + WORDS_SPAN * coverage
        dense = DENSE_FLOOR + DENSE_SPAN * standout[cand.id]
        if wanted:
            held = len(wanted & identifiers) / len(wanted)
            if held >= 1.0:
                score = ALL_IDENTIFIERS + (1.0 - ALL_IDENTIFIERS) * coverage
            elif held > 0:
                score = SOME_IDENTIFIERS + 0.3 * held
            else:
                score = min(NO_IDENTIFIER_CAP, max(words, dense))
        else:
            score = max(words, dense)
        scores[cand.id] = round(min(1.0, max(0.0, score)), 6)
    return scores
