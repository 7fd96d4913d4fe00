"""Pascal VOC XML: one file per image (`Annotations/<name>.xml` beside `JPEGImages/`, or the XML beside its image).

Policy: every `object` with a `bndbox` → bbox_2d, its `name` the category; `difficult`, `truncated`
and `occluded` set to 1 become desc attributes (难例, 截断, 遮挡), `pose` other than Unspecified too.
`object/part` boxes (VOC's person layout) are reported, not converted: the contract has no part
hierarchy. VOC has no polygons. XML is read with defusedxml: exports are untrusted files.

The image: `<filename>` in `JPEGImages/` beside `Annotations/`, else beside the XML, else an image
with the XML's stem beside it; otherwise the file is reported as missing_image. VOC boxes are
1-based inclusive pixel indices; they become the 0-based box [xmin - 1, ymin - 1, xmax, ymax].
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from defusedxml import ElementTree
from defusedxml.common import DefusedXmlException

from visionqc.convert.common import Issue, Shape, SourceImage, find_image

FLAGS = {"difficult": "难例", "truncated": "截断", "occluded": "遮挡"}


def _text(node, tag: str) -> str:
    found = node.find(tag)
    return (found.text or "").strip() if found is not None and found.text else ""


def _size(root) -> tuple[int, int] | None:
    size = root.find("size")
    try:
        width, height = int(_text(size, "width")), int(_text(size, "height"))
    except (AttributeError, ValueError):
        return None
    return (width, height) if width > 0 and height > 0 else None


def _image(path: Path, export: Path, filename: str) -> tuple[str, Path | None, str]:
    """(key, image file or None, where it looked)."""
    candidates = []
    if filename:
        if path.parent.name == "Annotations":
            candidates.append(path.parent.parent / "JPEGImages" / filename)
        candidates.append(path.parent / filename)
    for candidate in candidates:
        if candidate.is_file():
            return candidate.relative_to(export).as_posix() if candidate.is_relative_to(export) else candidate.name, candidate, ""
    beside = find_image(path)
    if beside is not None:
        return beside.relative_to(export).as_posix(), beside, ""
    looked = ", ".join(str(c.relative_to(export)) if c.is_relative_to(export) else str(c) for c in candidates)
    return filename or path.stem, None, f"{looked or 'no <filename>'}, no {path.stem}.* beside the XML"


def _box(node) -> list[tuple[float, float]]:
    box = node.find("bndbox")
    if box is None:
        raise ValueError("no bndbox")
    xmin, ymin, xmax, ymax = (float(_text(box, tag)) for tag in ("xmin", "ymin", "xmax", "ymax"))
    return [(xmin - 1, ymin - 1), (xmax, ymax)]


def read(export: Path, options=None) -> Iterator[SourceImage]:
    for path in sorted(export.rglob("*.xml")):
        rel = path.relative_to(export).as_posix()
        try:
            root = ElementTree.parse(path).getroot()
        except ElementTree.ParseError as exc:
            line, column = exc.position
            yield SourceImage.report_only(rel, [Issue(rel, f"line {line}", "unreadable_export",
                                                      f"{rel}:{line}:{column}: not well-formed XML ({exc})", entries=0)], 0)
            continue
        except (DefusedXmlException, OSError) as exc:
            yield SourceImage.report_only(rel, [Issue(rel, "", "unreadable_export", f"{rel}: {exc}", entries=0)], 0)
            continue
        if root.tag != "annotation":
            yield SourceImage.report_only(rel, [Issue(rel, root.tag, "unreadable_export",
                                                      f"{rel}: the root element is <{root.tag}>, not a VOC <annotation>", entries=0)], 0)
            continue
        key, image, looked_for = _image(path, export, _text(root, "filename"))
        shapes, issues, entries = [], [], 0
        for index, node in enumerate(root.findall("object")):
            ref = f"object[{index}]"
            entries += 1
            name = _text(node, "name")
            for part_index, part in enumerate(node.findall("part")):
                entries += 1
                issues.append(Issue(rel, f"{ref}/part[{part_index}]", "unsupported_part",
                                    f"VOC part {_text(part, 'name') or '?'} of {name or '?'}: the contract has no part hierarchy"))
            if not name:
                issues.append(Issue(rel, ref, "missing_label", "object has no <name>"))
                continue
            try:
                points = _box(node)
            except (TypeError, ValueError) as exc:
                issues.append(Issue(rel, ref, "bad_points", f"bndbox of {name} is not four numbers ({exc})"))
                continue
            attributes = {label: "是" for tag, label in FLAGS.items() if _text(node, tag) == "1"}
            pose = _text(node, "pose")
            if pose and pose != "Unspecified":
                attributes["姿态"] = pose
            shapes.append(Shape.single("bbox", points, name, attributes, ref))
        yield SourceImage(key, image, rel, _size(root), shapes, issues, entries, looked_for=looked_for)
