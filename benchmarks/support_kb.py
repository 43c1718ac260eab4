"""A generated support knowledge base with ground truth by construction (the generator half).

    .venv/bin/python benchmarks/support_kb.py --out /tmp/support-kb    # writes it as files
    .venv/bin/python benchmarks/support_kb.py --preview                # prints a summary

The catalogue: ``devices`` product lines, each with error codes (``E-417``), parts (``P-417-B``)
and firmware versions (``v4.2.1``), all distinct across the catalogue. Snippets:

- manual pages (Markdown, one short section each, so a folder reader keeps one page = one
  snippet): error-code tables, part lists, firmware notes, and care pages without identifiers;
- display photos (no caption): a device panel showing ``ERROR E-417``, rendered with a real
  TrueType font (matplotlib's bundled DejaVu / STIX / Computer Modern), rotated, noisy, blurred
  and JPEG-compressed;
- part photos (no caption): a part with a printed label naming its number.

Queries, three kinds, each with the keys of its relevant snippets and the ``primary`` one (the
page that answers it):

- ``identifier``: text naming an identifier ("my screen says E-417");
- ``display_photo``: a *different* photo of the display (another font, angle, noise) + "what
  does this mean?"; relevant: the code's page and the knowledge base's photos of that code;
- ``paraphrase``: the symptom in other words, no identifier ("the pump on my AquaPure 300 got too
  hot"); relevant: the page of that code;
- ``customer``: a how-to question the way customers write it, not in the manual's words ("the
  electricity went out and now nothing happens"); relevant: the guide page (``GUIDES``).

With random CLIP weights the dense half is noise on all three; BM25 and OCR are real, so the
identifier and display-photo rows measure something here. The evaluation (pool recall, kept
context precision, per-stage latency per retrieval mode, with and without OCR) is wired by the
harness; ``build_support_kb`` is its input.
"""

from __future__ import annotations

import argparse
import io
import json
import random
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

QueryKind = Literal["identifier", "display_photo", "paraphrase", "customer", "unanswerable"]

#: TrueType fonts bundled with matplotlib (a dependency): present wherever vlmrag installs.
FONT_FILES = (
    "DejaVuSans-Bold.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSans.ttf",
    "DejaVuSansMono.ttf", "STIXGeneralBol.ttf", "cmtt10.ttf", "cmss10.ttf",
)
#: Display colour schemes: (panel, text).
PANELS = (((12, 24, 16), (120, 255, 140)), ((20, 12, 4), (255, 176, 40)), ((10, 20, 60), (225, 235, 255)),
          ((200, 210, 190), (30, 40, 30)), ((5, 5, 5), (255, 60, 50)))
PRODUCT_NAMES = (
    "AquaPure", "ThermoBrew", "CleanAir", "FrostLine", "HydroMax", "SolarFlow", "VentoPro", "BrewMaster",
    "PureChill", "HeatWave", "AirNova", "Cascade", "Polaris", "Zephyr", "Torrent", "Glacier",
)
#: Faults: (component, what the manual calls it, remedy, a paraphrase of the symptom).
FAULTS = (
    ("pump", "Pump overheat", "Switch off for 30 minutes and check the pump vents.", "the pump got too hot"),
    ("tank", "Water tank empty", "Refill the tank up to the MAX mark.", "it ran out of water"),
    ("fan", "Fan failure", "Check that nothing blocks the fan; replace the fan assembly.",
     "the fan stopped spinning"),
    ("door", "Door open", "Close the front door until it clicks.", "the front lid is not shut"),
    ("sensor", "Temperature sensor fault", "Reseat the sensor connector; replace the sensor if it persists.",
     "the thermometer reading is wrong"),
    ("pressure", "Low water pressure", "Open the supply valve fully and clean the inlet strainer.",
     "barely any water comes in"),
    ("filter", "Filter clogged", "Rinse the filter cartridge or fit a new one.", "the cartridge is blocked"),
    ("heater", "Heater failure", "Have the heating element checked by a technician.", "it never warms up"),
    ("power", "Supply voltage out of range", "Plug the unit into another socket; avoid extension leads.",
     "the electricity seems unstable"),
    ("descale", "Descaling required", "Run the descaling programme with a fresh descaler sachet.",
     "limescale has built up"),
)
PART_KINDS = ("inlet filter", "outlet filter", "pump assembly", "fan assembly", "door seal", "heating element",
              "temperature sensor", "water tank")
CARE_TOPICS = (
    ("Cleaning", "Wipe the housing with a damp cloth once a week. Do not use abrasive cleaners or solvents."),
    ("Placement", "Keep at least 10 cm of free space around the unit so air can circulate."),
    ("Warranty", "The warranty covers manufacturing defects for two years from the date of purchase."),
    ("Storage", "Empty the tank and let the unit dry before storing it for more than a month."),
)

#: How-to guides (title, the manual's wording) with customer questions in other words: no identifier,
#: no device name, written not to share the guide's words (``bench_support.py`` checks which share none
#: with BM25's own tokenizer). Variants 0-1 are the tuning seed's (0), 2-3 every other seed's.
GUIDES = (
    ("Restarting after a power cut",
     "After a power cut the unit stays in standby. Hold the ON button for three seconds; the display counts "
     "down and the programme resumes where it stopped.",
     ("the electricity went out last night and now nothing happens, how do I get it going again?",
      "we had an outage and it won't come back to life",
      "lights flickered during the storm and since then it is dead quiet",
      "after the blackout it just sits there doing nothing")),
    ("Connecting to Wi-Fi",
     "Open the app, choose Add appliance and scan the QR code inside the lid. The unit joins 2.4 GHz networks "
     "only; 5 GHz networks are not supported.",
     ("my phone can't find the machine on our wireless internet",
      "how do I link it to the home router?",
      "it refuses to pair with my internet connection at home",
      "setting up wireless, the gadget never shows up on my mobile")),
    ("Noise during operation",
     "A humming sound is normal while the pump primes. A loud rattle means the unit is not level: adjust the "
     "feet until the bubble in the spirit level is centred.",
     ("it makes a terrible clattering racket",
      "why is it so noisy, like something is shaking inside?",
      "there's a banging every few minutes, is it broken?",
      "it vibrates and clanks on the kitchen counter")),
    ("Bad taste or smell",
     "If the water tastes stale or smells musty, flush the system with two full tanks and replace the carbon "
     "cartridge every three months.",
     ("my coffee has a funny flavour lately",
      "there's a weird odour coming from the drink",
      "what comes out has an off, mouldy tang",
      "the drinks have a nasty flavour like old socks")),
    ("Leaking water",
     "Water under the unit usually comes from the drip tray. Empty it daily and check that the tank seal sits "
     "flat in its groove.",
     ("there's a puddle on the floor underneath",
      "it dribbles all over my countertop",
      "the kitchen floor is wet every morning below it",
      "liquid keeps escaping from the bottom")),
    ("Child lock",
     "To lock the controls, press and hold the two lower buttons together until a key symbol appears. Repeat "
     "to unlock.",
     ("how do I stop my kids from pressing things on it?",
      "keep toddlers from fiddling with the panel",
      "the touchscreen won't respond, is some safety mode on?",
      "can I prevent little ones from changing how it is set up?")),
    ("Energy saving",
     "Eco mode lowers the standby consumption to under 0.5 W. Enable it in the settings menu under Power.",
     ("how can I make it use less electricity?",
      "my bills went up, can it run cheaper?",
      "is there a greener way to run it overnight?",
      "reduce how many kilowatt hours it burns")),
    ("Water hardness",
     "Set the water hardness to match your area: test with the strip in the box and enter the level (1 to 4) "
     "in the settings menu. Harder water needs descaling more often.",
     ("we live in a region with chalky tap supply, what should I change?",
      "how do I tell it about the minerals in our local supply?",
      "our town's supply is very calcium heavy, any adjustment?",
      "configure it for limestone-rich districts")),
    ("Cleaning the milk system",
     "Rinse the milk frother after each use and run the cleaning cycle weekly with the supplied tablet.",
     ("the foam nozzle gets crusty, how do I keep it hygienic?",
      "how often should I wash the part that froths?",
      "the steamer wand is sticky with dried dairy",
      "keeping the cappuccino attachment spotless")),
    ("Returning a product",
     "Within 30 days of purchase you can return the unit in its original packaging. Print the return label "
     "from your account page.",
     ("I changed my mind, can I send it back for a refund?",
      "how do I get my money back?",
      "I don't want it anymore, can I ship it to you?",
      "unhappy with it, how do I give it back?")),
    ("Display too dim",
     "Adjust the screen brightness in Settings > Display. Night mode dims the screen automatically between "
     "22:00 and 7:00.",
     ("I can barely read the little panel, it's so dark",
      "the readout is hard to see in daylight",
      "can I make the numbers on the front more vivid?",
      "the digits are faint and murky")),
    ("Moving the unit",
     "Empty the tank and the drip tray before moving the unit, and keep it upright during transport to "
     "protect the pump.",
     ("we're relocating house, how should I carry it?",
      "taking it in the car to my new flat, any tips?",
      "can I lay it on its side in a box when shifting home?",
      "packing it up for relocation")),
    ("Replacing the remote control battery",
     "The remote uses one CR2032 coin cell. Slide the tray out at the back and insert the cell with the plus "
     "side up.",
     ("the clicker doesn't do anything anymore",
      "what kind of button power source does the handheld controller need?",
      "my wand thingy stopped responding to clicks",
      "how do I swap the little round thing in the zapper?")),
    ("Brewing temperature",
     "Choose between four brewing temperatures in the menu; the default is 92 degrees. Lower temperatures "
     "suit green tea.",
     ("my drink comes out scalding, can I make it cooler?",
      "it's too hot to sip straight away",
      "can it heat less for delicate leaves?",
      "way too lukewarm for my liking, can I turn it up?")),
    ("Registering the product",
     "Register your appliance online with the serial number from the label under the base to extend the "
     "warranty by one year.",
     ("where do I sign up my new machine to get extra coverage?",
      "how to get an additional twelve months of guarantee?",
      "do I need to enrol it somewhere?",
      "where's the code I need to record my gadget with you?")),
    ("Cup volume",
     "Programme the cup volume by holding the cup button while it dispenses; release it at the amount you "
     "want.",
     ("my mug is bigger, how do I get more in it each time?",
      "it pours too little, can I change that?",
      "how to fill a large travel thermos?",
      "it overflows my small glass")),
    ("Ice production",
     "Ice production starts 24 hours after installation. If no ice appears, check that the ice tray arm is "
     "down and the freezer is at -18 degrees.",
     ("no cubes after a whole day",
      "why haven't I got any frozen chunks yet?",
      "the cube bin stays empty",
      "when will it start making frozen cubes?")),
    ("Air quality ring",
     "The ring glows blue when the air is clean, yellow for moderate and red for poor quality; the fan speeds "
     "up automatically.",
     ("what does it mean when the circle turns orange-ish?",
      "the glowing band changed to scarlet, is my room dirty?",
      "why is the halo a different colour today?",
      "is a crimson light bad for breathing?")),
    ("Filter reminder",
     "The filter symbol lights up after 6 months of use. Fit a new cartridge, then hold the reset key for 5 "
     "seconds to clear the reminder.",
     ("a little icon keeps nagging me even though I put in a fresh one",
      "how do I make the warning go away after swapping the insert?",
      "the pictogram stays on after I changed it",
      "I replaced the part but the alert remains")),
)


@dataclass(slots=True)
class SupportSnippet:
    """One snippet of the knowledge base: a Markdown page (``text``) or a photo (``image`` JPEG bytes)."""

    key: str  # relative file path when written out ("pages/aquapure-300-errors-1.md")
    kind: Literal["page", "display_photo", "part_photo"]
    text: str = ""
    image: bytes | None = None
    shows: list[str] = field(default_factory=list)  # identifiers visible in a photo (ground truth for OCR)


@dataclass(slots=True)
class SupportQuery:
    """One query with its ground truth (snippet keys)."""

    kind: QueryKind
    text: str
    image: bytes | None = None
    relevant: list[str] = field(default_factory=list)
    primary: str = ""  # the page that answers it
    identifier: str = ""  # the code / part / version it is about ("" for none named)


@dataclass(slots=True)
class _Device:
    name: str
    codes: list[tuple[str, int]]  # (code, fault index)
    parts: list[tuple[str, str]]  # (part number, kind)
    versions: list[tuple[str, str]]  # (version, note)


@lru_cache(maxsize=64)
def load_font(name: str, size: int) -> ImageFont.FreeTypeFont:
    import matplotlib

    return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name), size)


def _catalogue(n_devices: int, codes_per_device: int, rng: random.Random) -> list[_Device]:
    if n_devices > len(PRODUCT_NAMES) * 9:
        raise ValueError(f"at most {len(PRODUCT_NAMES) * 9} devices")
    devices = []
    for d in range(n_devices):
        # Four-digit model numbers: no overlap with the three-digit codes.
        name = f"{PRODUCT_NAMES[d % len(PRODUCT_NAMES)]} {1000 * (2 + d // len(PRODUCT_NAMES)) + 100 * (d % 9)}"
        base = 100 + 10 * d  # E-100..E-109 for the first device, E-110.. for the next: neighbours exist
        faults = rng.sample(range(len(FAULTS)), codes_per_device)
        codes = [(f"E-{base + i}", fault) for i, fault in enumerate(faults)]
        parts = [(f"P-{base + i}-{'ABCD'[j % 4]}", kind)
                 for j, (i, kind) in enumerate(zip(range(4), rng.sample(PART_KINDS, 4), strict=True))]
        versions = [(f"v{d + 1}.{minor}.{rng.randint(0, 4)}", note) for minor, note in
                    enumerate(("first release", "faster start-up and a quieter pump", "fixes the display flicker"))]
        devices.append(_Device(name, codes, parts, versions))
    return devices


def _guide_key(title: str) -> str:
    return f"pages/guide-{_slug(title.replace(' ', '-')).replace('--', '-')}.md"


def _slug(name: str) -> str:
    return name.lower().replace(" ", "-")


def _error_pages(device: _Device, per_page: int = 3) -> list[tuple[str, str, list[str]]]:
    pages = []
    for start in range(0, len(device.codes), per_page):
        chunk = device.codes[start:start + per_page]
        rows = "\n".join(f"| {code} | {FAULTS[f][1]} | {FAULTS[f][2]} |" for code, f in chunk)
        text = (f"## {device.name}: error codes {chunk[0][0]} to {chunk[-1][0]}\n\n"
                f"The display of the {device.name} shows one of these codes when it stops.\n\n"
                f"| Code | Meaning | What to do |\n|---|---|---|\n{rows}\n")
        pages.append((f"pages/{_slug(device.name)}-errors-{start // per_page + 1}.md", text, [c for c, _ in chunk]))
    return pages


def _parts_page(device: _Device) -> tuple[str, str, list[str]]:
    rows = "\n".join(f"| {number} | {kind} | {device.name} |" for number, kind in device.parts)
    text = (f"## {device.name}: spare parts\n\nOrder spare parts by their part number.\n\n"
            f"| Part number | Part | Fits |\n|---|---|---|\n{rows}\n")
    return f"pages/{_slug(device.name)}-parts.md", text, [n for n, _ in device.parts]


def _firmware_page(device: _Device) -> tuple[str, str, list[str]]:
    lines = "\n".join(f"- **{version}**: {note}." for version, note in device.versions)
    text = f"## {device.name}: firmware history\n\n{lines}\n\nUpdate over Wi-Fi from the settings menu.\n"
    return f"pages/{_slug(device.name)}-firmware.md", text, [v for v, _ in device.versions]


def _jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def _photograph(image: Image.Image, rng: random.Random, background: tuple[int, int, int]) -> bytes:
    """Rotate, add sensor noise and blur, compress: a hand-held phone photo of a flat rendering."""
    angle = rng.uniform(-12, 12)
    image = image.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True, fillcolor=background)
    scale = rng.uniform(0.55, 1.0)
    image = image.resize((max(64, int(image.width * scale)), max(64, int(image.height * scale))),
                         Image.Resampling.BILINEAR)
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0, rng.uniform(4, 16), (image.height, image.width, 3))
    image = Image.fromarray((np.asarray(image, dtype=np.float32) + noise).clip(0, 255).astype(np.uint8))
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 1.3)))
    return _jpeg(image, rng.randint(35, 85))


def render_display(code: str, device: str, rng: random.Random) -> bytes:
    """A photo of a device panel showing ``ERROR <code>`` (and the model name, small)."""
    panel, ink = rng.choice(PANELS)
    body = tuple(rng.randint(90, 200) for _ in range(3))
    width, height = rng.choice(((800, 480), (960, 600), (720, 540)))
    image = Image.new("RGB", (width, height), body)  # type: ignore[arg-type]
    draw = ImageDraw.Draw(image)
    margin = rng.randint(40, 90)
    draw.rounded_rectangle((margin, margin, width - margin, height - margin), radius=18, fill=panel)
    font_name = rng.choice(FONT_FILES[:6])
    big = load_font(font_name, rng.randint(52, 72))
    small = load_font(font_name, rng.randint(22, 28))
    x = margin + rng.randint(30, 60)
    draw.text((x, margin + 24), device.upper(), font=small, fill=ink)
    word = rng.choice(("ERROR", "ERR", "FAULT"))
    lines = [f"{word} {code}"] if rng.random() < 0.5 else [word, code]
    y = margin + rng.randint(80, 110)
    for line in lines:
        draw.text((x, y), line, font=big, fill=ink)
        y += int(big.size * 1.3)
    return _photograph(image, rng, body)  # type: ignore[arg-type]


def render_part(number: str, kind: str, rng: random.Random) -> bytes:
    """A photo of a part with a white label: its part number and what it is."""
    background = tuple(rng.randint(150, 230) for _ in range(3))
    image = Image.new("RGB", (800, 600), background)  # type: ignore[arg-type]
    draw = ImageDraw.Draw(image)
    metal = rng.randint(70, 140)
    draw.ellipse((120, 80, 680, 520), fill=(metal, metal, metal + 10))
    draw.rectangle((230, 230, 590, 390), fill=(250, 250, 245))
    font_name = rng.choice(FONT_FILES)
    draw.text((250, 245), number, font=load_font(font_name, 58), fill=(10, 10, 10))
    draw.text((250, 330), kind, font=load_font(font_name, 30), fill=(40, 40, 40))
    return _photograph(image, rng, background)  # type: ignore[arg-type]


def build_support_kb(
    n_devices: int = 12, *, codes_per_device: int = 6, display_photos_per_code: int = 1,
    part_photos: bool = True, seed: int = 0, unanswerable: bool = True, guides: bool = True,
) -> tuple[list[SupportSnippet], list[SupportQuery]]:
    """The snippets and the queries (with ground truth); deterministic for a seed.

    ``guides`` adds the how-to pages of ``GUIDES`` and their ``customer`` questions (two per guide:
    variants 0-1 for seed 0, the one tuned on; 2-3 for every other seed).

    ``unanswerable`` appends questions the KB cannot answer (nothing is relevant): per device a code
    and a part number next to its own but not in the KB (as text, and the code as a display photo),
    one device the KB does not hold, and off-topic questions. They come last and draw from their own
    random stream, so the answerable queries of a seed are the same with or without them.
    """
    rng = random.Random(seed)
    devices = _catalogue(n_devices, codes_per_device, rng)
    snippets: list[SupportSnippet] = []
    queries: list[SupportQuery] = []
    page_of: dict[str, str] = {}  # identifier -> key of the page that lists it
    photos_of: dict[str, list[str]] = {}  # error code -> keys of photos showing it
    for device in devices:
        for key, text, identifiers in [*_error_pages(device), _parts_page(device), _firmware_page(device)]:
            snippets.append(SupportSnippet(key, "page", text=text))
            page_of.update(dict.fromkeys(identifiers, key))
        for code, _fault in device.codes:
            for n in range(display_photos_per_code):
                key = f"photos/display-{code.lower()}-{n + 1}.jpg"
                snippets.append(SupportSnippet(key, "display_photo", image=render_display(code, device.name, rng),
                                               shows=[code]))
                photos_of.setdefault(code, []).append(key)
        if part_photos:
            for number, kind in device.parts:
                key = f"photos/part-{number.lower()}.jpg"
                snippets.append(SupportSnippet(key, "part_photo", image=render_part(number, kind, rng),
                                               shows=[number]))
                photos_of.setdefault(number, []).append(key)
    for title, body in CARE_TOPICS:
        snippets.append(SupportSnippet(f"pages/care-{title.lower()}.md", "page", text=f"## {title}\n\n{body}\n"))
    if guides:
        for title, body, _ in GUIDES:
            snippets.append(SupportSnippet(_guide_key(title), "page", text=f"## {title}\n\n{body}\n"))

    for device in devices:
        for code, fault in device.codes:
            page = page_of[code]
            relevant = [page, *photos_of.get(code, [])]
            template = rng.choice(("my screen says {code}", "what does {code} mean on the {device}?",
                                   "{device} shows {code}, what should I do?", "how do I fix error {code}"))
            queries.append(SupportQuery("identifier", template.format(code=code, device=device.name),
                                        relevant=relevant, primary=page, identifier=code))
            photo = render_display(code, device.name, random.Random(rng.getrandbits(32)))
            queries.append(SupportQuery("display_photo", rng.choice(("what does this mean?", "what is this error?",
                                                                      "help, my display shows this")),
                                        image=photo, relevant=relevant, primary=page, identifier=code))
            symptom = FAULTS[fault][3]
            queries.append(SupportQuery("paraphrase", f"{symptom} on my {device.name}, what now?",
                                        relevant=[page], primary=page))
        for number, kind in device.parts:
            queries.append(SupportQuery("identifier", f"where can I order {number}?",
                                        relevant=[page_of[number], *photos_of.get(number, [])],
                                        primary=page_of[number], identifier=number))
        version = device.versions[-1][0]
        queries.append(SupportQuery("identifier", f"what changed in firmware {version}?",
                                    relevant=[page_of[version]], primary=page_of[version], identifier=version))
    if guides:  # no random draws: the other queries of a seed are the same with or without them
        variants = (0, 1) if seed == 0 else (2, 3)
        for title, _, questions in GUIDES:
            key = _guide_key(title)
            queries.extend(SupportQuery("customer", questions[v], relevant=[key], primary=key) for v in variants)
    if unanswerable:
        queries.extend(_unanswerable(devices, codes_per_device, random.Random(seed * 7919 + 104729)))
    return snippets, queries


OFF_TOPIC = ("what is the weather in Paris tomorrow?", "recommend a good pizza recipe",
             "who won the football world cup in 1998?", "how do I renew my passport?",
             "write a poem about the sea", "what is the capital of Australia?")


def _unanswerable(devices: list[_Device], codes_per_device: int, rng: random.Random) -> list[SupportQuery]:
    """Questions about codes, parts and devices the KB does not hold, and off-topic ones (nothing relevant)."""
    out: list[SupportQuery] = []
    known = {code for d in devices for code, _ in d.codes}
    for d, device in enumerate(devices):
        base = 100 + 10 * d
        code = f"E-{base + rng.randint(codes_per_device, 9)}"  # beside the device's own codes, not one of them
        assert code not in known
        out.append(SupportQuery("unanswerable", f"my {device.name} shows {code}, what does it mean?", identifier=code))
        out.append(SupportQuery("unanswerable", rng.choice(("what does this mean?", "what is this error?")),
                                image=render_display(code, device.name, random.Random(rng.getrandbits(32))),
                                identifier=code))
        part = f"P-{base + rng.randint(4, 9)}-{rng.choice('EFGH')}"
        out.append(SupportQuery("unanswerable", f"where can I order {part}?", identifier=part))
    for n in range(max(1, len(devices) // 2)):
        name = f"{rng.choice(PRODUCT_NAMES)} {9000 + 100 * n + rng.randint(0, 9) * 10}"
        out.append(SupportQuery("unanswerable", f"how do I reset the {name}?"))
    out.extend(SupportQuery("unanswerable", text) for text in OFF_TOPIC)
    return out


def write_support_kb(out: Path, snippets: list[SupportSnippet], queries: list[SupportQuery]) -> None:
    """Pages as ``.md``, photos as ``.jpg`` (no sidecars), and ``queries.jsonl`` (+ query photos)."""
    out = Path(out)
    for snippet in snippets:
        path = out / "kb" / snippet.key
        path.parent.mkdir(parents=True, exist_ok=True)
        if snippet.image is not None:
            path.write_bytes(snippet.image)
        else:
            path.write_text(snippet.text, encoding="utf-8")
    (out / "queries").mkdir(parents=True, exist_ok=True)
    with (out / "queries.jsonl").open("w", encoding="utf-8") as handle:
        for n, query in enumerate(queries):
            record = asdict(query)
            if query.image is not None:
                image_path = out / "queries" / f"q{n:04d}.jpg"
                image_path.write_bytes(query.image)
                record["image"] = str(image_path.relative_to(out))
            handle.write(json.dumps(record) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the knowledge base and queries here")
    parser.add_argument("--preview", action="store_true", help="print a summary and a few samples")
    args = parser.parse_args()
    snippets, queries = build_support_kb(args.devices, seed=args.seed)
    kinds: dict[str, int] = {}
    for item in [*snippets, *queries]:
        kinds[item.kind] = kinds.get(item.kind, 0) + 1
    print(f"{len(snippets)} snippets, {len(queries)} queries: {kinds}")
    if args.preview:
        print(snippets[0].text)
        for query in queries[:4]:
            print(query.kind, repr(query.text), "->", query.primary, f"({len(query.relevant)} relevant)")
    if args.out:
        write_support_kb(args.out, snippets, queries)
        print(f"written to {args.out}")


if __name__ == "__main__":
    main()
