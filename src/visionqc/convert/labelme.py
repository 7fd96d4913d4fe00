"""LabelMe JSON: one file per image.

Policy: rectangle → bbox_2d, polygon → poly, line/linestrip → line, circle → a poly with
`circle_vertices` vertices. point and mask shapes and labels listed in `ignore_labels` are
reported, not converted: the contract has no point or mask geometry. Shapes that share a
`group_id` (and a label) are the parts of one instance, merged under `convert.multipart`.

The image: `imagePath` when that file exists, else the embedded `imageData`, else an image with
the JSON's stem beside it; otherwise the file is reported as missing_image. An `imagePath` that
leaves the export (`../images/x.jpg`, as labelme writes for sibling folders) is read only from the
dataset's declared `images` folder; anywhere else it is reported as unsafe_image_path.

A label that is not text (an object, a list) is reported as bad_label; flags that are not an object
or a description that is not text are left out of the attributes, with a note.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import orjson
from PIL import Image

from visionqc.convert.common import (
    Issue,
    LabelmeOptions,
    Part,
    Shape,
    SourceImage,
    as_text,
    bad_label,
    circle_polygon,
    files_under,
    find_image,
)

SHAPE_KINDS = {"rectangle": "bbox", "polygon": "poly", "line": "line", "linestrip": "line"}
SUFFIXES = {"JPEG": ".jpg", "PNG": ".png", "BMP": ".bmp", "WEBP": ".webp", "GIF": ".gif", "TIFF": ".tif"}


def _embedded(doc: dict) -> tuple[bytes | None, str, str]:
    """(image bytes, their suffix, "") from imageData, or (None, "", why not)."""
    data = doc.get("imageData")
    if not data:
        return None, "", "no imageData"
    try:
        raw = base64.b64decode(data, validate=True)
        with Image.open(io.BytesIO(raw)) as image:
            suffix = SUFFIXES.get(image.format or "", ".png")
    except (binascii.Error, TypeError, ValueError, OSError) as exc:
        return None, "", f"imageData does not decode ({exc})"
    return raw, suffix, ""


def _locate(path: Path, root: Path, images: str, doc: dict) -> tuple[str, Path | None, bytes | None, str]:
    """(key, image file, embedded bytes, where it looked) for one LabelMe file.

    The key is the image's path inside the export, else inside the declared images folder, else its name
    beside the JSON (convert_image then reports a file outside both as unsafe_image_path).
    """
    folder = path.parent.relative_to(root)
    declared = doc.get("imagePath")
    declared = declared.replace("\\", "/") if isinstance(declared, str) else ""
    if declared and (path.parent / declared).is_file():
        image = path.parent / declared
        real = image.resolve()
        for base in (root, Path(images)) if images else (root,):
            if real.is_relative_to(base.resolve()):
                return real.relative_to(base.resolve()).as_posix(), image, None, ""
        return (folder / image.name).as_posix(), image, None, ""
    raw, suffix, why_not = _embedded(doc)
    if raw is not None:
        name = PurePosixPath(declared).name if declared else path.stem + suffix
        return (folder / name).as_posix(), None, raw, ""
    beside = find_image(path)
    if beside is not None:
        return beside.relative_to(root).as_posix(), beside, None, ""
    looked = f"imagePath {declared!r}, " if declared else "no imagePath, "
    return (folder / (PurePosixPath(declared).name or path.stem)).as_posix(), None, None, f"{looked}{why_not}, no {path.stem}.* beside it"


def _declared_size(doc: dict) -> tuple[int, int] | None:
    try:
        width, height = int(doc["imageWidth"]), int(doc["imageHeight"])
    except (KeyError, TypeError, ValueError):
        return None
    return (width, height) if width > 0 and height > 0 else None


def _part(raw: dict, ref: str, vertices: int) -> Part:
    points = [(float(x), float(y)) for x, y in raw.get("points") or []]
    kind = raw.get("shape_type") or "polygon"
    if kind == "circle" and len(points) == 2:
        return Part("poly", circle_polygon(points[0], points[1], vertices), ref)
    return Part(SHAPE_KINDS.get(kind, str(kind)), points, ref)


def _attributes(raw: dict, rel: str, ref: str, issues: list[Issue]) -> dict:
    """A shape's flags that are on (as 是) and its description (as 说明); a flags or description of the wrong type is
    left out with a note."""
    flags, description = raw.get("flags") or {}, raw.get("description") or ""
    attributes = {}
    if isinstance(flags, dict):
        attributes = {str(name): "是" for name, on in flags.items() if on}
    else:
        issues.append(Issue(rel, ref, "bad_flags", f"flags is a {type(flags).__name__}, not an object; left out", entries=0, note=True))
    if as_text(description) is None:
        issues.append(Issue(rel, ref, "bad_description", f"description is a {type(description).__name__}, not text; left out",
                            entries=0, note=True))
    elif as_text(description):
        attributes["说明"] = as_text(description)
    return attributes


def read(root: Path, options: LabelmeOptions) -> Iterator[SourceImage]:
    ignore = set(options.ignore_labels)
    vertices = int(options.circle_vertices)
    for path in files_under(root, "*.json"):
        rel = path.relative_to(root).as_posix()
        try:
            doc = orjson.loads(path.read_bytes())
            if not isinstance(doc, dict):
                raise ValueError(f"the top level is a {type(doc).__name__}, not a LabelMe object")
            shapes_in = doc.get("shapes") or []
            if not isinstance(shapes_in, list):
                raise ValueError(f"shapes is a {type(shapes_in).__name__}, not a list")
        except (ValueError, OSError) as exc:  # orjson.JSONDecodeError is a ValueError
            yield SourceImage.report_only(rel, [Issue(rel, "", "unreadable_export", f"{rel}: {exc}", entries=0)], 0)
            continue
        key, image, embedded, looked_for = _locate(path, root, options.images, doc)
        instances: dict[object, Shape] = {}  # in order of first appearance; grouped parts share a key
        issues = []
        for index, raw in enumerate(shapes_in):
            ref = f"shapes[{index}]"
            if not isinstance(raw, dict):
                issues.append(Issue(rel, ref, "bad_shape", f"a shape must be an object, got {type(raw).__name__}"))
                continue
            label = as_text(raw.get("label") or "")
            if label is None:
                issues.append(bad_label(rel, ref, raw["label"]))
                continue
            try:
                part = _part(raw, ref, vertices)
            except (TypeError, ValueError) as exc:
                issues.append(Issue(rel, ref, "bad_points", f"points {str(raw.get('points'))[:80]} are not [x, y] pairs ({exc})"))
                continue
            if not label:
                issues.append(Issue(rel, ref, "missing_label", "shape has no label"))
            elif label in ignore:
                issues.append(Issue(rel, ref, "ignored_label", f"label {label!r} is in ignore_labels"))
            elif part.kind not in SHAPE_KINDS.values():
                issues.append(Issue(rel, ref, f"unsupported_{part.kind}", f"LabelMe {part.kind} shapes have no contract geometry"))
            else:
                group = raw.get("group_id")
                attributes = _attributes(raw, rel, ref, issues)
                slot = (label, str(group)) if group is not None else index
                if slot in instances:
                    instances[slot].parts.append(part)
                    instances[slot].entries += 1
                    instances[slot].ref = f"group_id={group}"
                else:
                    instances[slot] = Shape([part], label, attributes, ref)
        yield SourceImage(key, image, rel, _declared_size(doc), list(instances.values()), issues, len(shapes_in),
                          image_bytes=embedded, looked_for=looked_for)
