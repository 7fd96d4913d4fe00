"""Dense answers: the strict reader of the form training teaches, object shapes, and one-to-one matching.

Shared by eval_dense (detection quality) and qa_labels (does the model's answer agree with the label?).
A dense answer is `{"图片_N": [{"bbox_2d"|"poly"|"line": [0-1000 coordinates], "desc": "类别=…"}]}`;
`parse_dense` maps it back to pixels or names why it breaks the form.
"""

from __future__ import annotations

import json
import re

import numpy as np
from shapely.geometry import LineString, Polygon, box
from shapely.validation import make_valid

from visionqc import contract

IMAGE_KEY_PATTERN = re.compile(r"^图片_(\d+)$")
SHAPE_LENGTH = {"bbox_2d": (4, 4), "poly": (8, None), "line": (4, None)}
LINE_TOLERANCE = 4.0  # pixels each side of a line
MATCH_IOU = 0.5


# --- reading answers ----------------------------------------------------------------------------


def parse_dense(raw: str, image_count: int, width: int, height: int) -> tuple[list[dict] | None, str | None]:
    """A dense answer → (objects in pixels with image_index, None), or (None, problem) when it breaks the form."""
    try:
        payload = json.loads(raw)
    except (json.JSONDecodeError, TypeError):
        return None, "not_json"
    if not isinstance(payload, dict):
        return None, "not_object"
    objects = []
    for key, items in payload.items():
        match = IMAGE_KEY_PATTERN.match(key)
        if not match or not 1 <= int(match.group(1)) <= image_count:
            return None, "bad_image_key"
        if not isinstance(items, list):
            return None, "bad_object"
        for item in items:
            obj = _parse_object(item, width, height)
            if obj is None:
                return None, "bad_object"
            obj["image_index"] = int(match.group(1)) - 1
            objects.append(obj)
    return objects, None


def _parse_object(item, width: int, height: int) -> dict | None:
    if not isinstance(item, dict) or not isinstance(item.get("desc"), str) or not item["desc"].strip():
        return None
    shapes = [key for key in contract.GEOMETRY_KEYS if key in item]
    if len(shapes) != 1 or set(item) != {shapes[0], "desc"}:
        return None
    key, flat = shapes[0], item[shapes[0]]
    low, high = SHAPE_LENGTH[key]
    if (not isinstance(flat, list) or len(flat) % 2 or len(flat) < low or (high and len(flat) > high)
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1000 for v in flat)):
        return None
    pixels = [v * (width if i % 2 == 0 else height) / 1000 for i, v in enumerate(flat)]
    if key == "bbox_2d" and (pixels[0] >= pixels[2] or pixels[1] >= pixels[3]):
        return None
    return {key: pixels, "desc": item["desc"]}


# --- shapes and matching ------------------------------------------------------------------------


def shape_of(obj: dict, line_tolerance: float):
    """The area an object covers: its box, its polygon (made valid), or its line buffered by the tolerance."""
    key = contract.geometry_key(obj)
    flat = obj[key]
    points = list(zip(flat[0::2], flat[1::2], strict=True))
    if key == "bbox_2d":
        return box(*flat)
    if key == "poly":
        polygon = Polygon(points)
        return polygon if polygon.is_valid else make_valid(polygon)
    return LineString(points).buffer(line_tolerance)


def iou(a, b) -> float:
    union = a.union(b).area
    return a.intersection(b).area / union if union > 0 else 0.0


def match_class(truth: list[dict], predicted: list[dict], threshold: float, line_tolerance: float) -> list[tuple[int, int, float]]:
    """One-to-one matches (truth index, prediction index, IoU) with IoU >= threshold, maximising the total IoU."""
    from scipy.optimize import linear_sum_assignment

    if not truth or not predicted:
        return []
    truth_shapes = [shape_of(o, line_tolerance) for o in truth]
    predicted_shapes = [shape_of(o, line_tolerance) for o in predicted]
    overlap = np.array([[iou(t, p) for p in predicted_shapes] for t in truth_shapes])
    rows, cols = linear_sum_assignment(-overlap)
    return [(int(r), int(c), float(overlap[r, c])) for r, c in zip(rows, cols, strict=True) if overlap[r, c] >= threshold]


def by_class(objects: list[dict]) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for obj in objects:
        grouped.setdefault(contract.desc_category(obj["desc"]), []).append(obj)
    return grouped


def same_objects(truth: list[dict], predicted: list[dict], threshold: float = MATCH_IOU, line_tolerance: float = LINE_TOLERANCE) -> bool:
    """Every object on both sides is matched one to one within its class and image at IoU >= threshold."""
    if len(truth) != len(predicted):
        return False
    for index in {o.get("image_index", 0) for o in truth} | {o.get("image_index", 0) for o in predicted}:
        mine = by_class([o for o in truth if o.get("image_index", 0) == index])
        theirs = by_class([o for o in predicted if o.get("image_index", 0) == index])
        for name in set(mine) | set(theirs):
            t, p = mine.get(name, []), theirs.get(name, [])
            if len(t) != len(p) or len(match_class(t, p, threshold, line_tolerance)) != len(t):
                return False
    return True
