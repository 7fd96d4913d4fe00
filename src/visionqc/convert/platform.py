"""Labelling-platform GeoJSON export: one JSON per image, the image beside it with the same stem."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import orjson

from visionqc.convert.common import Issue, Part, PlatformOptions, Shape, SourceImage, as_text, bad_label, files_under, find_image

GEOMETRY_KINDS = {
    "ExtentPolygon": "bbox",
    "Polygon": "poly",
    "Square": "poly",
    "TiltRectangle": "poly",
    "Trapezium": "poly",
    "LineString": "line",
    "MultiPolygon": "poly",  # one instance in several parts (convert.multipart)
    "MultiLineString": "line",
}


def _points(coordinates) -> list[tuple[float, float]]:
    """The first run of [x, y] pairs in GeoJSON coordinates (the outer ring of a polygon)."""
    while coordinates and isinstance(coordinates[0], list) and coordinates[0] and isinstance(coordinates[0][0], list):
        coordinates = coordinates[0]
    return [(float(p[0]), float(p[1])) for p in coordinates]


def _parts(geometry: dict, kind: str, ref: str) -> list[Part]:
    coordinates = geometry.get("coordinates") or []
    if not isinstance(coordinates, list):
        raise ValueError(f"coordinates is a {type(coordinates).__name__}, not a list")
    if geometry.get("type", "").startswith("Multi"):
        return [Part(kind, _points(piece), f"{ref} part {i}") for i, piece in enumerate(coordinates)]
    return [Part(kind, _points(coordinates), ref)]


def read(root: Path, options: PlatformOptions) -> Iterator[SourceImage]:
    skip_quality = tuple(options.skip_quality)
    for path in files_under(root, "*.json"):
        rel = path.relative_to(root).as_posix()
        image = find_image(path)
        key = image.relative_to(root).as_posix() if image else rel
        try:
            export = orjson.loads(path.read_bytes())
            if not isinstance(export, dict):
                raise ValueError(f"the top level is a {type(export).__name__}, not an export object")
            info = export.get("info") or {}
            features = (export.get("markResult") or {}).get("features") or []
            if not isinstance(features, list) or not isinstance(info, dict):
                raise ValueError("markResult.features must be a list and info an object")
        except (ValueError, AttributeError, OSError) as exc:  # orjson.JSONDecodeError is a ValueError
            yield SourceImage.report_only(rel, [Issue(rel, "", "unreadable_export", f"{rel}: {exc}", entries=0)], 0)
            continue
        shapes, issues = [], []
        for index, feature in enumerate(features):
            try:
                found = _feature(feature, index, rel, skip_quality)
            except (AttributeError, TypeError, ValueError, IndexError, KeyError) as exc:
                found = Issue(rel, f"features[{index}]", "bad_feature", f"{type(exc).__name__}: {exc}")
            (issues if isinstance(found, Issue) else shapes).append(found)
        try:
            declared = (int(info["width"]), int(info["height"])) if info.get("width") and info.get("height") else None
        except (TypeError, ValueError):
            declared = None
        yield SourceImage(key, image, rel, declared, shapes, issues, len(features), looked_for=f"{path.stem}.* beside {rel}")


def _feature(feature: dict, index: int, rel: str, skip_quality: tuple[str, ...]) -> Shape | Issue:
    """One GeoJSON feature → a shape, or the issue that says why it is not converted."""
    if not isinstance(feature, dict):
        return Issue(rel, f"features[{index}]", "bad_feature", f"a feature must be an object, got {type(feature).__name__}")
    geometry = feature.get("geometry") or {}
    props = feature.get("properties") or {}
    content = dict(props.get("content") or {})
    label = as_text(content.pop("label", ""))
    ref = f"features[{index}] objectId={props.get('objectId', '?')}"
    if label is None:
        return bad_label(rel, ref, (props.get("content") or {}).get("label"))
    kind = GEOMETRY_KINDS.get(geometry.get("type"))
    status = (props.get("quality") or {}).get("qualityStatus")
    if kind is None:
        return Issue(rel, ref, "unsupported_geometry", f"geometry type {geometry.get('type')!r} has no contract geometry")
    if not label:
        return Issue(rel, ref, "missing_label", "properties.content.label is empty")
    if status in skip_quality:
        return Issue(rel, ref, "quality_rejected", f"qualityStatus={status}")
    try:
        return Shape(_parts(geometry, kind, ref), label, content, ref)
    except (TypeError, ValueError, IndexError, KeyError) as exc:
        return Issue(rel, ref, "bad_coordinates", str(exc))
