"""Write a small demo inbox: a few generated images with caption sidecars and a markdown manual."""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image, ImageDraw

ITEMS = [
    ("red-error-light", (200, 30, 30), "Router front panel with the red error light on: the WAN link is down."),
    ("green-status-light", (30, 170, 60), "Router front panel with a steady green light: everything works."),
    ("usb-c-cable", (60, 60, 200), "A USB-C to USB-C cable, 1 m, rated 100 W: the charger cable in the box."),
    ("hdmi-cable", (40, 40, 40), "An HDMI 2.1 cable with gold plugs: connects the box to a TV."),
]

MANUAL = """# Quick start

Plug the power cable into the back of the router and wait two minutes.

# Status lights

A steady green light means the router is online. A red light means the WAN link is down:
check the cable to the wall socket, then restart the router.

# Cables

Use the supplied USB-C cable for charging; HDMI connects the box to a television.
"""


def main(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for name, color, caption in ITEMS:
        image = Image.new("RGB", (320, 240), (235, 235, 235))
        draw = ImageDraw.Draw(image)
        draw.rectangle((40, 60, 280, 180), fill=color)
        draw.text((50, 200), name, fill=(0, 0, 0))
        image.save(dest / f"{name}.png")
        (dest / f"{name}.txt").write_text(caption + "\n", encoding="utf-8")
    (dest / "manual.md").write_text(MANUAL, encoding="utf-8")
    print(f"demo inbox written to {dest}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "inbox"))
