"""CVAT for images 1.1 XML: one `annotations.xml` for every image, the images under `images/`.

Policy: box → bbox_2d (a box with a non-zero `rotation` → a poly of its four corners), polygon →
poly, polyline → line; `occluded="1"` becomes the attribute 遮挡=是 and each `<attribute>` child a
desc attribute; shapes are ordered by `z_order` (drawing order), ties in file order. points, mask,
ellipse, cuboid and skeleton shapes are reported (the contract has no such geometry), and so are
shapes whose label is not among the `<meta>` label definitions. An image is `images/<name>`
(or `images/<subset>/<name>`, as project exports with subsets lay them out). `<tag>` elements are the image's
classes, kept in the record's metadata. `<track>` elements (CVAT for video) are reported whole.

The XML is read with defusedxml: exports are untrusted files. It is streamed (`iterparse`), each
`<image>` and `<track>` freed once read, so a file of a million images needs the memory of one. A
file that does not parse stops convert with its line and column: it holds every image, so there is
nothing to convert around (what was read before the error is discarded with the staged outputs).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

from defusedxml import ElementTree
from defusedxml.common import DefusedXmlException

from visionqc.convert.common import CvatOptions, Issue, Shape, SourceImage, beyond_edge, export_file, images_folder

SHAPE_KINDS = {"box": "bbox", "polygon": "poly", "polyline": "line"}
REPORTED = ("points", "mask", "ellipse", "cuboid", "skeleton")


def top_level(path: Path) -> Iterator[object]:
    """The children of a CVAT file's <annotations>, each complete, freed after the caller is done with it; a file that is
    not CVAT XML is a ValueError naming it (file:line:column)."""
    depth, root = 0, None
    try:
        for event, node in ElementTree.iterparse(path, events=("start", "end"), forbid_dtd=True):
            if event == "start":
                if root is None:
                    root = node
                    if root.tag != "annotations":
                        raise ValueError(f"{path}: the root element is <{root.tag}>, not CVAT's <annotations>; "
                                         "export as 'CVAT for images 1.1'")
                depth += 1
                continue
            depth -= 1
            if depth == 1:
                yield node
                root.remove(node)
    except ElementTree.ParseError as exc:
        line, column = exc.position
        raise ValueError(f"{path}:{line}:{column}: not well-formed XML ({exc}); re-export it from CVAT") from exc
    except DefusedXmlException as exc:
        raise ValueError(f"{path}: refused ({exc}); an export has no entities or DTDs") from exc


def label_names(meta) -> set[str] | None:
    """The label names defined in <meta> (task, job or project), or None when the export defines none."""
    names = {(node.findtext("name") or "").strip() for node in meta.iterfind(".//labels/label")}
    return names - {""} or None


def rotated_box(x1: float, y1: float, x2: float, y2: float, degrees: float) -> list[tuple[float, float]]:
    """The corners of a box turned `degrees` clockwise (image coordinates, y down) about its centre."""
    cx, cy, hw, hh = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
    cos, sin = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return [(cx + dx * cos - dy * sin, cy + dx * sin + dy * cos) for dx, dy in ((-hw, -hh), (hw, -hh), (hw, hh), (-hw, hh))]


def _points(text: str) -> list[tuple[float, float]]:
    return [(float(x), float(y)) for x, y in (pair.split(",") for pair in text.split(";") if pair.strip())]


def _geometry(node) -> tuple[str, list[tuple[float, float]]]:
    if node.tag == "box":
        x1, y1, x2, y2 = (float(node.get(name)) for name in ("xtl", "ytl", "xbr", "ybr"))
        rotation = float(node.get("rotation") or 0) % 360
        if rotation:
            return "poly", rotated_box(x1, y1, x2, y2, rotation)
        return "bbox", [(x1, y1), (x2, y2)]
    return SHAPE_KINDS[node.tag], _points(node.get("points") or "")


def _shape(node, ref: str, rel: str, labels: set[str] | None, size: tuple[int, int] | None) -> Shape | Issue:
    label = (node.get("label") or "").strip()
    if node.tag in REPORTED:
        return Issue(rel, ref, f"unsupported_{node.tag}", f"CVAT {node.tag} {label or '?'}: the contract has no {node.tag} geometry")
    if node.tag not in SHAPE_KINDS:
        return Issue(rel, ref, "unsupported_shape", f"CVAT <{node.tag}> is not a shape visionqc knows")
    if not label:
        return Issue(rel, ref, "missing_label", f"<{node.tag}> has no label")
    if labels is not None and label not in labels:
        return Issue(rel, ref, "unknown_label", f"label {label!r} is not defined in <meta> (defined: {', '.join(sorted(labels))})")
    try:
        kind, points = _geometry(node)
    except (TypeError, ValueError) as exc:
        return Issue(rel, ref, "bad_points", f"<{node.tag}> {label}: coordinates do not parse ({exc})")
    if node.tag == "box" and kind == "poly" and size and (why := beyond_edge(points, *size)):
        return Issue(rel, ref, "out_of_range", f"{label}: rotated box {why}")
    attributes = {}
    for attribute in node.iterfind("attribute"):
        name, value = (attribute.get("name") or "").strip(), (attribute.text or "").strip()
        if name and value:
            attributes[name] = value
    if node.get("occluded") == "1":
        attributes["遮挡"] = "是"
    return Shape.single(kind, points, label, attributes, ref)


def _z_order(node) -> float:
    try:
        return float(node.get("z_order") or 0)
    except ValueError:
        return 0.0


def read(export: Path, options: CvatOptions) -> Iterator[SourceImage]:
    path = export_file(export, ("annotations.xml",), "CVAT")
    rel, images_root = path.name, images_folder(path, options.images)
    labels, images, tracks = None, 0, 0
    for node in top_level(path):
        if node.tag == "meta":  # CVAT writes it before the images
            labels = label_names(node)
        elif node.tag == "image":
            yield _image(node, images, rel, images_root, labels)
            images += 1
        elif node.tag == "track":
            count = len(list(node))
            issue = Issue(rel, f"track id={node.get('id', tracks)}", "unsupported_track",
                          f"a CVAT for video track of {count} shapes; export the task as 'CVAT for images 1.1'", entries=count)
            yield SourceImage.report_only(rel, [issue], count)
            tracks += 1


def _image(image, index: int, rel: str, images_root: Path, labels: set[str] | None) -> SourceImage:
    """One <image> element → its SourceImage."""
    name = (image.get("name") or "").strip()
    ref = f"image id={image.get('id', index)}"
    nodes = [node for node in image if node.tag != "tag"]
    shapes, issues = [], []
    try:
        declared = (int(image.get("width")), int(image.get("height")))
    except (TypeError, ValueError):
        declared = None
    for position, node in sorted(enumerate(nodes), key=lambda item: _z_order(item[1])):
        found = _shape(node, f"{ref} {node.tag}[{position}]", rel, labels, declared)
        (issues if isinstance(found, Issue) else shapes).append(found)
    tags = [tag.get("label") for tag in image.iterfind("tag") if tag.get("label")]
    if not name:
        issues = [Issue(rel, ref, "bad_image_entry", "<image> has no name", entries=len(nodes))]
        return SourceImage.report_only(rel, issues, len(nodes))
    keys = [name] + ([f"{image.get('subset')}/{name}"] if image.get("subset") else [])
    key = next((k for k in keys if (images_root / k).is_file()), keys[0])
    return SourceImage(key, images_root / key, rel, declared, shapes, issues, len(nodes),
                       looked_for=" or ".join(str(images_root / k) for k in keys), metadata={"tags": tags} if tags else {})
