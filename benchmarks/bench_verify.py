"""The answer check on the support knowledge base: detection recall of swapped identifiers and numbers,
false flags on correct answers, cost per 200-word answer; and the model check's plumbing (tiny vLLM).

    .venv/bin/python benchmarks/bench_verify.py                 # lexical only (~10 s)
    .venv/bin/python benchmarks/bench_verify.py --model-check   # + the model check against the tiny CPU vLLM
    .venv/bin/python benchmarks/bench_verify.py --model-check --url http://gpu:8000 --model Qwen/Qwen2.5-VL-3B-Instruct

Data: ``benchmarks/support_kb.py`` (ground truth by construction; the checker was not tuned on it:
its rules come from the issue and the BM25 tokenizer, and the generator predates it). For every
error code, part and firmware version of the catalogue, a **correct** answer of ~200 words is
built from the page that lists it: the facts of its row(s) (code, meaning, remedy with its
numbers and units; part number and kind; version and note) in the answer's own wording
(``E417`` for ``E-417``, ``2.3.1`` for ``v2.3.1``, ``30 min`` for ``30 minutes``, ``2 years`` for
``two years``, a quoted ``"MAX"``), most sentences citing ``[1]`` and some citing nothing, padded with
support prose that states no fact. The kept context is that page ([1]) plus two distractor pages
(a neighbouring page of the same device, with neighbouring codes, and a random one). Each correct
answer then gets **swapped** copies: one identifier or number replaced by a near neighbour of the
kinds in the issue (``E-417 -> E-471`` transposition, ``P-417-B -> P-471-B``, ``v2.3.1 -> v2.3.7``
last digit, ``30 min -> 300 min`` / ``2 years -> 20 years`` a digit added). A swap that lands on a
token the sentence's sources contain anyway (the neighbouring code on the same page) is a true
statement to a lexical check; those are counted apart, not in the recall.

- detection recall: swapped answers with at least one claim ``supported: false`` (goal >= 0.95), and
  the share whose flagged token is exactly the swapped one;
- false flags: correct answers with any claim ``supported: false`` (goal <= 0.05);
- cost: ``verify_lexical`` on one answer with its three snippets (indexing included), p50/p95 in ms
  over every answer, against the goal of 2 ms p50 per 200-word answer; ``--repeat`` passes.

``--model-check`` sends the correct and swapped answers of ``--model-answers`` codes through
``Verifier.check(mode="model")`` against a real vLLM (the tiny random-weights model by default:
its verdicts are noise, so only the plumbing is measured: requests per answer, latency, score paths,
failures).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# benchmarks/ itself is on sys.path when this runs as a script
from support_kb import FAULTS, build_support_kb

from retriever.verify import ClaimCheck, SourceText, verify_lexical

GOAL_RECALL = 0.95
GOAL_FALSE_FLAGS = 0.05
GOAL_P50_MS = 2.0
TARGET_WORDS = 200
FILLER = (
    "I am sorry to hear that the unit is giving you trouble.",
    "This is a common situation and it can usually be solved at home.",
    "Please follow the steps below in order and do not skip any of them.",
    "Make sure the unit is placed on a flat and stable surface before you start.",
    "If you are unsure about any step, contact our support team before going further.",
    "Keep the manual at hand while you work through the checks.",
    "Most customers solve this without calling a technician.",
    "Let us know if the problem comes back after these steps.",
    "Do not open the housing yourself: only the parts named here are meant to be replaced by users.",
    "Unplug the unit before you touch anything inside it.",
    "Write down what the display shows in case you need to call us.",
    "Thank you for your patience while you work through this.",
)


@dataclass(slots=True)
class Case:
    answer: str
    sources: list[SourceText]
    swapped: str = ""  # the token put in ("" for a correct answer)
    original: str = ""
    kind: str = ""


# ------------------------------------------------------------------------------------------ answers
def _page_rows(text: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| Code") and not line.startswith("| Part")]


def _reword(text: str, rng: random.Random) -> str:
    """The answer's own wording of a page's facts: the spellings the checker must treat as equal."""
    if rng.random() < 0.5:
        text = re.sub(r"\b(\d+) minutes\b", r"\1 min", text)
    if rng.random() < 0.5:
        text = text.replace("two years", "2 years")
    if rng.random() < 0.3:
        text = re.sub(r"\bE-(\d+)\b", r"E\1", text)
    if rng.random() < 0.3:
        text = re.sub(r"\bv(\d+\.\d+\.\d+)\b", r"version \1", text)
    if rng.random() < 0.5:
        text = text.replace("the MAX mark", 'the "MAX" mark')
    return text


def _answer(facts: list[str], rng: random.Random) -> str:
    """~200 words: the fact sentences (mostly citing [1], some citing nothing) among fact-free prose."""
    sentences = [f[:-1] + " [1]." if rng.random() < 0.8 else f for f in facts]
    filler = rng.sample(FILLER, len(FILLER))
    out = [filler.pop()]
    for sentence in sentences:
        out.append(sentence)
        if filler and rng.random() < 0.7:
            out.append(filler.pop())
    while sum(len(s.split()) for s in out) < TARGET_WORDS:
        out.append(filler.pop() if filler else rng.choice(FILLER))
    return " ".join(out)


def correct_cases(devices: int, seed: int) -> list[Case]:
    """One correct answer per code, part and firmware version, with its page and two distractors as sources."""
    rng = random.Random(seed)
    snippets, _queries = build_support_kb(devices, seed=seed, display_photos_per_code=0, part_photos=False)
    pages = [s for s in snippets if s.kind == "page"]
    cases: list[Case] = []
    for i, page in enumerate(pages):
        device = page.text.split(":", 1)[0].removeprefix("## ")
        same_device = [p for p in pages if p is not page and p.text.startswith(f"## {device}:")]
        others = [p for p in pages if p is not page and p not in same_device]
        distractors = [rng.choice(same_device) if same_device else rng.choice(others), rng.choice(others)]
        sources = [SourceText(n, p.text) for n, p in enumerate([page, *distractors], start=1)]
        facts: list[list[str]] = []
        if "error codes" in page.text:
            for code, meaning, remedy in _page_rows(page.text):
                facts.append([f"Error {code} on the {device} means: {meaning.lower()}.", remedy])
        elif "spare parts" in page.text:
            for number, kind, _fits in _page_rows(page.text):
                facts.append([f"The {kind} of the {device} has the part number {number}.",
                              f"Order {number} by its part number."])
        elif "firmware" in page.text:
            for version, note in re.findall(r"\*\*(v[\d.]+)\*\*: ([^\n]+)\.", page.text):
                facts.append([f"Firmware {version} of the {device} brings this change: {note}.",
                              "Update over Wi-Fi from the settings menu."])
        else:  # care pages: their numbers ("10 cm", "two years") are the facts
            facts.append([line for line in page.text.splitlines()[2:] if line.strip()][:1])
        for fact in facts:
            cases.append(Case(_answer([_reword(s, rng) for s in fact], rng), sources))
        if not facts:
            raise AssertionError(f"page {i} gave no facts")
    return cases


_SWAPPABLE = (
    ("code", re.compile(r"\bE-?(\d{3})\b")),
    ("part", re.compile(r"\bP-(\d{3})-[A-D]\b")),
    ("version", re.compile(r"\b(?:v|version )\d+\.\d+\.(\d)\b")),
    ("quantity", re.compile(r"\b(\d+|two) (min|minutes|cm|years)\b")),
)


def _swap_digits(digits: str, rng: random.Random) -> str:
    """A near neighbour: the last two digits transposed, else the last one changed."""
    if len(digits) >= 2 and digits[-1] != digits[-2]:
        return digits[:-2] + digits[-1] + digits[-2]
    return digits[:-1] + str((int(digits[-1]) + rng.randint(1, 8)) % 10)


def swapped_cases(correct: list[Case], seed: int) -> list[Case]:
    """For each correct answer and each kind of token it has, one copy with one such token swapped."""
    rng = random.Random(seed + 1)
    out: list[Case] = []
    for case in correct:
        for kind, pattern in _SWAPPABLE:
            found = list(pattern.finditer(case.answer))
            if not found:
                continue
            match = rng.choice(found)
            token = match.group(0)
            if kind == "quantity":
                number = "2" if match.group(1) == "two" else match.group(1)
                new = token.replace(match.group(1), number + str(rng.randint(0, 9)), 1)  # 2 min -> 20 min
            else:
                start, end = match.span(1)
                new = token[: start - match.start()] + _swap_digits(match.group(1), rng) + token[end - match.start():]
            answer = case.answer[: match.start()] + new + case.answer[match.end():]
            out.append(Case(answer, case.sources, swapped=new, original=token, kind=kind))
    return out


# --------------------------------------------------------------------------------------------- lexical
def _flagged(claims: list[ClaimCheck]) -> list[str]:
    return [token for c in claims if c.supported is False for token in c.unsupported]


def _lands_on_a_source(case: Case, claims: list[ClaimCheck]) -> bool:
    """The swapped token is one the sentence's sources contain (a same-page neighbour): lexically true."""
    at = case.answer.find(case.swapped)
    claim = next((c for c in claims if c.start <= at < c.end), None)
    if claim is None:
        return False
    return all(f.supported for f in claim.facts if f.start <= at < f.end or at <= f.start < at + len(case.swapped))


def lexical_report(correct: list[Case], swapped: list[Case], repeat: int) -> dict[str, float]:
    false_flags = [c for c in correct if _flagged(verify_lexical(c.answer, c.sources))]
    detected = exact = on_source = 0
    by_kind: dict[str, list[int]] = {}
    missed: list[Case] = []
    for case in swapped:
        claims = verify_lexical(case.answer, case.sources)
        flagged = _flagged(claims)
        if not flagged and _lands_on_a_source(case, claims):
            on_source += 1
            continue
        hit = bool(flagged)
        detected += hit
        exact += any(case.swapped in token or token in case.swapped for token in flagged)
        by_kind.setdefault(case.kind, [0, 0])
        by_kind[case.kind][0] += hit
        by_kind[case.kind][1] += 1
        if not hit:
            missed.append(case)
    scored = len(swapped) - on_source
    times: list[float] = []
    for _ in range(repeat):
        for case in [*correct, *swapped]:
            started = time.perf_counter()
            verify_lexical(case.answer, case.sources)
            times.append((time.perf_counter() - started) * 1000)
    words = statistics.mean(len(c.answer.split()) for c in correct)
    recall = detected / scored
    false_rate = len(false_flags) / len(correct)
    p50 = statistics.median(times)
    p95 = statistics.quantiles(times, n=20)[-1]
    print(f"\ncorrect answers: {len(correct)} (mean {words:.0f} words, 3 snippets each); swapped: {len(swapped)} "
          f"({on_source} land on a token their sources contain: lexically true, left out of the recall)")
    print("| measure | value | goal |")
    print("|---|---:|---:|")
    print(f"| detection recall (swapped answers flagged) | {recall:.3f} ({detected}/{scored}) | >= {GOAL_RECALL} |")
    print(f"| flagged token is the swapped one | {exact / scored:.3f} | |")
    for kind, (hit, n) in sorted(by_kind.items()):
        print(f"| recall, {kind} swaps | {hit / n:.3f} ({hit}/{n}) | |")
    print(f"| false flags (correct answers flagged) | {false_rate:.3f} ({len(false_flags)}/{len(correct)}) "
          f"| <= {GOAL_FALSE_FLAGS} |")
    print(f"| cost p50 per answer | {p50:.3f} ms | <= {GOAL_P50_MS} ms |")
    print(f"| cost p95 per answer | {p95:.3f} ms | |")
    for case in false_flags[:3]:
        print(f"  false flag: {_flagged(verify_lexical(case.answer, case.sources))}")
    for case in missed[:3]:
        print(f"  missed: {case.original} -> {case.swapped}")
    met = recall >= GOAL_RECALL and false_rate <= GOAL_FALSE_FLAGS and p50 <= GOAL_P50_MS
    print("goals: " + ("all met" if met else "NOT all met"))
    return {"recall": recall, "false_flags": false_rate, "p50_ms": p50}


# ----------------------------------------------------------------------------------------------- model
async def model_plumbing(url: str, model: str, cases: list[Case]) -> int:
    """``Verifier.check(mode="model")`` on real vLLM requests: calls, latency, score paths, failures."""
    from retriever.rerank import RerankService
    from retriever.types import Candidate, SnippetPayload
    from server.services.verification import Verifier
    from server.vllm_client import VLLMClient
    from tests.support.settings import bare_settings

    client = VLLMClient([url], model, deadline_s=300, read_timeout_s=300)
    reranker = RerankService(client, lambda _c: asyncio.sleep(0, None), concurrency=8, timeout_s=300)
    settings = bare_settings(verify_timeout_s=300.0, verify_max_claims=32)
    verifier = Verifier(settings, reranker=reranker)
    latencies: list[float] = []
    calls: list[int] = []
    verdicts: dict[str, int] = {}
    degraded = 0
    paths: dict[str, int] = {}
    try:
        for case in cases:
            kept = [Candidate(f"s{s.n}", SnippetPayload(kind="page", text=s.text), 0.0) for s in case.sources]
            started = time.perf_counter()
            outcome = await verifier.check(case.answer, kept, "model")
            latencies.append(time.perf_counter() - started)
            calls.append(outcome.model_calls)
            degraded += bool(outcome.degraded)
            for path, n in outcome.model_paths.items():
                paths[path] = paths.get(path, 0) + n
            for claim in outcome.verification.claims:
                key = {True: "supported", False: "unsupported", None: "null"}[claim.supported]
                verdicts[key] = verdicts.get(key, 0) + 1
    finally:
        await client.aclose()
    print(f"\nmodel check against {url} ({model}): {len(cases)} answers")
    print("| measure | value |")
    print("|---|---:|")
    print(f"| requests (claims judged) per answer, mean | {statistics.mean(calls):.1f} |")
    print(f"| latency per answer p50 | {statistics.median(latencies) * 1000:.0f} ms |")
    print(f"| latency per answer max | {max(latencies) * 1000:.0f} ms |")
    print(f"| latency per claim p50 | {statistics.median(t / max(1, c) for t, c in zip(latencies, calls)) * 1000:.0f} ms |")
    print(f"| answers degraded (a claim unscored) | {degraded} |")
    print(f"| claim verdicts | {verdicts} |")
    print(f"| P(yes) paths | {paths} |")
    return 1 if degraded == len(cases) else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=5, help="timing passes over every answer")
    parser.add_argument("--model-check", action="store_true", help="also measure the model check's plumbing")
    parser.add_argument("--model-answers", type=int, default=4, help="codes whose answers the model check sends")
    parser.add_argument("--url", help="a running vLLM (base URL); default: start the tiny CPU model")
    parser.add_argument("--model", default="tiny-vlm")
    args = parser.parse_args()

    correct = correct_cases(args.devices, args.seed)
    swapped = swapped_cases(correct, args.seed)
    print(f"support KB: {args.devices} devices, seed {args.seed}; faults known: {len(FAULTS)}")
    lexical_report(correct, swapped, args.repeat)
    if not args.model_check:
        return 0
    picked = [c for c in correct if c.answer.count("[1]") >= 1][: args.model_answers]
    cases = [*picked, *[s for s in swapped if any(s.sources is c.sources for c in picked)][: args.model_answers]]
    if args.url:
        return asyncio.run(model_plumbing(args.url, args.model, cases))
    from tests.support.vllm_server import VLLMServer, build_tiny_vlm_dir

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "tiny-vlm"
        build_tiny_vlm_dir(model_dir)
        with VLLMServer(model_dir, served_model_name=args.model, startup_timeout=600,
                        extra_args=["--max-num-seqs", "8"]) as server:
            print(f"tiny vLLM up in {server.startup_seconds:.0f}s (log {server.log_path})")
            return asyncio.run(model_plumbing(server.url, args.model, cases))


if __name__ == "__main__":
    sys.exit(main())
