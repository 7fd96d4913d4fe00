"""LabelMe JSON: one file per image, `imagePath` relative to it.

Policy: rectangle → bbox_2d, polygon → poly, line/linestrip → line, circle → a poly with
`circle_vertices` vertices. point and mask shapes and labels listed in `ignore_labels` are
reported, not converted: the contract has no point or mask geometry.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import orjson

from visionqc.convert.common import (
    Issue,
    LabelmeOptions,
    Shape,
    SourceImage,
    circle_polygon,
    find_image,
)

SHAPE_KINDS = {"rectangle": "bbox", "polygon": "poly", "line": "line", "linestrip": "line"}


def read(root: Path, options: LabelmeOptions) -> Iterator[SourceImage]:
    ignore = set(options.ignore_labels)
    vertices = int(options.circle_vertices)
    for path in sorted(root.rglob("*.json")):
        rel = path.relative_to(root).as_posix()
        try:
            doc = orjson.loads(path.read_bytes())
            image = path.parent / doc["imagePath"] if doc.get("imagePath") else find_image(path)
            if image is not None and not image.exists():
                image = find_image(path) or image
            shapes_in = doc.get("shapes") or []
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            yield SourceImage(rel, None, rel, None, [], [Issue(rel, "", "unreadable_export", str(exc))])
            continue
        try:
            key = image.resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            key = image.name
        shapes, issues = [], []
        for index, raw in enumerate(shapes_in):
            label = str(raw.get("label", "")).strip()
            kind = raw.get("shape_type") or "polygon"
            ref = f"shapes[{index}]"
            points = [(float(x), float(y)) for x, y in raw.get("points") or []]
            attributes = {name: "是" for name, on in (raw.get("flags") or {}).items() if on}
            if raw.get("description"):
                attributes["说明"] = raw["description"]
            if not label:
                issues.append(Issue(rel, ref, "missing_label", "shape has no label"))
            elif label in ignore:
                issues.append(Issue(rel, ref, "ignored_label", f"label {label!r} is in ignore_labels"))
            elif kind == "circle" and len(points) == 2:
                shapes.append(Shape("poly", circle_polygon(points[0], points[1], vertices), label, attributes, ref))
            elif kind in SHAPE_KINDS:
                shapes.append(Shape(SHAPE_KINDS[kind], points, label, attributes, ref))
            else:
                issues.append(Issue(rel, ref, f"unsupported_{kind}", f"LabelMe {kind} shapes have no contract geometry"))
        declared = (int(doc["imageWidth"]), int(doc["imageHeight"])) if doc.get("imageWidth") and doc.get("imageHeight") else None
        yield SourceImage(key, image, rel, declared, shapes, issues)
