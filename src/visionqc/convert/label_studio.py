"""Label Studio JSON export (the full one: a list of tasks, each with `annotations[].result[]`).

Policy: rectanglelabels → bbox_2d (with a non-zero `rotation`, turned clockwise about its top-left
corner as Label Studio draws it, → a poly of its four corners); polygonlabels → poly. Coordinates
are percentages of `original_width`/`original_height` and become pixels. A `choices` result that
shares a region's id (a per-region control) is that object's attribute; one that shares none is the
image's class, kept in the record's metadata under `choices`. A region's first label is its
category; further labels, if any, the attribute 其他标签. keypoint, ellipse and brush regions
are reported (no contract geometry), and so are coordinates outside 0-100% by more than
common.EDGE_TOLERANCE (2%; nearer ones are clipped to the edge, as in every format: a bbox
imported from COCO floats may end a fraction of a pixel past it). A result that is not an
object with a text type is reported as bad_result (it may have been a shape), an annotation whose
result is not a list as bad_annotation (its image is left out), a label that is not text as
bad_label; a choices control whose name or choices are not text is left out with a note.

Several annotations on a task: `convert.label_studio.annotations: latest` (default) converts the one
marked ground truth, else the latest updated; `first` the earliest created. Cancelled annotations
and the annotators not chosen are reported shape by shape. A task with no annotation is reported.

The image: the task's `data.image` (else its first value naming an image file), looked up under
`datasets.<name>.images` (default: images/ beside the JSON, else beside it) by its local-files path, its file name, or its
file name without the 8-hex-digit prefix that Label Studio's uploads add.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from urllib.parse import parse_qs, unquote, urlparse

import orjson

from visionqc.convert.common import (
    EDGE_TOLERANCE,
    IMAGE_SUFFIXES,
    Issue,
    LabelStudioOptions,
    Shape,
    SourceImage,
    as_text,
    bad_label,
    beyond_edge,
    export_file,
    images_folder,
)

REGION_KINDS = {"rectanglelabels": "bbox", "rectangle": "bbox", "polygonlabels": "poly", "polygon": "poly"}
REPORTED = {"keypointlabels": "keypoint", "keypoint": "keypoint", "ellipselabels": "ellipse", "ellipse": "ellipse",
            "brushlabels": "brush", "brush": "brush"}
UPLOAD_PREFIX = re.compile(r"^[0-9a-f]{8}-")
TOLERANCE = 100 * EDGE_TOLERANCE  # percent: nearer coordinates are clipped to the edge (common.EDGE_TOLERANCE)


def load(path: Path) -> list:
    try:
        tasks = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}); export the project again as JSON") from exc
    if isinstance(tasks, dict) and "data" in tasks:  # a single task
        tasks = [tasks]
    if not isinstance(tasks, list):
        raise ValueError(f"{path}: the top level is a {type(tasks).__name__}, not Label Studio's list of tasks")
    return tasks


def image_reference(data: dict) -> str:
    """The task's image URL: data.image, else the first value that names an image file."""
    if isinstance(data.get("image"), str):
        return data["image"]
    return next((value for value in data.values() if isinstance(value, str) and value.endswith(IMAGE_SUFFIXES)), "")


def image_candidates(url: str) -> list[str]:
    """Relative paths an image URL may have under the images folder, most specific first."""
    parsed = urlparse(url)
    local = parse_qs(parsed.query).get("d")  # /data/local-files/?d=<path under the storage root>
    if local:
        path = PurePosixPath(unquote(local[0]).lstrip("/"))
        if ".." in path.parts:
            return [path.as_posix()]  # climbs out of the storage root: convert_image reports it as unsafe_image_path
        return list(dict.fromkeys([path.as_posix(), path.name]))
    name = PurePosixPath(unquote(parsed.path)).name
    if not name:
        return []
    return [name, UPLOAD_PREFIX.sub("", name)] if UPLOAD_PREFIX.match(name) else [name]


def choose_annotation(annotations: list[dict], policy: str) -> dict | None:
    usable = [a for a in annotations if not a.get("was_cancelled")]
    if not usable:
        return None
    if policy == "first":
        return min(usable, key=lambda a: (str(a.get("created_at") or ""), str(a.get("id"))))
    return max(usable, key=lambda a: (bool(a.get("ground_truth")), str(a.get("updated_at") or a.get("created_at") or ""), str(a.get("id"))))


def rotated_rectangle(x: float, y: float, width: float, height: float, degrees: float) -> list[tuple[float, float]]:
    """Corners of a rectangle turned `degrees` clockwise (y down) about its top-left corner (x, y), in pixels."""
    cos, sin = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return [(x + dx * cos - dy * sin, y + dx * sin + dy * cos) for dx, dy in ((0, 0), (width, 0), (width, height), (0, height))]


class OutOfRange(ValueError):
    """A coordinate outside 0-100% (reported as out_of_range, not as a parse error)."""


def _percent(values: list[float], what: str) -> None:
    bad = [v for v in values if not (-TOLERANCE <= v <= 100 + TOLERANCE)]
    if bad:
        raise OutOfRange(f"{what} {bad[0]:g}% is outside 0-100% by more than {TOLERANCE:g}% (nearer ones are clipped to the edge)")


def _geometry(kind: str, value: dict, width: int, height: int) -> list[tuple[float, float]]:
    """A region's points in pixels; OutOfRange for coordinates outside 0-100%."""
    if kind == "bbox":
        x, y, w, h = (float(value[key]) for key in ("x", "y", "width", "height"))
        rotation = float(value.get("rotation") or 0) % 360
        _percent([x, y] + ([] if rotation else [x + w, y + h]), "x/y" if rotation else "x/y/x+width/y+height")
        points = [(x * width / 100, y * height / 100), ((x + w) * width / 100, (y + h) * height / 100)]
        if rotation:
            corners = rotated_rectangle(points[0][0], points[0][1], w * width / 100, h * height / 100, rotation)
            if why := beyond_edge(corners, width, height):
                raise OutOfRange(f"rotated rectangle {why}")
            return corners
        return points
    pairs = [(float(px), float(py)) for px, py in value["points"]]
    _percent([c for pair in pairs for c in pair], "point")
    return [(px * width / 100, py * height / 100) for px, py in pairs]


def _id(result: dict) -> str | int | None:
    """A result's id when it can tie a control to its region; None ties to nothing."""
    return result.get("id") if isinstance(result.get("id"), (str, int)) else None


def _value(result: dict) -> dict:
    return result["value"] if isinstance(result.get("value"), dict) else {}


def _size(results: list) -> tuple[int, int] | None:
    for result in results:
        try:
            width, height = int(result["original_width"]), int(result["original_height"])
        except (KeyError, TypeError, ValueError, OverflowError):
            continue
        if width > 0 and height > 0:
            return width, height
    return None


def _region(result: dict, ref: str, rel: str, size: tuple[int, int] | None, attributes: dict) -> Shape | Issue:
    kind_type = result.get("type")
    value = _value(result)
    labels = value.get(kind_type) if str(kind_type).endswith("labels") else value.get("labels")
    label = as_text(labels[0]) if isinstance(labels, list) and labels else ""
    if label is None:
        return bad_label(rel, ref, labels[0])
    if kind_type in REPORTED:
        return Issue(rel, ref, f"unsupported_{REPORTED[kind_type]}", f"Label Studio {kind_type} {label or '?'}: no contract geometry")
    if not label:
        return Issue(rel, ref, "missing_label", f"{kind_type} region has no label")
    if result.get("image_rotation"):
        return Issue(rel, ref, "rotated_view", f"{label}: drawn on a view rotated {result['image_rotation']}°; unrotate it in Label Studio")
    if size is None:
        return Issue(rel, ref, "missing_size", f"{label}: no original_width/original_height to turn percentages into pixels")
    try:
        points = _geometry(REGION_KINDS[kind_type], value, *size)
    except OutOfRange as exc:
        return Issue(rel, ref, "out_of_range", f"{label}: {exc}")
    except (KeyError, TypeError, ValueError) as exc:
        return Issue(rel, ref, "bad_points", f"{label}: {kind_type} value does not parse ({exc!r})")
    kind = "poly" if REGION_KINDS[kind_type] == "bbox" and len(points) == 4 else REGION_KINDS[kind_type]
    if len(labels) > 1:  # a region given several labels keeps the others as an attribute
        attributes = {**attributes, "其他标签": "、".join(str(other) for other in labels[1:])}
    return Shape.single(kind, points, label, attributes, ref)


def _choices(result: dict) -> tuple[str, list[str]] | None:
    """(control name, chosen texts) of a choices result, or None when its from_name, value or choices have the wrong type."""
    name = as_text(result.get("from_name") or "choices")
    value = result.get("value")
    chosen = value.get("choices") if isinstance(value, dict) else None
    texts = [as_text(c) for c in chosen] if isinstance(chosen, list) else [None]
    return None if name is None or None in texts else (name, texts)


def _controls(results: list[dict], region_ids: set, ref: str, rel: str) -> tuple[dict[str, dict], dict[str, list], list[Issue]]:
    """(per-region attributes by region id, image-level choices by control name, notes on controls left out) from the
    choices results, and a note for each result whose id has the wrong type (nothing can attach to it)."""
    per_region: dict[str, dict] = {}
    image_level: dict[str, list] = {}
    notes = []
    for result in results:
        where = f"{ref} result id={result.get('id')}"
        if result.get("id") is not None and _id(result) is None:
            notes.append(Issue(rel, where, "bad_result_id", f"the id is a {type(result['id']).__name__}, not text: no choice can attach "
                               "to its region", entries=0, note=True))
        if result.get("type") != "choices":
            continue
        found = _choices(result)
        if found is None:
            notes.append(Issue(rel, where, "bad_choices", "from_name must be text and value.choices a list of texts; left out",
                               entries=0, note=True))
            continue
        name, chosen = found
        if _id(result) is not None and _id(result) in region_ids:
            per_region.setdefault(_id(result), {})[name] = "、".join(chosen)
        else:
            image_level.setdefault(name, []).extend(chosen)
    return per_region, image_level, notes


def _regions(annotation: dict) -> tuple[list[dict], list[tuple[int, object]]]:
    """The annotation's region results (shapes, converted or reported), and its malformed results with their index: not an
    object, or with no text type (reported, as each may have been a shape). Controls and relations are not shapes."""
    results = annotation.get("result")
    if not isinstance(results, list):
        return [], []
    malformed = [(i, r) for i, r in enumerate(results) if not isinstance(r, dict) or not isinstance(r.get("type"), str)]
    return [r for r in results if isinstance(r, dict) and r.get("type") in (*REGION_KINDS, *REPORTED)], malformed


def _malformed(rel: str, ref: str, index: int, result, reason: str, why: str) -> Issue:
    return Issue(rel, f"{ref} result[{index}]", reason, why or f"a result must be an object with a text type, got {str(result)[:60]}")


def read(export: Path, options: LabelStudioOptions) -> Iterator[SourceImage]:
    export = export_file(export, ("*.json",), "Label Studio JSON")
    tasks, rel, images_root = load(export), export.name, images_folder(export, options.images)
    for index, task in enumerate(tasks):
        ref = f"task id={task.get('id', f'#{index}')}" if isinstance(task, dict) else f"task #{index}"
        annotations = task.get("annotations") if isinstance(task, dict) else None
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict) or not isinstance(annotations or [], list):
            yield SourceImage.report_only(rel, [Issue(rel, ref, "bad_task", "a task must be an object with data and annotations "
                                                                     "(Label Studio's full JSON export, not JSON-MIN or CSV)", entries=0)], 0)
            continue
        annotations = [a for a in annotations or [] if isinstance(a, dict)]
        chosen = choose_annotation(annotations, options.annotations)
        issues, entries = [], 0
        for annotation in annotations:
            regions, malformed = _regions(annotation)
            entries += len(regions) + len(malformed)
            where = f"{ref} annotation id={annotation.get('id')}"
            if annotation is chosen:
                issues += [_malformed(rel, where, i, r, "bad_result", "") for i, r in malformed]
                continue
            reason, why = (("cancelled_annotation", "the annotator cancelled (skipped) it") if annotation.get("was_cancelled")
                           else ("other_annotation", f"convert.label_studio.annotations={options.annotations} chose "
                                                     f"annotation id={chosen.get('id') if chosen else '?'}"))
            issues += [Issue(rel, f"{where} result id={r.get('id')}", reason, why) for r in regions]
            issues += [_malformed(rel, where, i, r, reason, why) for i, r in malformed]
        if chosen is None:
            issues.append(Issue(rel, ref, "unannotated_task", "no annotation to convert; the image is left out", entries=0))
            yield SourceImage.report_only(rel, issues, entries)
            continue
        if not isinstance(chosen.get("result"), list):
            issues.append(Issue(rel, f"{ref} annotation id={chosen.get('id')}", "bad_annotation",
                                f"result is a {type(chosen.get('result')).__name__}, not a list of results; the image is left out",
                                entries=0))
            yield SourceImage.report_only(rel, issues, entries)
            continue
        results = [r for r in chosen["result"] if isinstance(r, dict)]
        regions, _ = _regions(chosen)
        attributes, choices, notes = _controls(results, {_id(r) for r in regions} - {None}, f"{ref} annotation id={chosen.get('id')}", rel)
        issues += notes
        size = _size(results)
        shapes = []
        for region in regions:
            region_ref = f"{ref} annotation id={chosen.get('id')} result id={region.get('id')}"
            found = _region(region, region_ref, rel, size, attributes.get(_id(region), {}))
            (issues if isinstance(found, Issue) else shapes).append(found)
        url = image_reference(task["data"])
        candidates = image_candidates(url)
        key = next((c for c in candidates if (images_root / c).is_file()), None)
        image = images_root / key if key else None
        key = key or (candidates[-1] if candidates else f"task{index}")
        yield SourceImage(key, image, rel, size, shapes, issues, entries,
                          looked_for=f"{url or 'no image in data'} under {images_root}", metadata={"choices": choices} if choices else {})
