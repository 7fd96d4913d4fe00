"""A small street-scene export with English class names, in CVAT and YOLO form, written by the tests.

Not the demo's categories and not the demo's writers: the XML and the label files are spelled out here, as the tools
write them, so that a team's project is tried on data the pipeline has never seen.
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

CLASSES = ["Cars", "Two-wheelers", "Pedestrians"]
COLOURS = {"Cars": (200, 40, 40), "Two-wheelers": (40, 160, 40), "Pedestrians": (40, 40, 200)}
SIZE = (160, 120)


def scenes(count: int, seed: int = 5) -> list[list[tuple[str, tuple[int, int, int, int]]]]:
    """Per image, its boxes (class, x1, y1, x2, y2): one to three objects, drawn where they are."""
    rng = random.Random(seed)
    made = []
    for _ in range(count):
        boxes = []
        for _ in range(rng.randint(1, 3)):
            x1, y1 = rng.randint(0, 110), rng.randint(0, 80)
            boxes.append((rng.choice(CLASSES), (x1, y1, x1 + rng.randint(20, 45), y1 + rng.randint(15, 35))))
        made.append(boxes)
    return made


def draw(boxes, path: Path) -> None:
    image = Image.new("RGB", SIZE, (128, 128, 128))
    pen = ImageDraw.Draw(image)
    for name, box in boxes:
        pen.rectangle(box, fill=COLOURS[name])
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def write_cvat(folder: Path, count: int = 8, seed: int = 5) -> dict[str, int]:
    """annotations.xml + images/: boxes, and one lane polyline per image. Returns the class counts written."""
    counts: dict[str, int] = {}
    images = []
    for index, boxes in enumerate(scenes(count, seed)):
        name = f"street_{index:03d}.png"
        draw(boxes, folder / "images" / name)
        shapes = [f'    <box label="{label}" occluded="0" source="manual" xtl="{x1}" ytl="{y1}" xbr="{x2}" ybr="{y2}" z_order="0"/>'
                  for label, (x1, y1, x2, y2) in boxes]
        shapes.append('    <polyline label="Lane" occluded="0" source="manual" points="0.0,110.0;159.0,100.0" z_order="0"/>')
        for label, _ in boxes:
            counts[label] = counts.get(label, 0) + 1
        counts["Lane"] = counts.get("Lane", 0) + 1
        images.append(f'  <image id="{index}" name="{name}" width="{SIZE[0]}" height="{SIZE[1]}">\n' + "\n".join(shapes) + "\n  </image>")
    labels = "".join(f"<label><name>{name}</name><type>any</type><attributes/></label>" for name in [*CLASSES, "Lane"])
    xml = ('<?xml version="1.0" encoding="utf-8"?>\n<annotations>\n  <version>1.1</version>\n'
           f"  <meta><job><labels>{labels}</labels></job></meta>\n" + "\n".join(images) + "\n</annotations>\n")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "annotations.xml").write_text(xml, "utf-8")
    return counts


def write_yolo(folder: Path, count: int = 8, seed: int = 6) -> dict[str, int]:
    """data.yaml + images/ + labels/ (Ultralytics layout), boxes only. Returns the class counts written."""
    counts: dict[str, int] = {}
    (folder / "labels").mkdir(parents=True, exist_ok=True)
    (folder / "data.yaml").write_text("names:\n" + "".join(f"  - {name}\n" for name in CLASSES), "utf-8")
    width, height = SIZE
    for index, boxes in enumerate(scenes(count, seed)):
        draw(boxes, folder / "images" / f"road_{index:03d}.png")
        lines = []
        for label, (x1, y1, x2, y2) in boxes:
            lines.append(f"{CLASSES.index(label)} {(x1 + x2) / 2 / width:.6f} {(y1 + y2) / 2 / height:.6f} "
                         f"{(x2 - x1) / width:.6f} {(y2 - y1) / height:.6f}")
            counts[label] = counts.get(label, 0) + 1
        (folder / "labels" / f"road_{index:03d}.txt").write_text("\n".join(lines) + "\n", "utf-8")
    return counts
