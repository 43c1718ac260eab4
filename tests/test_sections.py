"""``retriever/sections.py``: what the text embedder reads of a passage, section by section."""

from __future__ import annotations

from retriever.sections import MAX_SECTIONS, passage_sections

PAGE = """## AquaPure 2000: error codes E-100 to E-102

The display of the AquaPure 2000 shows one of these codes when it stops.

| Code | Meaning | What to do |
|---|---|---|
| E-100 | Filter clogged | Rinse the filter cartridge or fit a new one. |
| E-101 | Descaling required | Run the descaling programme with a fresh descaler sachet. |
"""


def test_a_page_is_its_whole_text_its_heading_and_each_row_under_the_heading() -> None:
    sections = passage_sections(PAGE)
    assert sections[0] == PAGE.strip()  # the whole text first: the old single vector is one of the rows
    assert sections[1] == "AquaPure 2000: error codes E-100 to E-102"
    head = "AquaPure 2000: error codes E-100 to E-102: "
    assert sections[2:] == [
        head + "The display of the AquaPure 2000 shows one of these codes when it stops.",
        head + "Code Meaning What to do",
        head + "E-100 Filter clogged Rinse the filter cartridge or fit a new one.",
        head + "E-101 Descaling required Run the descaling programme with a fresh descaler sachet.",
    ]
    assert not any("---" in s or "|" in s for s in sections[1:])  # table rules and pipes are markup


def test_sentences_take_their_nearest_heading() -> None:
    text = "# Pump\n\nPrime it first. Then start it.\n\n## Cleaning\n\n- Rinse the tray.\n- Dry the lid."
    assert passage_sections(text)[1:] == [
        "Pump", "Cleaning", "Pump: Prime it first.", "Pump: Then start it.",
        "Cleaning: Rinse the tray.", "Cleaning: Dry the lid.",
    ]


def test_a_one_sentence_text_has_one_row_and_a_blank_one_none() -> None:
    assert passage_sections("Unplug the unit before cleaning the grill.") == \
        ["Unplug the unit before cleaning the grill."]
    assert passage_sections("   \n ") == []
    # abbreviations and decimals do not split a sentence (the next word starts lower-case or is a digit)
    assert passage_sections("Set it to 2.5 bar, e.g. on the dial. Then wait.")[1:] == \
        ["Set it to 2.5 bar, e.g. on the dial.", "Then wait."]


def test_a_long_text_is_merged_into_max_sections_never_cut() -> None:
    sentences = [f"Step {i} turns valve number {i} by hand." for i in range(3 * MAX_SECTIONS + 1)]
    sections = passage_sections(" ".join(sentences))
    assert len(sections) == 1 + MAX_SECTIONS  # the whole text, then the merged groups
    assert " ".join(sections[1:]) == " ".join(sentences)  # every word is in a section, in order
