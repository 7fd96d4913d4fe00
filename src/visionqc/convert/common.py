"""What every format reader yields, and the shared steps that turn it into contract records.

Readers (platform.py, labelme.py, coco.py) only parse their format into `SourceImage`s. The steps
here apply EXIF orientation, the optional pixel-budget resize, rounding, clipping, canonical
polygons, the summary builder and the seeded split, so every format behaves the same.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps

from visionqc import contract
from visionqc.images import orientation, orientation_mapper, smart_resize, upright_size
from visionqc.io import link_or_copy, replace_directory, write_jsonl
from visionqc.options import options_from

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".JPG", ".JPEG", ".PNG")


@dataclass
class Shape:
    """One annotated shape before conversion. kind: bbox, poly or line (anything else is reported)."""

    kind: str
    points: list[tuple[float, float]]
    category: str
    attributes: dict = field(default_factory=dict)
    ref: str = ""


@dataclass
class Issue:
    """Something a reader or converter did not turn into an object, and why."""

    file: str
    ref: str
    reason: str
    detail: str = ""

    def as_dict(self) -> dict:
        return {"file": self.file, "ref": self.ref, "reason": self.reason, "detail": self.detail}


@dataclass
class SourceImage:
    key: str  # relative image path inside the export; names the output image
    image_path: Path
    annotation_file: str
    declared_size: tuple[int, int] | None  # (width, height) the annotation was drawn on
    shapes: list[Shape]
    issues: list[Issue] = field(default_factory=list)


@dataclass
class PlatformOptions:
    skip_quality: list[str] = field(default_factory=lambda: ["failed", "unqualified"])  # reviewer verdicts reported, not converted


@dataclass
class LabelmeOptions:
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
    platform: PlatformOptions = field(default_factory=PlatformOptions)
    labelme: LabelmeOptions = field(default_factory=LabelmeOptions)
    coco: CocoOptions = field(default_factory=CocoOptions)
    signals: SignalOptions = field(default_factory=SignalOptions)

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
        scratch = Path(tempfile.mkdtemp(prefix=".convert.", suffix=".tmp", dir=self.report.parent))
        try:
            (scratch / "media").mkdir()
            (scratch / "overlays").mkdir()
            yield scratch
            replace_directory(scratch / "media", self.media)
            if self.overlays is not None:
                replace_directory(scratch / "overlays", self.overlays)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def circle_polygon(center: tuple[float, float], rim: tuple[float, float], vertices: int) -> list[tuple[float, float]]:
    radius = math.dist(center, rim)
    return [
        (center[0] + radius * math.cos(2 * math.pi * i / vertices), center[1] + radius * math.sin(2 * math.pi * i / vertices))
        for i in range(vertices)
    ]


def find_image(annotation: Path, stem: str | None = None) -> Path | None:
    """The image beside an annotation file with the same stem (any usual suffix)."""
    stem = stem or annotation.stem
    for suffix in IMAGE_SUFFIXES:
        candidate = annotation.with_name(stem + suffix)
        if candidate.exists():
            return candidate
    return None


def _shape_to_object(shape: Shape, transform, width: int, height: int) -> tuple[dict | None, str, int]:
    """Returns (object or None, reason if None, clipped coordinate count)."""
    clipped = 0
    points = []
    for x, y in shape.points:
        if not (math.isfinite(x) and math.isfinite(y)):
            return None, "non_finite", 0
        tx, ty = transform(x, y)
        cx, cy = min(max(round(tx), 0), width), min(max(round(ty), 0), height)
        clipped += (cx != round(tx)) + (cy != round(ty))
        points.append((cx, cy))
    desc = contract.format_desc(shape.category, shape.attributes)
    if shape.kind == "bbox":
        box = contract.bbox_of(points)
        if box[0] >= box[2] or box[1] >= box[3]:
            return None, "degenerate_bbox", clipped
        return {"bbox_2d": box, "desc": desc}, "", clipped
    if shape.kind == "poly":
        flat = contract.canonical_polygon([c for p in points for c in p])
        if len(flat) // 2 < contract.POLY_MIN_POINTS:
            return None, "poly_too_few_points", clipped
        return {"poly": flat, "poly_points": len(flat) // 2, "desc": desc}, "", clipped
    if shape.kind == "line":
        flat = [c for i, p in enumerate(points) if i == 0 or p != points[i - 1] for c in p]
        if len(flat) // 2 < contract.LINE_MIN_POINTS:
            return None, "line_too_few_points", clipped
        return {"line": flat, "line_points": len(flat) // 2, "desc": desc}, "", clipped
    return None, f"unsupported_{shape.kind}", clipped


def convert_image(source: SourceImage, images_dir: Path, images_prefix: str, options: ConvertOptions,
                  stats: dict) -> tuple[dict | None, list[Issue]]:
    """One source image → (contract record or None, issues). Writes the upright, resized image into `images_dir`;
    the record names it as `images_prefix/<key>`."""
    issues = list(source.issues)
    if not source.image_path or not Path(source.image_path).exists():
        return None, issues + [Issue(source.annotation_file, source.key, "missing_image", f"no image at {source.image_path}")]
    try:
        image = Image.open(source.image_path)
        raw_size = image.size
        orient = orientation(image)
    except Exception as exc:  # PIL raises many types for bad files
        return None, issues + [Issue(source.annotation_file, source.key, "corrupt_image", str(exc))]
    upright = upright_size(raw_size, orient)
    declared = source.declared_size or upright
    if declared == upright:
        transform = orientation_mapper(1, upright)
    elif declared == raw_size:
        transform = orientation_mapper(orient, raw_size)
    else:
        detail = f"annotation is {declared[0]}x{declared[1]}, image is {raw_size[0]}x{raw_size[1]} (EXIF orientation {orient})"
        return None, issues + [Issue(source.annotation_file, source.key, "size_mismatch", detail)]

    width, height = upright
    if options.resize:
        new_h, new_w = smart_resize(height, width, options.resize_factor, options.min_pixels, options.max_pixels)
    else:
        new_w, new_h = width, height
    sx, sy = new_w / width, new_h / height

    def scaled(x: float, y: float) -> tuple[float, float]:
        ux, uy = transform(x, y)
        return ux * sx, uy * sy

    objects = []
    for shape in source.shapes:
        obj, reason, clipped = _shape_to_object(shape, scaled, new_w, new_h)
        stats["clipped_coordinates"] += clipped
        if obj is None:
            issues.append(Issue(source.annotation_file, shape.ref, reason, f"{shape.kind} {shape.category}"))
        else:
            objects.append(obj)

    target = images_dir / source.key
    if orient == 1 and (new_w, new_h) == (width, height):
        link_or_copy(source.image_path, target)
    else:
        try:
            upright_image = ImageOps.exif_transpose(image)
            if (new_w, new_h) != (width, height):
                upright_image = upright_image.resize((new_w, new_h), Image.Resampling.BICUBIC)
            target.parent.mkdir(parents=True, exist_ok=True)
            save_kwargs = {"quality": options.jpeg_quality} if target.suffix.lower() in (".jpg", ".jpeg") else {}
            upright_image.save(target, **save_kwargs)
        except Exception as exc:
            return None, issues + [Issue(source.annotation_file, source.key, "corrupt_image", str(exc))]
        stats["exif_rotated"] += orient != 1
        stats["resized"] += (new_w, new_h) != (width, height)

    record = {"images": [f"{images_prefix}/{source.key}"], "width": new_w, "height": new_h, "objects": objects}
    if options.summary:
        record["summary"] = contract.build_summary(objects, empty_as_irrelevant=options.empty_as_irrelevant)
    record["metadata"] = {"source_file": source.annotation_file}
    return record, issues


def split_keys(keys: list[str], val_fraction: float, seed: int) -> set[str]:
    """Seeded, order-independent choice of validation keys: the keys with the smallest seeded hashes."""
    if val_fraction <= 0 or len(keys) < 2:
        return set()
    count = min(len(keys) - 1, max(1, round(len(keys) * val_fraction)))
    ranked = sorted(keys, key=lambda k: hashlib.sha256(f"{seed}:{k}".encode()).hexdigest())
    return set(ranked[:count])


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
