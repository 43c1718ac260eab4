"""The evidence-aware no-model relevancy (retriever/evidence.py): identifiers decide, flat lists are weak."""

from __future__ import annotations

import random

from retriever import lexical
from retriever.evidence import (
    NO_IDENTIFIER_CAP,
    PASSAGE_SPAN,
    _features,
    evidence_relevancy,
    query_identifiers,
)
from retriever.types import Candidate, SnippetPayload


def cand(cid: str, text: str = "", ocr: str = "", **scores: float) -> Candidate:
    return Candidate(cid, SnippetPayload(kind="text", text=text, ocr_text=ocr), 0.5,
                     {name.replace("_", "->"): v for name, v in scores.items()})


def test_query_identifiers_use_the_bm25_tokenization() -> None:
    assert query_identifiers("what does E-417 mean?", "") == {"e417"}
    assert query_identifiers("", "ERROR E-417\nAquaPure 2000") == {"e417"}  # from the photo's OCR text
    assert query_identifiers("my pump stops", "") == set()


def test_an_exact_identifier_match_is_near_certain_and_a_neighbour_is_not() -> None:
    pool = [cand("exact", "| E-417 | pump overheated | let it cool |", text_text=0.1),
            cand("neighbour", "| E-471 | filter blocked | clean it |", text_text=0.9),
            cand("photo", "", "ERROR E-417", image_image=0.2)]
    scores = evidence_relevancy("what does E-417 mean?", "", pool)
    assert scores["exact"] >= 0.95 and scores["photo"] >= 0.95  # text or OCR text: the same evidence
    assert scores["neighbour"] <= NO_IDENTIFIER_CAP  # a close cosine does not make E-471 answer E-417


def test_a_code_the_kb_does_not_hold_keeps_nothing_at_the_default_threshold() -> None:
    pool = [cand(str(i), f"| E-10{i} | fault {i} | do {i} |", text_text=0.3 + 0.05 * i) for i in range(6)]
    scores = evidence_relevancy("my AquaPure shows E-107", "", pool)
    assert max(scores.values()) < 0.5


def test_words_count_when_the_query_names_no_identifier() -> None:
    pool = [cand("match", "When the pump overheats, let it cool for 20 minutes."),
            cand("other", "Clean the filter monthly."), cand("third", "Use the grey cable.")]
    scores = evidence_relevancy("the pump overheats", "", pool)
    assert scores["match"] > 0.5 > scores["other"]
    off_topic = evidence_relevancy("what is the weather in Paris tomorrow?", "", pool)
    assert max(off_topic.values()) < 0.5


def test_a_flat_dense_list_is_weak_and_a_standout_is_strong() -> None:
    flat = [cand(str(i), image_image=0.80 + 0.001 * i) for i in range(10)]
    scores = evidence_relevancy("", "", flat)
    assert max(scores.values()) < 0.5
    peaked = [*flat, cand("same", image_image=0.995)]
    assert evidence_relevancy("", "", peaked)["same"] > 0.9


async def test_the_evidence_scorer_is_registered_and_reads_the_query_photos_ocr_text() -> None:
    """Through RerankService by name: the code read from the query photo decides, as the chat service passes it."""
    from retriever.plan import RetrievalPlan
    from retriever.rerank import RerankService

    pool = [cand("page", "| E-417 | pump overheated | let it cool |", text_text=0.1),
            cand("other", "| E-471 | filter blocked | clean it |", text_text=0.9)]
    service = RerankService(None, lambda c: None)
    plan = RetrievalPlan(k=5, threshold=0.5, scorer="evidence")
    out = await service.rerank("what does this mean?", [], pool, plan, image_text="ERROR E-417")
    assert [c.id for c in out.kept] == ["page"] and out.scorer == "evidence"
    blind = await service.rerank("what does this mean?", [], [cand("page", "| E-417 | pump |", text_text=0.1),
                                                              cand("other", "| E-471 |", text_text=0.9)], plan)
    assert [c.id for c in blind.kept] != ["page"]  # without the photo's text nothing singles the page out


def test_the_text_embedders_list_counts_on_its_own_band() -> None:
    """A sentence model's paraphrase scores ~0.45 against a median of ~0.15: strong for it, weak for CLIP."""
    others = [0.12, 0.14, 0.15, 0.15, 0.16, 0.18]
    passage = [cand("guide", "Hold the ON button for three seconds.", text_passage=0.15 + PASSAGE_SPAN * 0.75),
               *(cand(f"p{i}", f"unrelated page {i}", text_passage=c) for i, c in enumerate(others))]
    scores = evidence_relevancy("the electricity went out and now nothing happens", "", passage)
    assert scores["guide"] > 0.5 > max(v for k, v in scores.items() if k != "guide")
    clip = [cand("guide", "Hold the ON button for three seconds.", text_image=0.15 + PASSAGE_SPAN * 0.75),
            *(cand(f"p{i}", f"unrelated page {i}", text_image=c) for i, c in enumerate(others))]
    assert evidence_relevancy("the electricity went out and now nothing happens", "", clip)["guide"] < 0.5


def test_the_one_pass_text_features_equal_bm25_and_the_identifier_keys_apart() -> None:
    """``_features`` walks a text's identifiers once for BM25's expansion and the identifier keys; it must
    give exactly the two computations it replaces, on tricky texts (slashes, ordinals, non-ASCII digits,
    underscores, stop-word parts, long part lists) and random ones."""
    def apart(text: str) -> tuple[frozenset[int], frozenset[str]]:
        return frozenset(lexical.document_vector(text).indices), frozenset(query_identifiers(text))

    texts = ["", "  \n ", "pump P-100-A error E-417/E-418 on the 2nd try, v2.3.1 and/or x_E-9 A1-B2-C3-D4-E5-F6-G7",
             "E 417 E417 e-417. 1st 22nd 3rd-4 ٣-٤ x²y ß-12 ﬁ-3 Σ1 İ-2 a—1 b–2 H2O/CO2 well-known 10/20/30"]
    rng = random.Random(0)
    alphabet = [*"aAbE-._/ 0123456789xzVv²½٣Σİ_—\n,;:()'st", "1st", "E-417/E-418", "v2.3.1", "P-100-A"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(3000)]
    for text in texts:
        assert _features(text) == apart(text), text
