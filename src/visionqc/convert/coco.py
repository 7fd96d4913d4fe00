"""COCO / LVIS instances JSON.

Policy: bbox [x, y, w, h] → bbox_2d [x1, y1, x2, y2]; with `geometry: auto` (default) a polygon
segmentation becomes poly instead, keeping the largest part when there are several (the rest is
reported). iscrowd annotations are reported and skipped: a crowd region is not a countable
instance. A non-crowd RLE mask falls back to its bbox, reported as rle_as_bbox.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import orjson
from shapely.geometry import Polygon

from visionqc.convert.common import CocoOptions, Issue, Shape, SourceImage


def _xywh_corners(bbox) -> list[tuple[float, float]]:
    x, y, w, h = (float(v) for v in bbox)
    return [(x, y), (x + w, y + h)]


def _largest_part(parts: list[list[float]]) -> tuple[list[tuple[float, float]], int]:
    rings = [[(float(p[i]), float(p[i + 1])) for i in range(0, len(p) - 1, 2)] for p in parts if len(p) >= 6]
    if not rings:
        return [], 0
    best = max(rings, key=lambda ring: Polygon(ring).area)
    return best, len(rings) - 1


def read(annotations: Path, options: CocoOptions) -> Iterator[SourceImage]:
    images_root = Path(options.images) if options.images else annotations.parent
    mode = options.geometry
    doc = orjson.loads(annotations.read_bytes())
    rel = annotations.name
    categories = {c["id"]: c["name"] for c in doc.get("categories", [])}
    by_image = defaultdict(list)
    for ann in doc.get("annotations", []):
        by_image[ann["image_id"]].append(ann)
    for image in sorted(doc.get("images", []), key=lambda im: im["id"]):
        shapes, issues = [], []
        for ann in sorted(by_image.get(image["id"], []), key=lambda a: a["id"]):
            ref = f"annotation id={ann['id']}"
            name = categories.get(ann.get("category_id"))
            segmentation = ann.get("segmentation")
            if name is None:
                issues.append(Issue(rel, ref, "unknown_category", f"category_id {ann.get('category_id')} not in categories"))
            elif ann.get("iscrowd"):
                issues.append(Issue(rel, ref, "crowd_region", "iscrowd=1 regions are not converted"))
            elif mode == "auto" and isinstance(segmentation, list) and segmentation:
                ring, extra = _largest_part(segmentation)
                if extra:
                    issues.append(Issue(rel, ref, "extra_polygon_parts", f"{extra} smaller part(s) dropped, largest kept"))
                shapes.append(Shape("poly", ring, name, {}, ref))
            elif ann.get("bbox"):
                if mode == "auto" and isinstance(segmentation, dict):
                    issues.append(Issue(rel, ref, "rle_as_bbox", "RLE mask converted to its bbox"))
                shapes.append(Shape("bbox", _xywh_corners(ann["bbox"]), name, {}, ref))
            else:
                issues.append(Issue(rel, ref, "missing_geometry", "no bbox and no polygon segmentation"))
        file_name = image["file_name"]
        yield SourceImage(file_name, images_root / file_name, rel, (int(image["width"]), int(image["height"])), shapes, issues)
