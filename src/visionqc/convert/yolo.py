"""YOLO (Ultralytics / Darknet) text labels: one `.txt` per image, one object per line, normalised to 0-1.

Policy: `class cx cy w h` → bbox_2d; `class x1 y1 x2 y2 …` (three points or more: segmentation, and
the four-corner oriented boxes) → poly. Class names come from `data.yaml` (`names` as a list or an
id → name map), else `classes.txt` or `obj.names`, else `convert.yolo.names`. Lines with an unknown
class id, coordinates outside 0-1, a number not written as writers print one ("0.", "nan": the mark
of a file cut short) or another number of fields are reported with file:line. YOLO has no
attributes and no end marker: a file cut exactly at a line's end reads as a shorter valid file.

The images: every image under the export; its labels are `labels/…/<stem>.txt` in place of
`images/…` (Ultralytics), else `<stem>.txt` beside it (Darknet). An image without a label file is a
background image (no objects, noted); a label file without an image is reported as missing_image.
The normalised coordinates are of the image as shown, EXIF orientation applied (as Ultralytics
measures it), so the image's upright size is read from its header.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import yaml
from PIL import Image

from visionqc.convert.common import EDGE_TOLERANCE, IMAGE_SUFFIXES, Issue, Shape, SourceImage, YoloOptions
from visionqc.images import orientation, upright_size

NAME_FILES = ("classes.txt", "obj.names")
NOT_LABELS = {"classes.txt", "train.txt", "val.txt", "valid.txt", "test.txt"}  # names and Darknet image lists
TOLERANCE = 1e-6
NUMBER = re.compile(r"[-+]?(\d+(\.\d+)?|\.\d+)([eE][-+]?\d+)?")  # as writers print them: no "0.", nan, inf or 1_0


def class_names(export: Path, options: YoloOptions) -> dict[int, str]:
    """Class id → name from data.yaml, classes.txt or obj.names (the first found), else convert.yolo.names."""
    for config in sorted(export.glob("*.yaml")) + sorted(export.glob("*.yml")):
        try:
            doc = yaml.safe_load(config.read_text("utf-8"))
        except yaml.YAMLError as exc:
            raise ValueError(f"{config}: not valid YAML ({exc})") from exc
        names = doc.get("names") if isinstance(doc, dict) else None
        if isinstance(names, list):
            return {i: str(name) for i, name in enumerate(names)}
        if isinstance(names, dict):
            try:
                return {int(i): str(name) for i, name in names.items()}
            except ValueError as exc:
                raise ValueError(f"{config}: names keys must be class ids ({exc})") from exc
    for name in NAME_FILES:
        if (export / name).is_file():
            lines = (export / name).read_text("utf-8").splitlines()
            return {i: line.strip() for i, line in enumerate(lines) if line.strip()}
    if options.names:
        return dict(enumerate(options.names))
    raise ValueError(f"{export}: no class names (data.yaml names, classes.txt or obj.names); "
                     f"add one, or list them in the dataset's convert.yolo.names")


def label_file(image: Path, export: Path) -> Path:
    """Where an image's labels are: Ultralytics' images/ → labels/ swap when the export has it, else beside it."""
    parts = image.relative_to(export).parts
    if "images" in parts:
        at = len(parts) - 1 - parts[::-1].index("images")
        swapped = export.joinpath(*parts[:at], "labels", *parts[at + 1:]).with_suffix(".txt")
        if swapped.is_file() or not image.with_suffix(".txt").is_file():
            return swapped
    return image.with_suffix(".txt")


def upright(image: Path) -> tuple[int, int] | None:
    """The size an image is shown at (EXIF orientation applied), from its header; None when it does not open."""
    try:
        with Image.open(image) as opened:
            return upright_size(opened.size, orientation(opened))
    except Exception:  # PIL raises many types for bad files; convert_image reports it as corrupt_image
        return None


def _line(fields: list[str], names: dict[int, str], size: tuple[int, int] | None, ref: str, rel: str) -> Shape | Issue:
    odd = next((field for field in fields[1:] if not NUMBER.fullmatch(field)), None)
    if odd is not None:
        return Issue(rel, ref, "bad_line", f"{odd[:20]!r} is not a number as YOLO writers print one (a truncated file?)")
    try:
        class_id, values = int(fields[0]), [float(v) for v in fields[1:]]
    except ValueError as exc:
        return Issue(rel, ref, "bad_line", f"not a class id and numbers ({exc})")
    if len(values) != 4 and (len(values) < 6 or len(values) % 2):
        return Issue(rel, ref, "bad_line", f"{len(values)} numbers after the class: 4 (a box) or an even 6 or more (a polygon)")
    if class_id not in names:
        return Issue(rel, ref, "unknown_class", f"class id {class_id} is not in the names (0-{max(names, default=-1)})")
    # a box's centre and size lie in 0-1; a polygon's (or oriented box's) corners may reach EDGE_TOLERANCE past the edge
    slack = TOLERANCE if len(values) == 4 else EDGE_TOLERANCE
    outside = [v for v in values if not -slack <= v <= 1 + slack]
    if outside:
        where = "0-1" if len(values) == 4 else f"0-1 by more than {EDGE_TOLERANCE:g} (nearer corners are clipped to the edge)"
        return Issue(rel, ref, "out_of_range", f"{names[class_id]}: coordinate {outside[0]:g} is outside {where}")
    width, height = size or (1, 1)  # no size: the image is missing or corrupt and convert reports the shape anyway
    if len(values) == 4:
        cx, cy, w, h = values
        points = [((cx - w / 2) * width, (cy - h / 2) * height), ((cx + w / 2) * width, (cy + h / 2) * height)]
        return Shape.single("bbox", points, names[class_id], {}, ref)
    points = [(values[i] * width, values[i + 1] * height) for i in range(0, len(values), 2)]
    return Shape.single("poly", points, names[class_id], {}, ref)


def _labels(path: Path, rel: str, names: dict[int, str], size: tuple[int, int] | None) -> tuple[list, list, int]:
    shapes, issues, entries = [], [], 0
    try:
        text = path.read_text("utf-8")
    except (UnicodeDecodeError, OSError) as exc:
        return [], [Issue(rel, "", "unreadable_export", f"{rel}: {exc}", entries=0)], 0
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        entries += 1
        found = _line(line.split(), names, size, f"line {number}", rel)
        (issues if isinstance(found, Issue) else shapes).append(found)
    return shapes, issues, entries


def read(export: Path, options: YoloOptions) -> Iterator[SourceImage]:
    if not export.is_dir():
        raise FileNotFoundError(f"{export}: YOLO export folder not found; point datasets.<name>.path at the folder holding data.yaml")
    names = class_names(export, options)
    images = sorted(p for p in export.rglob("*") if p.suffix in IMAGE_SUFFIXES and p.is_file())
    labelled = set()
    for image in images:
        labels = label_file(image, export)
        key = image.relative_to(export).as_posix()
        if not labels.is_file():
            note = Issue(key, key, "background_image", f"no label file ({labels.relative_to(export).as_posix()}): no objects",
                         entries=0, note=True)
            yield SourceImage(key, image, key, None, [], [note], 0)
            continue
        labelled.add(labels)
        rel = labels.relative_to(export).as_posix()
        size = upright(image)
        shapes, issues, entries = _labels(labels, rel, names, size)
        yield SourceImage(key, image, rel, size, shapes, issues, entries)
    for labels in sorted(export.rglob("*.txt")):
        if labels in labelled or labels.name in NOT_LABELS:
            continue
        rel = labels.relative_to(export).as_posix()
        shapes, issues, entries = _labels(labels, rel, names, None)
        looked = f"{labels.stem}.* in the images/ folder matching {rel}, or beside it"
        yield SourceImage(rel, None, rel, None, shapes, issues, entries, looked_for=looked)
