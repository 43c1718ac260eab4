"""Yes/No probabilities from vLLM logprob payloads (pure functions; the scorer is retriever/scorers.py).

relevancy = P(yes) / (P(yes) + P(no)), each side summed over its spellings ("Yes", " yes", "YES"…)
found in the first token's ``top_logprobs`` (path ``top_logprobs``). If only one side is listed,
the other is taken to have the smallest listed probability, its upper bound as one token (path
``top_logprobs_bound``). If neither is listed, a replay ending in the assistant answer "Yes" / "No"
with ``prompt_logprobs`` gives the exact log-probability of those answer tokens (path
``prompt_logprobs``; ``RerankService.yes_probability``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

PATH_TOP = "top_logprobs"
PATH_BOUND = "top_logprobs_bound"
PATH_PROMPT = "prompt_logprobs"
# Outcomes of extract_yes_probability that mean "no score from this payload".
ABSENT = "absent"
MALFORMED = "malformed"

YES_ANSWER, NO_ANSWER = "Yes", "No"
TOP_LOGPROBS = 20  # vLLM's default --max-logprobs


def _answer_of(token: str) -> str | None:
    """'yes' / 'no' for any spelling of the answer token (space, Ġ or ▁ prefix, any case)."""
    word = token.strip().lstrip("\u0120\u2581").strip().lower()
    return word if word in ("yes", "no") else None


def _logsumexp(values: list[float]) -> float:
    top = max(values)
    if top == -math.inf:
        return -math.inf
    return top + math.log(sum(math.exp(v - top) for v in values))


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def _first_position(payload: Any) -> Any:
    """Accept a response, a choice, a choice's ``logprobs`` or one content position."""
    if isinstance(payload, dict) and isinstance(payload.get("choices"), list):
        payload = payload["choices"][0] if payload["choices"] else None
    if isinstance(payload, dict) and "logprobs" in payload and "top_logprobs" not in payload:
        payload = payload["logprobs"]
    if isinstance(payload, dict) and "content" in payload:
        content = payload["content"]
        payload = content[0] if isinstance(content, list) and content else None
    return payload


def extract_yes_probability(logprobs_payload: Any) -> tuple[float | None, str]:
    """P(yes) / (P(yes) + P(no)) from the first generated token's top logprobs, and the path.

    Returns ``(score, "top_logprobs")`` when both answers are listed, ``(score,
    "top_logprobs_bound")`` when one is (the other gets the smallest listed probability),
    ``(None, "absent")`` when neither is (or both have zero probability), ``(None, "malformed")``
    when the payload has no usable top logprobs. NaN entries are ignored; -inf means probability 0.
    """
    position = _first_position(logprobs_payload)
    if not isinstance(position, dict) or not isinstance(position.get("top_logprobs"), list):
        return None, MALFORMED
    sides: dict[str, list[float]] = {"yes": [], "no": []}
    listed: list[float] = []
    for entry in position["top_logprobs"]:
        if not isinstance(entry, dict):
            continue
        token, logprob = entry.get("token"), entry.get("logprob")
        if not isinstance(token, str) or not isinstance(logprob, (int, float)) or math.isnan(logprob):
            continue
        logprob = min(float(logprob), 0.0)  # float noise can give +1e-7
        listed.append(logprob)
        answer = _answer_of(token)
        if answer:
            sides[answer].append(logprob)
    if not listed:
        return None, MALFORMED
    yes = _logsumexp(sides["yes"]) if sides["yes"] else None
    no = _logsumexp(sides["no"]) if sides["no"] else None
    if yes is None and no is None:
        return None, ABSENT
    if yes is not None and no is not None:
        if yes == -math.inf and no == -math.inf:
            return None, ABSENT
        return (1.0 if no == -math.inf else _sigmoid(yes - no)), PATH_TOP
    bound = min(listed)
    if yes is not None:
        return (0.0 if yes == -math.inf else _sigmoid(yes - bound)), PATH_BOUND
    return (1.0 if no == -math.inf else _sigmoid(bound - no)), PATH_BOUND  # type: ignore[operator]


def extract_answer_logprob(response: Any, answer_ids: Sequence[int]) -> float | None:
    """Sum of the prompt logprobs of the last ``len(answer_ids)`` prompt tokens, which must be those ids.

    ``response`` is a chat completion made with ``prompt_logprobs`` on a conversation ending in
    the assistant's answer; None when the payload does not end in exactly those tokens.
    """
    entries = response.get("prompt_logprobs") if isinstance(response, dict) else None
    if not isinstance(entries, list) or not answer_ids or len(entries) < len(answer_ids):
        return None
    total = 0.0
    for entry, token_id in zip(entries[-len(answer_ids):], answer_ids):
        item = entry.get(str(token_id)) if isinstance(entry, dict) else None
        logprob = item.get("logprob") if isinstance(item, dict) else None
        if not isinstance(logprob, (int, float)) or math.isnan(logprob):
            return None
        total += min(float(logprob), 0.0)
    return total


def score_from_answer_logprobs(yes: float, no: float) -> float | None:
    """Normalised P(yes) from the two answers' exact log-probabilities; None if both are impossible."""
    if yes == -math.inf and no == -math.inf:
        return None
    return _sigmoid(yes - no) if no != -math.inf else 1.0
