"""What every format reader yields, and the shared steps that turn it into contract records.

Readers (platform, labelme, coco, cvat, label_studio, yolo, voc) only parse their format into
`SourceImage`s. The steps here apply EXIF orientation, the optional pixel-budget resize, rounding,
clipping, canonical polygons, label_map, the summary builder and the seeded split, so every format
behaves the same.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import io
import math
import os
import shutil
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import orjson
from PIL import Image, ImageOps
from shapely.geometry import LineString, MultiPoint, Polygon

from visionqc import contract
from visionqc.images import orientation, orientation_mapper, smart_resize, upright_size
from visionqc.io import atomic_write, link_or_copy, replace_directory, temp_dir_in, write_jsonl
from visionqc.options import options_from
from visionqc.taxonomy import Taxonomy

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".JPG", ".JPEG", ".PNG")


MULTIPART_POLICIES = ("hull", "largest", "union_bbox")


@dataclass
class Part:
    """One drawn piece of an instance: its kind (bbox, poly, line or an unsupported kind), points and where it came from."""

    kind: str
    points: list[tuple[float, float]]
    ref: str


@dataclass
class Shape:
    """One annotated instance before conversion: one part, or several (LabelMe `group_id`, COCO polygons, GeoJSON Multi*).

    `entries` is how many input shapes it stands for (a LabelMe group of three shapes: 3; a COCO annotation: 1).
    """

    parts: list[Part]
    category: str
    attributes: dict = field(default_factory=dict)
    ref: str = ""
    entries: int = 1

    @classmethod
    def single(cls, kind: str, points, category: str, attributes: dict | None = None, ref: str = "") -> Shape:
        return cls([Part(kind, list(points), ref)], category, dict(attributes or {}), ref)


@dataclass
class Issue:
    """Something a reader or converter did not turn into an object (or, as a note, changed), and why.

    `entries` is how many input shapes it reports as not converted: 1 for a dropped shape, all of an image's
    shapes for a missing image, 0 for a note (the shape was converted) or a file that could not be read at all.
    """

    file: str
    ref: str
    reason: str
    detail: str = ""
    entries: int = 1
    note: bool = False

    def as_dict(self) -> dict:
        return {"file": self.file, "ref": self.ref, "reason": self.reason, "detail": self.detail}


def as_text(value) -> str | None:
    """A label or attribute value as text: a string stripped, a number written out; None for anything else (an object,
    a list, true/false, null), which the reader reports instead of writing its repr into a training target."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return str(value)
    return None


def bad_label(rel: str, ref: str, value) -> Issue:
    return Issue(rel, ref, "bad_label", f"the label is a {type(value).__name__} ({str(value)[:60]}), not text")


# One clipping policy for rotated boxes in every format (CVAT box rotation, Label Studio rectangle rotation, YOLO
# oriented boxes, which YOLO writes like its polygons): corners up to this share of the image side past its edge are
# clipped to the edge (counted in clipped_coordinates); a corner further out reports the shape as out_of_range.
EDGE_TOLERANCE = 0.02


def beyond_edge(points, width: float, height: float) -> str | None:
    """Why a shape's corners reach too far past the image (None when every corner is within EDGE_TOLERANCE of it)."""
    for x, y in points:
        if not (-EDGE_TOLERANCE * width <= x <= (1 + EDGE_TOLERANCE) * width
                and -EDGE_TOLERANCE * height <= y <= (1 + EDGE_TOLERANCE) * height):
            return (f"corner ({x:.1f}, {y:.1f}) lies more than {EDGE_TOLERANCE:.0%} of the image side outside the "
                    f"{width:g}x{height:g} image (nearer corners are clipped to the edge)")
    return None


@dataclass
class SourceImage:
    """What a reader yields per image: its shapes, what it reported, and how many input shapes the item accounts for.

    `entries` is counted by the reader from its input (LabelMe shapes, features, COCO annotations); convert checks
    that every one of them is converted or reported. An item with `has_image=False` carries only reports: a file
    that could not be read, or COCO annotations whose image is not listed.
    """

    key: str  # relative image path inside the export; names the output image
    image_path: Path | None
    annotation_file: str
    declared_size: tuple[int, int] | None  # (width, height) the annotation was drawn on
    shapes: list[Shape]
    issues: list[Issue] = field(default_factory=list)
    entries: int = 0
    image_bytes: bytes | None = None  # an embedded image (LabelMe imageData) when there is no file
    looked_for: str = ""  # where the image was looked for, for the missing_image report
    has_image: bool = True
    metadata: dict = field(default_factory=dict)  # image-level facts kept in the record (CVAT tags, Label Studio choices)

    @classmethod
    def report_only(cls, annotation_file: str, issues: list[Issue], entries: int) -> SourceImage:
        return cls("", None, annotation_file, None, [], issues, entries, has_image=False)


@dataclass
class PlatformOptions:
    skip_quality: list[str] = field(default_factory=lambda: ["failed", "unqualified"])  # reviewer verdicts reported, not converted


@dataclass
class LabelmeOptions:
    images: str = ""  # the images folder (datasets.<name>.images) imagePaths may point into, e.g. ../images/
    ignore_labels: list[str] = field(default_factory=lambda: ["__ignore__", "_background_"])
    circle_vertices: int = 16


@dataclass
class CocoOptions:
    geometry: str = "auto"  # auto: polygon segmentation when present, else bbox; bbox: always the bbox
    images: str = ""  # the images folder (datasets.<name>.images); empty: beside the JSON

    def check(self, section: str) -> None:
        if self.geometry not in ("auto", "bbox"):
            raise ValueError(f"{section}.geometry must be auto or bbox, got {self.geometry!r}")


@dataclass
class CvatOptions:
    images: str = ""  # the images folder (datasets.<name>.images); empty: images/ beside the XML, else beside it


@dataclass
class LabelStudioOptions:
    images: str = ""  # the images folder (datasets.<name>.images); empty: images/ beside the JSON, else beside it
    annotations: str = "latest"  # several annotators on a task: latest (ground truth first), or first

    def check(self, section: str) -> None:
        if self.annotations not in ("latest", "first"):
            raise ValueError(f"{section}.annotations must be latest or first, got {self.annotations!r}")


@dataclass
class YoloOptions:
    names: list[str] = field(default_factory=list)  # class names by id when the export has no data.yaml/classes.txt


@dataclass
class SignalOptions:
    prompt: str = "这段传感器曲线属于哪种情况？"
    examples_per_label: int = 3  # traces per label in the examples plot


@dataclass
class ConvertOptions:
    """The `convert` block of the config (a dataset's own `convert:` block merged over it)."""

    resize: bool = False
    max_pixels: int = 1024 * 32 * 32
    min_pixels: int = 4 * 32 * 32
    resize_factor: int = 32
    summary: bool = True
    empty_as_irrelevant: bool = True
    val_fraction: float = 0.1
    seed: int = 17
    overlays: int = 6
    jpeg_quality: int = 95
    max_image_pixels: int = 50_000_000  # larger images are reported (image_too_large), never decoded
    multipart: str = "hull"  # an instance drawn in several parts: hull | largest | union_bbox (docs/stages.md, convert)
    label_map: dict = field(default_factory=dict)  # export class name → our category; null: report, don't convert
    taxonomy: Taxonomy = field(default_factory=Taxonomy)  # the config's taxonomy block: the categories a record may name
    platform: PlatformOptions = field(default_factory=PlatformOptions)
    labelme: LabelmeOptions = field(default_factory=LabelmeOptions)
    coco: CocoOptions = field(default_factory=CocoOptions)
    cvat: CvatOptions = field(default_factory=CvatOptions)
    label_studio: LabelStudioOptions = field(default_factory=LabelStudioOptions)
    yolo: YoloOptions = field(default_factory=YoloOptions)
    signals: SignalOptions = field(default_factory=SignalOptions)

    def check(self, section: str) -> None:
        if self.multipart not in MULTIPART_POLICIES:
            raise ValueError(f"{section}.multipart must be one of {', '.join(MULTIPART_POLICIES)}, got {self.multipart!r}")
        for name, target in self.label_map.items():
            if target is not None and not (isinstance(target, str) and target.strip()):
                raise ValueError(f"{section}.label_map.{name} must be a category name or null (report, don't convert), got {target!r}")

    @classmethod
    def from_dict(cls, options: dict) -> ConvertOptions:
        return options_from(cls, options, "convert")


@dataclass(frozen=True)
class ConvertOutputs:
    """The paths a convert job writes (the rule's outputs). Records point at media relative to the JSONL folder.

    Image exports and JSONL write an `overlays` folder of PNGs; signal manifests one `examples` PNG.
    """

    train: Path
    val: Path
    report: Path
    media: Path  # images/ (image exports) or signals/ (manifests)
    overlays: Path | None = None
    examples: Path | None = None

    def __post_init__(self):
        for name in ("train", "val", "report", "media", "overlays", "examples"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        if self.train.parent.resolve() != self.val.parent.resolve():
            raise ValueError(f"{self.train} and {self.val} must share a folder: records name their media relative to it")

    @property
    def records_dir(self) -> Path:
        return self.train.parent

    @property
    def media_prefix(self) -> str:
        """How a record names the media folder: relative to the JSONL files."""
        return Path(os.path.relpath(self.media.resolve(), self.records_dir.resolve())).as_posix()

    @contextlib.contextmanager
    def staged(self):
        """A scratch folder holding media/ (and overlays/) while they are built; moved into place on success."""
        self.report.parent.mkdir(parents=True, exist_ok=True)
        scratch = temp_dir_in(self.report.parent, ".convert.")
        try:
            (scratch / "media").mkdir()
            (scratch / "overlays").mkdir()
            yield scratch
            replace_directory(scratch / "media", self.media)
            if self.overlays is not None:
                replace_directory(scratch / "overlays", self.overlays)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def files_under(root: Path, pattern: str) -> Iterator[Path]:
    """The files under `root` whose names match `pattern`, in `sorted(root.rglob(pattern))` order, holding one short
    string per matching file while listing (a Path or a directory entry per file cost 80 MB at 100k images, and a
    folder's whole listing of names 140 MB at a million). Like rglob, symlinked folders are not entered."""
    found, folders = [], [""]
    while folders:
        folder = folders.pop()
        path = root / folder.replace(SORTS_FIRST, os.sep)
        try:
            with os.scandir(path) as entries:
                for entry in entries:
                    if entry.is_dir():
                        if not entry.is_symlink():
                            folders.append(folder + entry.name + SORTS_FIRST)
                    elif fnmatch.fnmatchcase(entry.name, pattern):
                        found.append(folder + entry.name)
        except OSError as exc:
            raise ValueError(f"{path}: cannot list this folder of the export ({exc.strerror}); fix its permissions") from exc
    found.sort()  # "\0" sorts before every character: the order of the tuples of parts
    for relative in found:
        yield root.joinpath(*relative.split(SORTS_FIRST))


SORTS_FIRST = "\0"  # no file name holds it


def circle_polygon(center: tuple[float, float], rim: tuple[float, float], vertices: int) -> list[tuple[float, float]]:
    radius = math.dist(center, rim)
    return [
        (center[0] + radius * math.cos(2 * math.pi * i / vertices), center[1] + radius * math.sin(2 * math.pi * i / vertices))
        for i in range(vertices)
    ]


def images_folder(annotation_file: Path, option: str) -> Path:
    """Where a single-file export's images are: the configured folder, else images/ beside the file, else beside it."""
    if option:
        return Path(option)
    beside = annotation_file.parent / "images"
    return beside if beside.is_dir() else annotation_file.parent


def export_file(path: Path, names: tuple[str, ...], what: str) -> Path:
    """A single-file export given as the file or as its folder (the one file there matching `names`, glob patterns)."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: {what} export not found; point datasets.<name>.path at it or at its folder")
    found = sorted({match for pattern in names for match in path.glob(pattern) if match.is_file()})
    if len(found) != 1:
        listed = ", ".join(f.name for f in found) or "none"
        raise ValueError(f"{path}: expected one {what} export ({' or '.join(names)}) in the folder, found {listed}; "
                         f"point datasets.<name>.path at the file")
    return found[0]


def find_image(annotation: Path, stem: str | None = None) -> Path | None:
    """The image beside an annotation file with the same stem (any usual suffix)."""
    stem = stem or annotation.stem
    for suffix in IMAGE_SUFFIXES:
        candidate = annotation.with_name(stem + suffix)
        if candidate.exists():
            return candidate
    return None


def _part_size(part: Part) -> tuple[float, float]:
    """(area, length) of a part; a line has no area, a box or polygon no length."""
    if part.kind == "line":
        return 0.0, LineString(part.points).length if len(part.points) >= 2 else 0.0
    if part.kind == "bbox" and len(part.points) >= 2:
        x1, y1, x2, y2 = contract.bbox_of(part.points)
        return (x2 - x1) * (y2 - y1), 0.0
    return (Polygon(part.points).area if len(part.points) >= 3 else 0.0), 0.0


def merge_parts(shape: Shape, policy: str, file: str) -> tuple[str, list[tuple[float, float]], list[Issue]]:
    """An instance's parts → one (kind, points) under the `convert.multipart` policy, plus notes on what changed.

    largest: the part with the largest area (the longest line when no part has an area); the others are
    noted with their share. hull: the convex hull of every part as a polygon; parts that are all boxes
    give the box around them, parts that are all lines one line joining them in order. union_bbox: the
    box around every part.
    """
    parts = shape.parts
    if len(parts) == 1:
        return parts[0].kind, parts[0].points, []
    kinds = {part.kind for part in parts}
    points = [p for part in parts for p in part.points]
    if not all(math.isfinite(c) for p in points for c in p):
        return parts[0].kind, points, []  # reported as non_finite, whole
    if policy == "union_bbox" or (policy == "hull" and kinds == {"bbox"}):
        x1, y1, x2, y2 = contract.bbox_of(points) if points else (0, 0, 0, 0)
        return "bbox", [(x1, y1), (x2, y2)], []
    if policy == "hull":
        if kinds == {"line"}:
            return "line", points, []
        hull = MultiPoint(points).convex_hull
        if hull.geom_type == "Polygon":
            return "poly", [tuple(c) for c in hull.exterior.coords[:-1]], []
        return ("line", [tuple(c) for c in hull.coords], []) if hull.geom_type == "LineString" else ("poly", points, [])
    sizes = [_part_size(part) for part in parts]
    weights = [area for area, _ in sizes] if any(area for area, _ in sizes) else [length for _, length in sizes]
    keep = max(range(len(parts)), key=lambda i: weights[i])
    total = sum(weights) or 1.0
    notes = [Issue(file, part.ref, "multipart_part_dropped",
                   f"{shape.category}: part {i + 1} of {len(parts)} ({weights[i] / total:.1%} of the instance), "
                   f"convert.multipart=largest kept part {keep + 1}", entries=0, note=True)
             for i, part in enumerate(parts) if i != keep]
    return parts[keep].kind, parts[keep].points, notes


def _shape_to_object(kind: str, points_in, desc: str, transform, width: int, height: int) -> tuple[dict | None, str, str, int]:
    """Returns (object or None, reason and the rule it breaks if None, clipped coordinate count)."""
    clipped = 0
    points = []
    for x, y in points_in:
        if not (math.isfinite(x) and math.isfinite(y)):
            return None, "non_finite", f"{kind} with a coordinate that is NaN or infinite", 0
        tx, ty = transform(x, y)
        cx, cy = min(max(round(tx), 0), width), min(max(round(ty), 0), height)
        clipped += (cx != round(tx)) + (cy != round(ty))
        points.append((cx, cy))
    if kind == "bbox":
        box = contract.bbox_of(points) if len(points) >= 2 else None
        if box is None or box[0] >= box[2] or box[1] >= box[3]:
            return None, "degenerate_bbox", "a box with no area inside the image; the contract needs x1 < x2 and y1 < y2", clipped
        return {"bbox_2d": box, "desc": desc}, "", "", clipped
    if kind == "poly":
        flat = contract.canonical_polygon([c for p in points for c in p])
        if len(flat) // 2 < contract.POLY_MIN_POINTS:
            return None, "poly_too_few_points", (f"poly with {len(flat) // 2} distinct points; the contract needs "
                                                 f"≥{contract.POLY_MIN_POINTS}"), clipped
        return {"poly": flat, "poly_points": len(flat) // 2, "desc": desc}, "", "", clipped
    if kind == "line":
        flat = [c for i, p in enumerate(points) if i == 0 or p != points[i - 1] for c in p]
        if len(flat) // 2 < contract.LINE_MIN_POINTS:
            return None, "line_too_few_points", (f"line with {len(flat) // 2} distinct points; the contract needs "
                                                 f"≥{contract.LINE_MIN_POINTS}"), clipped
        return {"line": flat, "line_points": len(flat) // 2, "desc": desc}, "", "", clipped
    return None, f"unsupported_{kind}", f"{kind} has no contract geometry (bbox_2d, poly, line)", clipped


@dataclass
class ImagePlacement:
    """Where an export's images may come from, and which source each output name under images/ holds.

    An image is read only when it resolves (symlinks followed) inside the export folder or the dataset's
    declared `images` folder. One output name holds one source: a second, different image under a taken
    name gets the name with its digest added, so no write replaces an image another record points at.
    """

    roots: tuple[Path, ...]
    taken: dict[str, str] = field(default_factory=dict)  # output name → identity of the source it holds

    @classmethod
    def for_export(cls, source: Path, images: str = "") -> ImagePlacement:
        export = source if source.is_dir() else source.parent
        return cls(tuple(dict.fromkeys(Path(p).resolve() for p in (export, images) if p)))

    def outside(self, image: Path) -> str:
        """Why `image` may not be read (it resolves outside every root), or "" when it may."""
        real = Path(image).resolve()
        if any(real.is_relative_to(root) for root in self.roots):
            return ""
        via = f" (a symlink to {real})" if real != Path(image).absolute() else ""
        return (f"{image}{via} is outside the export ({' and '.join(map(str, self.roots))}); move it inside, or declare "
                f"its folder as datasets.<name>.images")

    def claim(self, key: str, identity: str) -> tuple[str, bool]:
        """(the output name to use, whether that name already holds this very source)."""
        held = self.taken.get(key)
        if held is None:
            self.taken[key] = identity
            return key, False
        if held == identity:
            return key, True
        name = PurePosixPath(key)
        digest = hashlib.sha256(identity.encode()).hexdigest()[:8]
        return self.claim(name.with_name(f"{name.stem}-{digest}{name.suffix}").as_posix(), identity)


def _open_image(source: SourceImage):
    if source.image_bytes is not None:
        return Image.open(io.BytesIO(source.image_bytes))
    return Image.open(source.image_path)


def _convert_shapes(source: SourceImage, options: ConvertOptions, stats: dict, scaled, size: tuple[int, int],
                    issues: list[Issue]) -> tuple[list[dict], int]:
    """The image's shapes as contract objects in its new pixel frame, and how many input shapes they account for;
    what cannot be converted is appended to `issues`."""
    objects, converted = [], 0
    for shape in source.shapes:
        category = options.label_map.get(shape.category, shape.category)
        if category is None:
            issues.append(Issue(source.annotation_file, shape.ref, "unmapped_label",
                                f"convert.label_map maps {shape.category!r} to null", entries=shape.entries))
            continue
        if why := options.taxonomy.unknown_category(category):
            issues.append(Issue(source.annotation_file, shape.ref, "unknown_category", why, entries=shape.entries))
            continue
        kind, points, notes = merge_parts(shape, options.multipart, source.annotation_file)
        stats["multipart_instances"] += len(shape.parts) > 1
        desc = contract.format_desc(category, shape.attributes)
        obj, reason, rule, clipped = _shape_to_object(kind, points, desc, scaled, *size)
        stats["clipped_coordinates"] += clipped
        if obj is None:
            issues.append(Issue(source.annotation_file, shape.ref, reason, f"{category}: {rule}", entries=shape.entries))
        else:
            objects.append(obj)
            issues.extend(notes)
            converted += shape.entries
    return objects, converted


def convert_image(source: SourceImage, images_dir: Path, images_prefix: str, options: ConvertOptions,
                  stats: dict, placement: ImagePlacement) -> tuple[str, dict | None, list[Issue], int]:
    """One source image → (its name under images/, contract record or None, issues and notes, input shapes converted).

    Writes the upright, resized image into `images_dir`; the record names it as `images_prefix/<name>`.
    Every input shape the item accounts for ends up converted or in an issue (`Issue.entries`).
    """
    issues = list(source.issues)
    if not source.has_image:
        return source.key, None, issues, 0
    everything = sum(shape.entries for shape in source.shapes)

    def whole_image(reason: str, detail: str) -> tuple[str, None, list[Issue], int]:
        return source.key, None, issues + [Issue(source.annotation_file, source.key, reason, detail, entries=everything)], 0

    key = PurePosixPath(source.key)
    if key.is_absolute() or ".." in key.parts:
        return whole_image("unsafe_image_path", f"{source.key}: the image's name climbs out of the export; its copy would be "
                                                "written outside results/convert/<dataset>/images")
    has_file = source.image_path is not None and Path(source.image_path).is_file()
    if source.image_bytes is None and not has_file:
        return whole_image("missing_image", f"{source.annotation_file}: no image found (looked for {source.looked_for or source.image_path})")
    if source.image_bytes is None and (why := placement.outside(source.image_path)):
        return whole_image("unsafe_image_path", why)
    try:
        image = _open_image(source)
        raw_size = image.size
        if raw_size[0] * raw_size[1] > options.max_image_pixels:  # before the EXIF read: a PNG's decodes the image
            return whole_image("image_too_large", f"{raw_size[0]}x{raw_size[1]} is {raw_size[0] * raw_size[1] / 1e6:.1f} "
                                                  f"megapixels, over convert.max_image_pixels ({options.max_image_pixels / 1e6:g} MP); "
                                                  f"downscale it, or raise the limit if the machines have the memory")
        orient = orientation(image)
    except Image.DecompressionBombError as exc:  # PIL's own limit, twice its 89 MP warning
        return whole_image("image_too_large", f"{exc}; over convert.max_image_pixels ({options.max_image_pixels / 1e6:g} MP)")
    except Exception as exc:  # PIL raises many types for bad files
        return whole_image("corrupt_image", str(exc))
    upright = upright_size(raw_size, orient)
    declared = source.declared_size or upright
    if declared == upright:
        transform = orientation_mapper(1, upright)
    elif declared == raw_size:
        transform = orientation_mapper(orient, raw_size)
    else:
        return whole_image("size_mismatch", f"annotation is {declared[0]}x{declared[1]}, image is {raw_size[0]}x{raw_size[1]} "
                                            f"(EXIF orientation {orient})")

    width, height = upright
    if options.resize:
        new_h, new_w = smart_resize(height, width, options.resize_factor, options.min_pixels, options.max_pixels)
    else:
        new_w, new_h = width, height
    sx, sy = new_w / width, new_h / height

    def scaled(x: float, y: float) -> tuple[float, float]:
        return tuple(value * scale for value, scale in zip(transform(x, y), (sx, sy), strict=True))

    objects, converted = _convert_shapes(source, options, stats, scaled, (new_w, new_h), issues)
    # shapes lost to a report; a class label_map maps to null is left out on purpose, and loses nothing
    lost = source.entries - converted - sum(issue.entries for issue in issues if issue.reason == "unmapped_label")
    if lost and not converted:
        return source.key, None, issues + [Issue(source.annotation_file, source.key, "all_shapes_reported",
                                                 f"all {lost} shape(s) of this image were reported; as a record it would "
                                                 f"claim the image shows nothing ({contract.IRRELEVANT_SUMMARY}), so it is "
                                                 "left out", entries=0)], 0
    identity = (f"embedded:{hashlib.sha256(source.image_bytes).hexdigest()}" if source.image_bytes is not None
                else f"file:{Path(source.image_path).resolve()}")
    name, written = placement.claim(source.key, identity)
    if name != source.key:
        issues.append(Issue(source.annotation_file, source.key, "renamed_image",
                            f"another image of this export is already named {source.key}; this one is {name}", entries=0, note=True))
    if not written:
        try:
            _write_image(source, image, images_dir / name, orient, (new_w, new_h) != (width, height), (new_w, new_h), options)
        except Exception as exc:
            if isinstance(exc, OSError) and exc.errno is not None:
                raise  # the file system (a full disk, a permission), not the image
            placement.taken.pop(name, None)
            issues = list(source.issues)  # the whole image is reported; drop the per-shape reports
            return whole_image("corrupt_image", str(exc))
    stats["exif_rotated"] += orient != 1
    stats["resized"] += (new_w, new_h) != (width, height)

    record = {"images": [f"{images_prefix}/{name}"], "width": new_w, "height": new_h, "objects": objects}
    if options.summary:
        record["summary"] = contract.build_summary(objects, empty_as_irrelevant=options.empty_as_irrelevant)
    record["metadata"] = {"source_file": source.annotation_file, **source.metadata}
    if lost:  # its summary under-counts: summary fusion leaves it out unless fusion.partial_records is keep
        record["metadata"]["partial"] = lost
    return name, record, issues, converted


def _write_image(source: SourceImage, image: Image.Image, target: Path, orient: int, resize: bool, size: tuple[int, int],
                 options: ConvertOptions) -> None:
    """The upright, resized image at `target`, created fresh and renamed into place (never written through a link)."""
    if orient == 1 and not resize:
        if source.image_bytes is not None:
            with atomic_write(target, "wb") as handle:
                handle.write(source.image_bytes)
        else:
            link_or_copy(Path(source.image_path).resolve(), target)
        return
    upright_image = ImageOps.exif_transpose(image)
    if resize:
        upright_image = upright_image.resize(size, Image.Resampling.BICUBIC)
    # the name's extension, else the format read from the bytes (Label Studio names uploads without one)
    image_format = Image.registered_extensions().get(target.suffix.lower()) or image.format
    save_kwargs = {"quality": options.jpeg_quality} if image_format == "JPEG" else {}
    with atomic_write(target, "wb") as handle:
        upright_image.save(handle, format=image_format, **save_kwargs)


def key_rank(key: str, seed: int) -> int:
    """A key's place in the seeded order of the split: the first 8 bytes of sha256(seed:key)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big")


def val_mask(ranks: np.ndarray, val_fraction: float) -> np.ndarray:
    """Which ranks go to val: the smallest round(n * val_fraction) (at least 1, never all), and any key equal
    to one of them. Seeded (the ranks are) and independent of the order records come in."""
    if val_fraction <= 0 or len(ranks) < 2:
        return np.zeros(len(ranks), dtype=bool)
    count = min(len(ranks) - 1, max(1, round(len(ranks) * val_fraction)))
    return ranks <= np.partition(ranks, count - 1)[count - 1]


def split_keys(keys: list[str], val_fraction: float, seed: int) -> set[str]:
    """Seeded, order-independent choice of validation keys: the keys with the smallest seeded ranks."""
    ranks = np.fromiter((key_rank(k, seed) for k in keys), dtype=np.uint64, count=len(keys))
    return {key for key, val in zip(keys, val_mask(ranks, val_fraction), strict=True) if val}


class SplitSpool:
    """Converted records spooled to a scratch file as they come, then split and written: memory holds 8 bytes a record."""

    def __init__(self, scratch: Path, seed: int):
        self.path = scratch / "records.jsonl"
        self.seed = seed
        self.ranks = array("Q")
        self._handle = open(self.path, "wb")  # noqa: SIM115 (closed by write_splits)

    def __len__(self) -> int:
        return len(self.ranks)

    def add(self, key: str, record: dict) -> None:
        self._handle.write(orjson.dumps(record) + b"\n")
        self.ranks.append(key_rank(key, self.seed))

    def write_splits(self, outputs: ConvertOutputs, val_fraction: float) -> dict[str, int]:
        """The seeded split of `write_splits`, streamed from the spool; returns the records per split."""
        self._handle.close()
        to_val = val_mask(np.frombuffer(self.ranks, dtype=np.uint64), val_fraction)
        counts = {"train": 0, "val": 0}
        with open(self.path, "rb") as spool, atomic_write(outputs.train, "wb") as train, atomic_write(outputs.val, "wb") as val:
            for is_val, line in zip(to_val, spool, strict=True):
                (val if is_val else train).write(line)
                counts["val" if is_val else "train"] += 1
        return counts


def write_splits(outputs: ConvertOutputs, records: list[tuple[str, dict]], val_fraction: float, seed: int) -> dict[str, list[dict]]:
    """Seeded train/val split of (key, record) pairs, written to the train and val outputs; returns the splits."""
    val_keys = split_keys([key for key, _ in records], val_fraction, seed)
    splits = {
        "train": [record for key, record in records if key not in val_keys],
        "val": [record for key, record in records if key in val_keys],
    }
    write_jsonl(outputs.train, splits["train"])
    write_jsonl(outputs.val, splits["val"])
    return splits
