"""COCO / LVIS instances JSON.

Policy: bbox [x, y, w, h] → bbox_2d [x1, y1, x2, y2]; with `geometry: auto` (default) a polygon
segmentation becomes poly instead. A segmentation of several polygons is one instance in several
parts, merged under `convert.multipart`. iscrowd annotations are reported and skipped: a crowd
region is not a countable instance. A non-crowd RLE mask falls back to its bbox (noted as
rle_as_bbox). A segmentation that is neither polygons nor RLE, and any entry of it that is not a
polygon, is noted and left out (the bbox stands in when no polygon is left). Annotations whose
image_id is not in `images` are reported as unknown_image.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import orjson

from visionqc.convert.common import CocoOptions, Issue, Part, Shape, SourceImage, as_text


def _xywh_corners(bbox) -> list[tuple[float, float]]:
    x, y, w, h = (float(v) for v in bbox)
    return [(x, y), (x + w, y + h)]


def _rings(segmentation: list, ref: str, rel: str) -> tuple[list[Part], list[Issue]]:
    """The polygon parts of a segmentation, and a note for each entry that is not a polygon of ≥ 3 points."""
    parts, notes = [], []
    for n, ring in enumerate(segmentation):
        if isinstance(ring, list) and len(ring) >= 6 and len(ring) % 2 == 0:
            parts.append(Part("poly", [(float(ring[i]), float(ring[i + 1])) for i in range(0, len(ring), 2)], f"{ref} polygon {n}"))
        else:
            notes.append(Issue(rel, f"{ref} polygon {n}", "bad_polygon", f"segmentation[{n}] is not a list of ≥ 6 coordinates "
                               f"in x, y pairs ({str(ring)[:60]}); left out", entries=0, note=True))
    return parts, notes


def _is_rle(segmentation) -> bool:
    return isinstance(segmentation, dict) and {"counts", "size"} <= segmentation.keys()


def _load(annotations: Path) -> tuple[list, list, dict]:
    """(images, annotations, category names) of an instances JSON; a file that is not one is a ValueError naming it."""
    try:
        doc = orjson.loads(annotations.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"{annotations}: not valid JSON ({exc}); re-export the COCO file") from exc
    if not isinstance(doc, dict):
        raise ValueError(f"{annotations}: the top level is a {type(doc).__name__}, not a COCO object with images and annotations")
    images, anns, categories = doc.get("images") or [], doc.get("annotations") or [], doc.get("categories") or []
    for name, value in (("images", images), ("annotations", anns), ("categories", categories)):
        if not isinstance(value, list):
            raise ValueError(f"{annotations}: {name} is a {type(value).__name__}, not a list")
    names = {c.get("id"): as_text(c.get("name")) for c in categories if isinstance(c, dict) and isinstance(c.get("id"), (int, str))}
    names = {key: name for key, name in names.items() if name}  # a category without a text name names nothing
    return images, anns, names


def _shape(ann: dict, ref: str, name: str | None, mode: str, rel: str) -> Shape | Issue | tuple[Shape | Issue, ...]:
    segmentation = ann.get("segmentation")
    if name is None:
        return Issue(rel, ref, "unknown_category", f"category_id {ann.get('category_id')} is not a category with a text name")
    if ann.get("iscrowd"):
        return Issue(rel, ref, "crowd_region", "iscrowd=1 regions are not converted")
    notes = []
    if mode == "auto" and segmentation and not _is_rle(segmentation):
        parts, notes = _rings(segmentation, ref, rel) if isinstance(segmentation, list) else ([], [
            Issue(rel, ref, "bad_segmentation", f"segmentation is a {type(segmentation).__name__} that is neither polygons "
                  "nor an RLE mask", entries=0, note=True)])
        if parts:
            return Shape(parts, name, {}, ref), *notes
    if ann.get("bbox"):
        shape = Shape.single("bbox", _xywh_corners(ann["bbox"]), name, {}, ref)
        if mode == "auto" and _is_rle(segmentation):
            notes.append(Issue(rel, ref, "rle_as_bbox", "RLE mask converted to its bbox", entries=0, note=True))
        elif notes:
            notes.append(Issue(rel, ref, "segmentation_as_bbox", "no polygon of the segmentation is usable; its bbox is converted",
                               entries=0, note=True))
        return shape, *notes
    return Issue(rel, ref, "missing_geometry", "no bbox and no polygon segmentation"), *notes


def _image_id(image) -> int | str | None:
    """The id of an images[] entry, or None when it has no usable one."""
    image_id = image.get("id") if isinstance(image, dict) else None
    return image_id if isinstance(image_id, (int, str)) else None


def _image_entry(image, index: int) -> tuple[tuple[str, int, int] | None, str]:
    """(file_name, width, height) of an images[] entry, or (None, why it is unusable)."""
    if not isinstance(image, dict):
        return None, f"images[{index}] is a {type(image).__name__}, not an object"
    if _image_id(image) is None:
        return None, f"images[{index}] has no usable id ({image.get('id')!r})"
    try:
        return (str(image["file_name"]), int(image["width"]), int(image["height"])), ""
    except (KeyError, TypeError, ValueError) as exc:
        return None, f"images[{index}] id={image.get('id')} lacks a usable file_name/width/height ({exc!r})"


def read(annotations: Path, options: CocoOptions) -> Iterator[SourceImage]:
    images_root = Path(options.images) if options.images else annotations.parent
    rel = annotations.name
    images, anns, categories = _load(annotations)
    by_image, unusable = defaultdict(list), []
    image_ids = {_image_id(image) for image in images} - {None}
    for index, ann in enumerate(anns):
        if not isinstance(ann, dict):
            unusable.append(Issue(rel, f"annotations[{index}]", "bad_annotation", f"an annotation must be an object, got {type(ann).__name__}"))
            continue
        image_id = ann.get("image_id")
        if isinstance(image_id, (int, str)) and image_id in image_ids:
            by_image[image_id].append((index, ann))
        else:
            unusable.append(Issue(rel, f"annotation id={ann.get('id', f'#{index}')}", "unknown_image",
                                  f"image_id {image_id!r} is not in images; the object has no image to go on"))
    seen = set()
    for index, image in enumerate(images):
        entry, why = _image_entry(image, index)
        image_id = _image_id(image)
        if image_id in seen:
            entry, why = None, f"images[{index}] repeats image id {image_id!r}; its annotations went to the first entry"
        seen.add(image_id)
        owned = by_image.pop(image_id, []) if image_id is not None else []
        if entry is None:
            issues = [Issue(rel, f"annotation id={ann.get('id', f'#{i}')}", "bad_image_entry", why) for i, ann in owned]
            yield SourceImage.report_only(rel, issues or [Issue(rel, f"images[{index}]", "bad_image_entry", why, entries=0)], len(owned))
            continue
        shapes, issues = [], []
        for i, ann in owned:
            ref = f"annotation id={ann.get('id', f'#{i}')}"
            try:
                found = _shape(ann, ref, categories.get(ann.get("category_id")), options.geometry, rel)
            except (TypeError, ValueError) as exc:
                found = Issue(rel, ref, "bad_geometry", f"bbox/segmentation do not parse ({exc})")
            for item in found if isinstance(found, tuple) else (found,):
                (issues if isinstance(item, Issue) else shapes).append(item)
        file_name, width, height = entry
        yield SourceImage(file_name, images_root / file_name, rel, (width, height), shapes, issues, len(owned),
                          looked_for=str(images_root / file_name))
    if unusable:
        yield SourceImage.report_only(rel, unusable, len(unusable))
