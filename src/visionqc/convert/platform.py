"""Labelling-platform GeoJSON export: one JSON per image, the image beside it with the same stem."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import orjson

from visionqc.convert.common import Issue, PlatformOptions, Shape, SourceImage, find_image

GEOMETRY_KINDS = {
    "ExtentPolygon": "bbox",
    "Polygon": "poly",
    "Square": "poly",
    "TiltRectangle": "poly",
    "Trapezium": "poly",
    "LineString": "line",
}
def _points(coordinates) -> list[tuple[float, float]]:
    """The first run of [x, y] pairs in GeoJSON coordinates (the outer ring of a polygon)."""
    while coordinates and isinstance(coordinates[0], list) and coordinates[0] and isinstance(coordinates[0][0], list):
        coordinates = coordinates[0]
    return [(float(p[0]), float(p[1])) for p in coordinates]


def read(root: Path, options: PlatformOptions) -> Iterator[SourceImage]:
    skip_quality = tuple(options.skip_quality)
    for path in sorted(root.rglob("*.json")):
        rel = path.relative_to(root).as_posix()
        image = find_image(path)
        key = image.relative_to(root).as_posix() if image else rel
        try:
            export = orjson.loads(path.read_bytes())
            info = export.get("info") or {}
            features = (export.get("markResult") or {}).get("features", [])
        except (orjson.JSONDecodeError, AttributeError) as exc:
            yield SourceImage(key, image, rel, None, [], [Issue(rel, "", "unreadable_export", str(exc))])
            continue
        shapes, issues = [], []
        for index, feature in enumerate(features):
            geometry = feature.get("geometry") or {}
            props = feature.get("properties") or {}
            content = dict(props.get("content") or {})
            label = str(content.pop("label", "")).strip()
            ref = f"features[{index}] objectId={props.get('objectId', '?')}"
            kind = GEOMETRY_KINDS.get(geometry.get("type"))
            status = (props.get("quality") or {}).get("qualityStatus")
            if kind is None:
                issues.append(Issue(rel, ref, "unsupported_geometry", f"geometry type {geometry.get('type')!r} has no contract geometry"))
            elif not label:
                issues.append(Issue(rel, ref, "missing_label", "properties.content.label is empty"))
            elif status in skip_quality:
                issues.append(Issue(rel, ref, "quality_rejected", f"qualityStatus={status}"))
            else:
                try:
                    shapes.append(Shape(kind, _points(geometry.get("coordinates") or []), label, content, ref))
                except (TypeError, ValueError, IndexError) as exc:
                    issues.append(Issue(rel, ref, "bad_coordinates", str(exc)))
        declared = (int(info["width"]), int(info["height"])) if info.get("width") and info.get("height") else None
        yield SourceImage(key, image, rel, declared, shapes, issues)
