"""Evaluation: metrics on hand-built cases with known answers, and the COCO harness end to end."""

from __future__ import annotations

import base64
import io
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from retriever.errors import InvalidInput, ModelUnavailable
from retriever.eval.coco import CocoEval, EvalConfig, kb_image_loader, load_coco
from retriever.eval.metrics import (
    FAMILY_CLIP_THRESHOLD,
    FAMILY_RERANK,
    FAMILY_TOPK,
    Method,
    QueryRecord,
    ScoredItem,
    auto_clip_thresholds,
    evaluate_method,
    pool_recall,
    recall_at,
)
from retriever.rerank import RerankService

# ------------------------------------------------------------------------------ metrics, exactly
#   q1: relevant a, in the pool at rank 2;  q2: relevant x at rank 1;  q3: relevant z not in the pool
RECORDS = [
    QueryRecord("q1", frozenset({"a"}), [ScoredItem("b", 0.9, 0.60, 0.2), ScoredItem("a", 0.8, 0.58, 0.9),
                                         ScoredItem("c", 0.7, 0.55, 0.6)], retrieval_ms=10, rerank_ms=100),
    QueryRecord("q2", frozenset({"x"}), [ScoredItem("x", 0.9, 0.62, 0.4), ScoredItem("y", 0.8, 0.57, 0.8)],
                retrieval_ms=20, rerank_ms=200),
    QueryRecord("q3", frozenset({"z"}), [ScoredItem("u", 0.9, 0.59, 0.1), ScoredItem("v", 0.8, 0.52, 0.3)],
                retrieval_ms=30, rerank_ms=300),
]


def check(method: Method, *, tp: int, kept: int, precision: float | None, recall: float, f1: float,
          hit: float, mean_kept: float, empty: float, p50: float, p95: float) -> None:
    r = evaluate_method(RECORDS, method)
    assert (r.true_positives, r.kept_total, r.relevant_total, r.queries) == (tp, kept, 3, 3)
    assert r.precision == (None if precision is None else pytest.approx(precision))
    assert (r.recall, r.f1, r.hit_rate) == (pytest.approx(recall), pytest.approx(f1), pytest.approx(hit))
    assert (r.mean_kept, r.empty_rate) == (pytest.approx(mean_kept), pytest.approx(empty))
    assert (r.latency_p50_ms, r.latency_p95_ms) == (pytest.approx(p50), pytest.approx(p95))


def test_clip_top_1() -> None:
    check(Method("top1", FAMILY_TOPK, 1), tp=1, kept=3, precision=1 / 3, recall=1 / 3, f1=1 / 3, hit=1 / 3,
          mean_kept=1, empty=0, p50=20, p95=29)


def test_clip_top_3_keeps_what_the_pool_has() -> None:
    check(Method("top3", FAMILY_TOPK, 3), tp=2, kept=7, precision=2 / 7, recall=2 / 3, f1=0.4, hit=2 / 3,
          mean_kept=7 / 3, empty=0, p50=20, p95=29)


def test_clip_map_threshold() -> None:
    check(Method("clip", FAMILY_CLIP_THRESHOLD, 5, 0.58), tp=2, kept=4, precision=0.5, recall=2 / 3, f1=4 / 7,
          hit=2 / 3, mean_kept=4 / 3, empty=0, p50=20, p95=29)


def test_rerank_threshold_pays_scoring_latency() -> None:
    check(Method("rr", FAMILY_RERANK, 5, 0.5), tp=1, kept=3, precision=1 / 3, recall=1 / 3, f1=1 / 3,
          hit=1 / 3, mean_kept=1, empty=1 / 3, p50=220, p95=319)


def test_rerank_margin_and_k() -> None:
    check(Method("rr", FAMILY_RERANK, 5, 0.5, margin=0.25), tp=1, kept=2, precision=0.5, recall=1 / 3, f1=0.4,
          hit=1 / 3, mean_kept=2 / 3, empty=1 / 3, p50=220, p95=319)
    check(Method("rr", FAMILY_RERANK, 1, 0.0), tp=1, kept=3, precision=1 / 3, recall=1 / 3, f1=1 / 3,
          hit=1 / 3, mean_kept=1, empty=0, p50=220, p95=319)


def test_nothing_kept_has_undefined_precision() -> None:
    check(Method("rr", FAMILY_RERANK, 5, 0.95), tp=0, kept=0, precision=None, recall=0, f1=0, hit=0,
          mean_kept=0, empty=1, p50=220, p95=319)


def test_pool_recall_recall_at_and_auto_thresholds() -> None:
    assert pool_recall(RECORDS) == pytest.approx(2 / 3)
    assert (recall_at(RECORDS, 1), recall_at(RECORDS, 2)) == (pytest.approx(1 / 3), pytest.approx(2 / 3))
    grid = auto_clip_thresholds(RECORDS, count=5)
    values = sorted(c.clip_relevancy for r in RECORDS for c in r.candidates)
    assert len(grid) == 5 and grid == sorted(grid) and values[0] <= grid[0] < grid[-1] <= values[-1]


# ---------------------------------------------------------------------- a COCO set on disk
COLORS = [(220, 30, 30), (30, 200, 40), (40, 60, 220), (230, 220, 30), (200, 40, 210), (30, 210, 220)]
SAMPLE = Path(__file__).parent / "data" / "vllm_samples"


def write_coco(root: Path, n: int = 6, captions: int = 2) -> Path:
    """n solid-colour PNGs, ``captions`` captions each naming the colour index; returns the JSON path."""
    images_dir = root / "val"
    images_dir.mkdir(parents=True)
    images, annotations = [], []
    for i in range(n):
        Image.new("RGB", (48, 48), COLORS[i]).save(images_dir / f"img{i}.png")
        images.append({"id": 100 + i, "file_name": f"img{i}.png"})
        for j in range(captions):
            annotations.append({"id": 1000 + 10 * i + j, "image_id": 100 + i, "caption": f"colour {i}, view {j}"})
    path = root / "captions_val.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path


def test_load_coco_limits_images_and_captions(tmp_path: Path) -> None:
    path = write_coco(tmp_path, n=4, captions=3)
    image_ids, queries = load_coco(path, limit=2, captions_per_image=2)
    assert image_ids == ["100", "101"]
    assert [(q.query_id, q.image_id) for q in queries] == [("1000", "100"), ("1001", "100"), ("1010", "101"),
                                                           ("1011", "101")]
    with pytest.raises(InvalidInput):
        load_coco(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"images": 3}')
    with pytest.raises(InvalidInput):
        load_coco(tmp_path / "bad.json")


class ColourJudge:
    """A ChatBackend that answers truthfully: Yes iff the snippet image has the colour the query names."""

    def __init__(self, *, down: bool = False) -> None:
        self.down = down
        self.calls = 0

    async def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        self.calls += 1
        if self.down:
            raise ModelUnavailable("vLLM is down")
        parts = body["messages"][0]["content"]
        wanted = int(re.search(r"colour (\d+)", "".join(p.get("text", "") for p in parts)).group(1))  # type: ignore[union-attr]
        url = [p["image_url"]["url"] for p in parts if p["type"] == "image_url"][-1]
        pixel = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB").getpixel((5, 5))
        yes = 0.97 if pixel == COLORS[wanted] else 0.02
        top = [{"token": "Yes", "logprob": math.log(yes)}, {"token": "No", "logprob": math.log(1 - yes - 0.01)}]
        return {"choices": [{"index": 0, "logprobs": {"content": [{"token": "Yes", "top_logprobs": top}]}}]}

    async def tokenize(self, text: str) -> list[int]:
        raise AssertionError("the fallback path is not expected here")


@pytest.fixture
async def kb(tmp_path: Path, embedder: Any) -> Any:
    from server.wiring import build_knowledge_base
    from tests.support.settings import bare_settings

    base = await build_knowledge_base(bare_settings(data_dir=tmp_path / "kb", collection="eval"), embedder=embedder)
    yield base
    await base.close()


async def test_harness_with_clip_scorer_writes_reports(tmp_path: Path, kb: Any) -> None:
    coco = write_coco(tmp_path / "coco")
    out = tmp_path / "out"
    config = EvalConfig(coco, pool=6, k=3, scorer="clip", thresholds=(0.3, 0.6))
    outcome = await CocoEval(kb, RerankService(None, kb_image_loader(kb)), config, out, progress=False).run()
    assert outcome.summary["dataset"]["images"] == 6 and outcome.summary["dataset"]["queries"] == 12
    assert outcome.summary["dataset"]["ingested"] == 6
    assert outcome.summary["pool_recall"] == 1.0  # pool = every image
    assert outcome.summary["score_paths"] == {"clip": 72}
    by_name = {r.name: r for r in outcome.results}
    for n in (1, 3, 5):
        top = by_name[f"clip top-{n}"]
        assert top.mean_kept == n and top.precision == pytest.approx(top.hit_rate / n)
        assert top.recall == pytest.approx(outcome.summary["clip_recall_at"].get(str(n), top.recall))
    assert [r.family for r in outcome.results].count(FAMILY_RERANK) == 2
    assert [r.family for r in outcome.results].count(FAMILY_CLIP_THRESHOLD) == 9
    document = json.loads((out / "results.json").read_text())
    assert [m["name"] for m in document["methods"]] == [r.name for r in outcome.results]
    table = (out / "results.md").read_text()
    assert table.count("| clip top-") == 3 and "| rerank ≥0.60 (≤3) |" in table
    assert (out / "pr_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = (out / "records.jsonl").read_text().splitlines()
    assert len(rows) == 12 and all(len(json.loads(r)["candidates"]) == 6 for r in rows)


async def test_harness_with_a_truthful_judge_computes_exact_numbers_and_resumes(tmp_path: Path, kb: Any) -> None:
    coco = write_coco(tmp_path / "coco")
    out = tmp_path / "out"
    config = EvalConfig(coco, pool=6, k=3, scorer="vlm", thresholds=(0.5, 0.99), rerank_model="judge")
    judge = ColourJudge()
    outcome = await CocoEval(kb, RerankService(judge, kb_image_loader(kb)), config, out, progress=False).run()
    assert judge.calls == 72  # 12 queries x pool of 6
    rr = {r.threshold: r for r in outcome.results if r.family == FAMILY_RERANK}
    assert (rr[0.5].precision, rr[0.5].recall, rr[0.5].f1, rr[0.5].mean_kept) == (1.0, 1.0, 1.0, 1.0)
    assert (rr[0.99].precision, rr[0.99].recall, rr[0.99].empty_rate) == (None, 0.0, 1.0)
    assert outcome.summary["score_paths"] == {"top_logprobs": 72}

    # A second run scores nothing again (the cache answers) and reports the same numbers.
    down = ColourJudge(down=True)
    again = await CocoEval(kb, RerankService(down, kb_image_loader(kb)), config, out, progress=False).run()
    assert down.calls == 0 and again.summary["dataset"]["skipped_existing"] == 6
    assert [r.to_dict() | {"latency_p50_ms": 0, "latency_p95_ms": 0} for r in again.results] == \
        [r.to_dict() | {"latency_p50_ms": 0, "latency_p95_ms": 0} for r in outcome.results]

    # Another configuration in the same OUTDIR is refused unless fresh.
    other = EvalConfig(coco, pool=4, k=3, scorer="vlm", rerank_model="judge")
    with pytest.raises(InvalidInput):
        await CocoEval(kb, RerankService(judge, kb_image_loader(kb)), other, out, progress=False).run()


async def test_degraded_queries_are_not_cached_and_answers_are_recorded(tmp_path: Path, kb: Any) -> None:
    coco = write_coco(tmp_path / "coco", n=3, captions=1)
    out = tmp_path / "out"
    config = EvalConfig(coco, pool=3, k=2, scorer="vlm", rerank_model="judge", answer_threshold=0.5)
    seen: list[tuple[str, int]] = []

    async def answer(question: str, kept: list[Any]) -> str:
        seen.append((question, len(kept)))
        return f"answer to {question}"

    down = await CocoEval(kb, RerankService(ColourJudge(down=True), kb_image_loader(kb)), config, out,
                          progress=False).run()
    assert down.summary["degraded_queries"] == 3 and not (out / "records.jsonl").exists()
    good = await CocoEval(kb, RerankService(ColourJudge(), kb_image_loader(kb)), config, out,
                          answer_fn=answer, progress=False).run()
    assert good.summary["degraded_queries"] == 0
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert [(a["query"], a["kept"], a["answer"]) for a in answers] == [
        (f"colour {i}, view 0", [str(100 + i)], f"answer to colour {i}, view 0") for i in range(3)
    ]
    assert seen == [(f"colour {i}, view 0", 1) for i in range(3)]
