"""Check an answer against its sources, sentence by sentence, without a model (the ``lexical`` check).

An answer is split into claims (sentences and list items, each keeping the ``[n]`` citations that
follow it). Each claim's checkable tokens must occur in the text or OCR text of a snippet it cites,
or of any kept snippet when it cites none:

* **identifiers** (codes, part numbers, versions, dates): found as BM25 finds them
  (``retriever.lexical.identifier_matches``), compared by their parts: ``E-417`` = ``E417`` =
  ``e 417`` (OCR) but ``E-417`` != ``E-471``; digit parts keep their order and boundaries
  (``v2.3.1`` != ``v23.1``), a leading ``v`` of a version is optional (``v2.3.1`` = ``2.3.1``);
* **numbers with a unit**: the value and the unit's canonical name (``2 min`` = ``2 minutes`` =
  ``two minutes``, ``2 min`` != ``20 min``, ``2 min`` != ``2 h``); no unit conversion;
* **quoted strings** (``"…"``, ``“…”``, ``'…'``, backticks): a case- and space-insensitive
  substring of the source text;
* **citations**: ``[n]`` must name a kept snippet.

A claim is ``supported`` when every token is found, ``False`` when one is not, ``None`` when it has
nothing checkable ("Switch it off first."): a lexical check cannot judge it, which is what the
``model`` check is for (``retriever/verify_model.py``). Pure functions, no I/O.
"""

from __future__ import annotations

import itertools
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Literal

from retriever.lexical import identifier_matches

FactKind = Literal["identifier", "quantity", "quote", "citation"]

#: Longest quoted string that is checked (a longer one is prose, not a quotation to match).
MAX_QUOTE_CHARS = 300
#: Claims of one answer that are checked; past it, the rest go unchecked (an answer is bounded by
#: max_tokens long before this).
MAX_CLAIMS = 400

# --- citations and sentences -------------------------------------------------------------------
CITATION = re.compile(r"\[(\d{1,4}(?:\s*,\s*\d{1,4})*)\]")
# The end of a sentence: terminal punctuation (closing quotes/brackets may follow), the citations
# that belong to it, then whitespace before what starts the next sentence (not a lowercase letter).
_SENTENCE_END = re.compile(
    r"[.!?]+[\"'”’)\]]*(?:\s*\[\d{1,4}(?:\s*,\s*\d{1,4})*\])*(?=\s+(?![a-z])|\s*$)"
)
# Abbreviations whose period does not end a sentence.
_ABBREVIATIONS = frozenset((
    "e.g", "i.e", "etc", "vs", "approx", "ca", "cf", "no", "nr", "fig", "figs", "p", "pp", "vol", "ch", "sec",
    "min", "max", "dr", "mr", "mrs", "ms", "st", "ref", "refs", "incl", "resp", "esp", "art",
))
_LIST_MARKER = re.compile(r"^\s*(?:[-*+•]|\d{1,3}[.)])\s+")


@dataclass(slots=True)
class Fact:
    """One checkable token of a claim: where it is in the answer and whether a source has it."""

    kind: FactKind
    text: str  # as written in the answer ("QX-7713", "20 min", '"Reset"', "[7]")
    start: int
    end: int
    key: str = ""  # what is compared ("qx7713", "20 min", "reset")
    supported: bool | None = None


@dataclass(slots=True)
class ClaimCheck:
    """One sentence of an answer and the outcome of its check."""

    text: str
    start: int  # character offsets in the answer (Python string indices: code points)
    end: int
    cites: list[int] = field(default_factory=list)
    facts: list[Fact] = field(default_factory=list)
    supported: bool | None = None
    score: float | None = None  # lexical: share of its tokens found; model: P(supported)

    @property
    def unsupported(self) -> list[str]:
        """The tokens no source it may rely on contains, in order, each once."""
        return list(dict.fromkeys(f.text for f in self.facts if f.supported is False))


@dataclass(slots=True, frozen=True)
class SourceText:
    """A kept snippet as the checker sees it: its citation number and its text and OCR text."""

    n: int
    text: str = ""
    ocr_text: str = ""


def _end_of_abbreviation(text: str, dot: int) -> bool:
    """Whether the period at ``dot`` closes an abbreviation ("e.g.", "approx.") or an initial ("J.")."""
    start = dot
    while start > 0 and (text[start - 1].isalpha() or text[start - 1] == "."):
        start -= 1
    word = text[start:dot].lower().rstrip(".")
    return word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha())


def split_claims(answer: str) -> list[ClaimCheck]:
    """The sentences and list items of ``answer``, stripped, with offsets and the ``[n]`` they cite."""
    claims: list[ClaimCheck] = []
    for line in re.finditer(r"[^\n]+", answer):
        offset, body = line.start(), line.group(0)
        marker = _LIST_MARKER.match(body)
        cursor = marker.end() if marker else 0
        for end in _SENTENCE_END.finditer(body, cursor):
            if body[end.start()] == "." and end.group(0) == "." and _end_of_abbreviation(body, end.start()):
                continue
            _add_claim(claims, answer, offset + cursor, offset + end.end())
            cursor = end.end()
        _add_claim(claims, answer, offset + cursor, offset + len(body))
        if len(claims) >= MAX_CLAIMS:
            return claims[:MAX_CLAIMS]
    return claims


def _add_claim(claims: list[ClaimCheck], answer: str, start: int, end: int) -> None:
    piece = answer[start:end]
    stripped = piece.strip()
    if not any(ch.isalnum() for ch in CITATION.sub("", stripped)):
        return  # blank, "---", a lone "[2]": nothing to check
    start += len(piece) - len(piece.lstrip())
    end = start + len(stripped)
    cites = [int(n) for group in CITATION.findall(stripped) for n in group.split(",")]
    claims.append(ClaimCheck(stripped, start, end, list(dict.fromkeys(cites))))


# --- quantities ---------------------------------------------------------------------------------
_UNITS: dict[str, tuple[str, ...]] = {
    "ms": ("ms", "msec", "millisecond", "milliseconds"),
    "s": ("s", "sec", "secs", "second", "seconds"),
    "min": ("min", "mins", "minute", "minutes"),
    "h": ("h", "hr", "hrs", "hour", "hours"),
    "day": ("d", "day", "days"),
    "week": ("wk", "wks", "week", "weeks"),
    "month": ("mo", "month", "months"),
    "year": ("yr", "yrs", "year", "years"),
    "mm": ("mm", "millimetre", "millimetres", "millimeter", "millimeters"),
    "cm": ("cm", "centimetre", "centimetres", "centimeter", "centimeters"),
    "m": ("m", "metre", "metres", "meter", "meters"),
    "km": ("km", "kilometre", "kilometres", "kilometer", "kilometers"),
    "inch": ("inch", "inches"),
    "ft": ("ft", "foot", "feet"),
    "mg": ("mg", "milligram", "milligrams"),
    "g": ("g", "gram", "grams"),
    "kg": ("kg", "kilo", "kilos", "kilogram", "kilograms"),
    "lb": ("lb", "lbs", "pound", "pounds"),
    "oz": ("oz", "ounce", "ounces"),
    "ml": ("ml", "millilitre", "millilitres", "milliliter", "milliliters"),
    "l": ("l", "litre", "litres", "liter", "liters"),
    "gal": ("gal", "gallon", "gallons"),
    "°c": ("°c", "ºc", "℃", "degc", "celsius"),
    "°f": ("°f", "ºf", "℉", "degf", "fahrenheit"),
    "°": ("°", "deg", "degree", "degrees"),
    "bar": ("bar", "bars"),
    "mbar": ("mbar",),
    "psi": ("psi",),
    "pa": ("pa", "pascal", "pascals"),
    "kpa": ("kpa",),
    "mpa": ("mpa",),
    "v": ("v", "volt", "volts"),
    "mv": ("mv", "millivolt", "millivolts"),
    "kv": ("kv", "kilovolt", "kilovolts"),
    "a": ("a", "amp", "amps", "ampere", "amperes"),
    "ma": ("ma", "milliamp", "milliamps"),
    "w": ("w", "watt", "watts"),
    "kw": ("kw", "kilowatt", "kilowatts"),
    "wh": ("wh",),
    "kwh": ("kwh",),
    "hz": ("hz", "hertz"),
    "khz": ("khz",),
    "mhz": ("mhz",),
    "ghz": ("ghz",),
    "ohm": ("ω", "ohm", "ohms"),
    "%": ("%", "percent", "per cent"),
    "rpm": ("rpm",),
    "db": ("db", "decibel", "decibels"),
    "kb": ("kb", "kilobyte", "kilobytes"),
    "mb": ("mb", "megabyte", "megabytes"),
    "gb": ("gb", "gigabyte", "gigabytes"),
    "tb": ("tb", "terabyte", "terabytes"),
    "mbps": ("mbps",),
    "px": ("px", "pixel", "pixels"),
    "times": ("times", "x"),
    "cycles": ("cycle", "cycles"),
    "l/min": ("l/min", "lpm"),
}
_CANONICAL_UNIT = {alias: unit for unit, aliases in _UNITS.items() for alias in aliases}
_NUMBER_WORDS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
    "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "fifteen": 15, "twenty": 20, "thirty": 30, "forty": 40,
    "fifty": 50, "sixty": 60, "ninety": 90, "hundred": 100,
}
_UNIT_ALT = "|".join(re.escape(a) for a in sorted(_CANONICAL_UNIT, key=len, reverse=True))
_NUMBER = r"\d+(?:[.,]\d+)*"
_NUMBER_OR_WORD = rf"(?:{_NUMBER}|{'|'.join(_NUMBER_WORDS)})"
# "2 min", "2min", "2-minute", "2–5 minutes" (both get the unit), "two years"; case-insensitive.
_QUANTITY = re.compile(
    rf"(?=[0-9zotfsenh])(?<![\w.,])(?<!\w-)(?P<first>{_NUMBER_OR_WORD})"  # not the "417" of "E-417"
    rf"(?:\s?(?:-|–|—|to)\s?(?P<second>{_NUMBER_OR_WORD}))?"
    rf"[ \u00a0\u202f-]?(?P<unit>{_UNIT_ALT})(?![^\W_])",
    re.IGNORECASE,
)


def _number_value(raw: str) -> str | None:
    """A canonical number: "2" = "2.0" = "two", "1,000" = "1000", "2,5" = "2.5"."""
    word = _NUMBER_WORDS.get(raw.lower())
    if word is not None:
        return str(word)
    if re.fullmatch(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?", raw):
        raw = raw.replace(",", "")
    elif raw.count(",") == 1 and "." not in raw:
        raw = raw.replace(",", ".")
    try:
        value = Decimal(raw)
    except InvalidOperation:
        return None
    return format(value.normalize(), "f")


def quantity_matches(text: str) -> Iterable[tuple[int, int, list[str]]]:
    """(start, end, keys) of each number with a unit in ``text``; a range gives one key per end."""
    for match in _QUANTITY.finditer(text):
        unit = _CANONICAL_UNIT.get(match.group("unit").lower())
        if unit is None:
            continue
        first = match.group("first")
        if unit in ("times", "a", "m", "s", "d", "h", "l", "g", "°") and not first[0].isdigit():
            continue  # "one a day", "two h…": a number word before a one-letter unit is prose
        values = [_number_value(first)] + ([_number_value(match.group("second"))] if match.group("second") else [])
        keys = [f"{v} {unit}" for v in values if v is not None]
        if keys:
            yield match.start(), match.end(), keys


# --- identifiers, quotes, evidence -----------------------------------------------------------------
_ORDINAL = re.compile(r"\d+(?:st|nd|rd|th)", re.IGNORECASE)
_Q = MAX_QUOTE_CHARS
_QUOTES = tuple(re.compile(pattern.replace("N", str(_Q))) for pattern in (
    r'"([^"\n]{1,N})"', r"“([^”\n]{1,N})”", r"‘([^’\n]{1,N})’", r"`([^`\n]{1,N})`",
    r"(?<![\w'])'([^'\n]{1,N})'(?![\w'])",  # not the apostrophes of "it's" or "users'"
))
_SPACED_PAIR = re.compile(r"(?<![^\W_])([^\W\d_]{1,4}) (\d+)(?![^\W_])")  # "E 417" as OCR reads "E-417"


# Where an identifier may start: a candidate of lexical's (same boundaries) with an ASCII digit or a
# non-ASCII character in it; lexical.identifier_matches then decides exactly. Skipping the words
# without digits in C makes the check ~2x faster than handing every word to Python.
_MAYBE_IDENTIFIER = re.compile(
    r"(?<![^\W_])(?=(?:[^\W_]|[-._/](?=[^\W_]))*?(?:[0-9]|[^\x00-\x7f]))[^\W_]+(?:[-._/][^\W_]+)*"
)


def _identifiers(text: str) -> Iterable[tuple[re.Match[str], int, list[str]]]:
    """lexical.identifier_matches over ``text`` (match, its offset in ``text``, parts), words without digits skipped."""
    for candidate in _MAYBE_IDENTIFIER.finditer(text):
        for match, parts in identifier_matches(candidate.group(0)):
            yield match, candidate.start(), parts


def identifier_key(parts: Sequence[str]) -> str:
    """Compare identifiers by their parts: letters/digits joined, adjacent digit runs kept apart ("2.3")."""
    out = [parts[0]]
    for prev, part in itertools.pairwise(parts):
        out.append("." + part if prev.isdigit() and part.isdigit() else part)
    return "".join(out)


def _identifier_keys(key: str) -> tuple[str, ...]:
    """A key and its spelling without a version's leading ``v`` ("v2.3.1" also as "2.3.1")."""
    if key.startswith("v") and re.fullmatch(r"v\d+(?:\.\d+)+", key):
        return key, key[1:]
    return (key,)


def identifier_facts(text: str) -> Iterable[tuple[int, int, str]]:
    """(start, end, key) of each identifier in ``text``; ``E-417/E-418`` gives both."""
    for match, offset, parts in _identifiers(text):
        yield from match_facts(match, offset, parts)


def match_facts(match: re.Match[str], offset: int, parts: list[str]) -> Iterable[tuple[int, int, str]]:
    """``identifier_facts`` of one identifier of ``_identifiers`` (match, offset, parts)."""
    whole = match.group(0)
    at = offset + match.start()
    if "/" not in whole:  # one piece, the match itself: identifier_matches(whole) gives it back with these parts
        if not _ORDINAL.fullmatch(whole):
            yield at, at + len(whole), identifier_key(parts)
        return
    for piece in whole.split("/"):
        for sub, sub_parts in identifier_matches(piece):
            if not _ORDINAL.fullmatch(sub.group(0)):
                yield at + sub.start(), at + sub.end(), identifier_key(sub_parts)
        at += len(piece) + 1


def normalize_text(text: str) -> str:
    """Casefolded, NFKC, straight quotes and dashes, single spaces: what quotes are compared on."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = text.translate({ord(c): "'" for c in "‘’`´"} | {ord(c): '"' for c in "“”„"}
                          | {ord(c): "-" for c in "‐‑‒–—"})
    return " ".join(text.split())


@dataclass(slots=True)
class Evidence:
    """What one source offers the checker: identifier keys, quantity keys, normalised text."""

    identifiers: set[str]
    quantities: set[str]
    text: str

    @classmethod
    def of(cls, source: SourceText) -> Evidence:
        raw = f"{source.text}\n{source.ocr_text}" if source.ocr_text else source.text
        identifiers: set[str] = set()
        for match, _offset, parts in _identifiers(raw):
            identifiers.update(_identifier_keys(identifier_key(parts)))
            if "/" in match.group(0):  # "E-417/E-418": each of them too
                for piece in match.group(0).split("/"):
                    for _sub, sub_parts in identifier_matches(piece):
                        identifiers.update(_identifier_keys(identifier_key(sub_parts)))
        for match in _SPACED_PAIR.finditer(raw):
            identifiers.add(f"{match.group(1).lower()}{match.group(2)}")
        quantities = {key for _s, _e, keys in quantity_matches(raw) for key in keys}
        return cls(identifiers, quantities, normalize_text(raw))


def claim_facts(answer: str, claim: ClaimCheck) -> list[Fact]:
    """The checkable tokens of ``claim`` (offsets in ``answer``), in order of appearance."""
    text = CITATION.sub(lambda m: " " * len(m.group(0)), claim.text)  # [n] is no identifier or number
    facts: list[Fact] = []
    taken: list[tuple[int, int]] = []
    for start, end, keys in quantity_matches(text):
        taken.append((start, end))
        for key in keys:
            facts.append(Fact("quantity", claim.text[start:end], claim.start + start, claim.start + end, key))
    for start, end, key in identifier_facts(text):
        if any(s <= start < e for s, e in taken):
            continue  # "2.5 bar", "230V": checked as a quantity
        facts.append(Fact("identifier", claim.text[start:end], claim.start + start, claim.start + end, key))
    for pattern in _QUOTES:
        for match in pattern.finditer(text):
            inner = normalize_text(match.group(1)).strip(" .,;:!?")
            if len(inner) >= 2 and not _inches(text, match):
                facts.append(Fact("quote", match.group(0), claim.start + match.start(), claim.start + match.end(),
                                  inner))
    for match in CITATION.finditer(claim.text):
        for n in match.group(1).split(","):
            facts.append(Fact("citation", f"[{int(n)}]", claim.start + match.start(), claim.start + match.end(),
                              str(int(n))))
    facts.sort(key=lambda f: (f.start, f.kind))
    return facts


def _inches(text: str, match: re.Match[str]) -> bool:
    """A double-quote pair that is really inches ('a 12" pipe and a 10" one'): not a quotation."""
    return match.group(0).startswith('"') and bool(re.match(r"\d", text[max(0, match.start() - 1):match.start()]))


def check_claim(claim: ClaimCheck, facts: list[Fact], evidence: dict[int, Evidence]) -> ClaimCheck:
    """Judge ``facts`` against the cited sources (all of them when the claim cites none that exist)."""
    cited = [evidence[n] for n in claim.cites if n in evidence]
    pool = cited or list(evidence.values())
    found = 0
    checked = 0
    for fact in facts:
        if fact.kind == "citation":
            fact.supported = int(fact.key) in evidence
            if not fact.supported:
                checked += 1
            continue
        checked += 1
        if fact.kind == "identifier":
            fact.supported = any(k in e.identifiers for e in pool for k in _identifier_keys(fact.key))
        elif fact.kind == "quantity":
            fact.supported = any(fact.key in e.quantities for e in pool)
        else:
            fact.supported = any(fact.key in e.text for e in pool)
        found += bool(fact.supported)
    claim.facts = facts
    if checked:
        claim.supported = all(f.supported is not False for f in facts)
        claim.score = round(found / checked, 4)
    else:
        claim.supported, claim.score = None, None
    return claim


def verify_lexical(answer: str, sources: Sequence[SourceText]) -> list[ClaimCheck]:
    """Every claim of ``answer`` checked against ``sources`` (the kept snippets, numbered as cited)."""
    evidence = {s.n: Evidence.of(s) for s in sources}
    return [check_claim(claim, claim_facts(answer, claim), evidence) for claim in split_claims(answer)]


def supported_ratio(claims: Sequence[ClaimCheck]) -> float | None:
    """Share of the judged claims (supported true or false) that are supported; None when none was judged."""
    judged = [c.supported for c in claims if c.supported is not None]
    return round(sum(judged) / len(judged), 4) if judged else None
