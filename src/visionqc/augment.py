"""Stage augment: geometry-aware augmentation of a fusion's train split, one file per epoch.

Epoch k writes `epoch_<k>.jsonl` and its images. Record i of epoch k draws from a generator seeded by
(seed, k, i), so every epoch has its own variant, a rerun gives the same bytes, and a change to one
record leaves the others alone.

The ops run in the order of `augment.ops`, each with its own probability:
- affine (hflip, vflip, rotate, scale, translate) accumulate into one 3x3 matrix;
- barriers (crop, resize_to_budget, pad_to_multiple) flush it: crop and resize join the matrix and the
  image is resampled once onto the new canvas; pad flushes first and then pastes (no resampling);
- colour ops (brightness, contrast, saturation, hue) run after all geometry, whatever their position.

Geometry follows the same matrix, then is clipped to the canvas with shapely:
- a bbox_2d stays a box under flips, 90° turns, scaling and translation; under any other rotation it
  becomes a poly of its four corners (a box around them would claim pixels the object does not cover);
- a poly or line is clipped; a poly split in parts keeps its largest part, a line its longest (counted);
  a clipped poly with three corners gets the midpoint of its longest edge as a fourth vertex;
- an object whose visible fraction (area, or length for lines) falls below `min_coverage` is dropped, and
  so is one left degenerate (under a pixel wide or long). The record's summary is then rebuilt from the
  objects that remain. `metadata._augment` keeps the ops applied, the whole `matrix` (a, b, c, d, e, f:
  x' = ax + by + c, y' = dx + ey + f), `kept_indices` and each kept object's `coverage`.

Records pass through unchanged (their media paths rebased) when bypassed (`bypass_prob`), when they have
no image or several images, when their image cannot be read or disagrees with width/height, when every
object would be dropped, or when objects would be dropped but the summary is not the one the objects
give (it could not be rebuilt). The report counts each reason and lists the lines.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from itertools import islice
from pathlib import Path

import numpy as np
import orjson
import shapely
from PIL import Image, ImageEnhance
from shapely import affinity
from shapely.geometry import LineString, Polygon, box
from tqdm import tqdm

from visionqc import contract
from visionqc.images import smart_resize
from visionqc.io import atomic_directory, atomic_write, read_jsonl, write_json
from visionqc.options import options_from, unknown_key_message
from visionqc.plots import draw_augment_pairs
from visionqc.tracking import StageResult

AFFINE_OPS = ("hflip", "vflip", "rotate", "scale", "translate")
COLOUR_OPS = ("brightness", "contrast", "saturation", "hue")
# The keys each op reads; any other key on it is refused.
OP_KEYS = {
    "hflip": {"prob"}, "vflip": {"prob"},
    "rotate": {"prob", "degrees"},
    "scale": {"prob", "low", "high"},
    "translate": {"prob", "fraction"},
    "crop": {"prob", "min_scale", "coverage", "attempts"},
    "resize_to_budget": {"prob", "max_pixels", "min_pixels", "factor"},
    "pad_to_multiple": {"prob", "multiple"},
    **{name: {"prob", "strength"} for name in COLOUR_OPS},
}
MIN_SIDE = 1.0  # pixels: a box side, a poly's extent or a line shorter than this is degenerate
FILL = (0, 0, 0)


@dataclass
class AugmentOp:
    """One entry of augment.ops; `op` names it, and it reads only its own keys (OP_KEYS): another op's key set
    to anything but its default is refused."""

    op: str
    prob: float = 1.0
    degrees: float = 10.0  # rotate: angle drawn from [-degrees, degrees]
    low: float = 0.9  # scale: factor drawn from [low, high]
    high: float = 1.1
    fraction: float = 0.1  # translate: shift up to this fraction of each side
    min_scale: float = 0.6  # crop: window sides from min_scale to 1 of the image's
    coverage: float = 0.0  # crop: retry windows until every object keeps this fraction (0: any window)
    attempts: int = 10  # crop: windows tried before the crop is skipped
    max_pixels: int = 1048576  # resize_to_budget: the qwen_vl_utils rule's bounds and factor
    min_pixels: int = 4096
    factor: int = 32
    multiple: int = 32  # pad_to_multiple: pad right and bottom to a multiple of this
    strength: float = 0.2  # colour: factor from [1 - strength, 1 + strength]; hue: shift of up to strength turns

    def check(self, section: str) -> None:
        if self.op not in OP_KEYS:
            raise ValueError(unknown_key_message(section, f"op: {self.op}", [f"op: {name}" for name in OP_KEYS]))
        if not 0 <= self.prob <= 1:
            raise ValueError(f"{section}.prob must lie in [0, 1], got {self.prob}")
        if self.op == "scale" and not 0 < self.low <= self.high:
            raise ValueError(f"{section} needs 0 < low <= high, got low {self.low}, high {self.high}")
        if self.op == "crop" and not 0 < self.min_scale <= 1:
            raise ValueError(f"{section}.min_scale must lie in (0, 1], got {self.min_scale}")
        if self.op == "pad_to_multiple" and self.multiple < 1:
            raise ValueError(f"{section}.multiple must be at least 1, got {self.multiple}")


@dataclass
class AugmentOptions:
    """The augment block; `epochs` 0 turns the stage off (training reads the fusion as it is)."""

    epochs: int = 0
    seed: int = 17
    bypass_prob: float = 0.0
    min_coverage: float = 0.3
    jpeg_quality: int = 95
    preview: int = 6
    ops: list[AugmentOp] = field(default_factory=list)

    @classmethod
    def from_dict(cls, options: dict) -> AugmentOptions:
        options = dict(options)
        entries = options.get("ops", [])
        if not isinstance(entries, list):
            raise ValueError("augment.ops must be a list of {op: <name>, prob: ..., ...} entries")
        ops = []
        for index, entry in enumerate(entries):
            section = f"augment.ops[{index}]"
            if not isinstance(entry, dict) or "op" not in entry:
                raise ValueError(f"{section} needs an op: name (one of {', '.join(OP_KEYS)})")
            known = OP_KEYS.get(entry["op"], set())
            defaults = {f.name: f.default for f in fields(AugmentOp)}
            for key, value in entry.items():
                # the schema fills every key with its default; a key the op does not read may only hold that
                if known and key != "op" and key not in known and (key not in defaults or value != defaults[key]):
                    raise ValueError(unknown_key_message(section, key, known))
            ops.append(options_from(AugmentOp, entry, section))
        options["ops"] = ops
        return options_from(cls, options, "augment")


# --- matrices -----------------------------------------------------------------------------------


def _translation(dx: float, dy: float) -> np.ndarray:
    return np.array([[1.0, 0.0, dx], [0.0, 1.0, dy], [0.0, 0.0, 1.0]])


def _about_center(linear: np.ndarray, width: float, height: float) -> np.ndarray:
    return _translation(width / 2, height / 2) @ linear @ _translation(-width / 2, -height / 2)


def affine_matrix(op: AugmentOp, rng: np.random.Generator, width: float, height: float) -> np.ndarray:
    """The 3x3 matrix of one affine op on a width x height canvas (pixel corners at 0 and width)."""
    if op.op == "hflip":
        return np.array([[-1.0, 0.0, width], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    if op.op == "vflip":
        return np.array([[1.0, 0.0, 0.0], [0.0, -1.0, height], [0.0, 0.0, 1.0]])
    if op.op == "rotate":
        theta = math.radians(rng.uniform(-op.degrees, op.degrees))
        cos, sin = math.cos(theta), math.sin(theta)
        return _about_center(np.array([[cos, -sin, 0.0], [sin, cos, 0.0], [0.0, 0.0, 1.0]]), width, height)
    if op.op == "scale":
        factor = rng.uniform(op.low, op.high)
        return _about_center(np.diag([factor, factor, 1.0]), width, height)
    return _translation(rng.uniform(-op.fraction, op.fraction) * width, rng.uniform(-op.fraction, op.fraction) * height)


def axis_aligned(matrix: np.ndarray) -> bool:
    """True when the matrix maps axis-parallel boxes to axis-parallel boxes (flips, 90° turns, scale, shift)."""
    linear = matrix[:2, :2]
    return bool((abs(linear[0, 1]) < 1e-9 and abs(linear[1, 0]) < 1e-9) or (abs(linear[0, 0]) < 1e-9 and abs(linear[1, 1]) < 1e-9))


def _apply(matrix: np.ndarray, geometry):
    a, b, c = matrix[0]
    d, e, f = matrix[1]
    return affinity.affine_transform(geometry, [a, b, d, e, c, f])


# --- geometry -----------------------------------------------------------------------------------


def _points(flat: list[float]) -> list[tuple[float, float]]:
    return [(flat[i], flat[i + 1]) for i in range(0, len(flat) - 1, 2)]


def _number(value: float) -> float | int:
    rounded = round(float(value), 2)
    return int(rounded) if rounded.is_integer() else rounded


def _flat(coords) -> list[float | int]:
    return [_number(v) for point in coords for v in point]


def _largest(geometry, measure):
    """The biggest part of a multi-part result, and whether it had several parts."""
    parts = [g for g in getattr(geometry, "geoms", [geometry]) if not g.is_empty]
    if not parts:
        return None, False
    return max(parts, key=measure), len(parts) > 1


def _four_corners(polygon: Polygon) -> list[tuple[float, float]]:
    """The exterior ring's corners; a triangle gets the midpoint of its longest edge (the contract needs four)."""
    ring = list(polygon.exterior.coords)[:-1]
    if len(ring) == 3:
        edges = [(i, math.dist(ring[i], ring[(i + 1) % 3])) for i in range(3)]
        i = max(edges, key=lambda item: item[1])[0]
        a, b = ring[i], ring[(i + 1) % 3]
        ring.insert(i + 1, ((a[0] + b[0]) / 2, (a[1] + b[1]) / 2))
    return ring


@dataclass
class Tracked:
    """One object on its way through the ops: its geometry (shapely) and the fraction of it still visible."""

    index: int
    obj: dict
    kind: str  # bbox_2d, poly or line
    shape: object
    coverage: float = 1.0


def _start(index: int, obj: dict) -> Tracked:
    key = contract.geometry_key(obj)
    flat = obj[key]
    if key == "bbox_2d":
        shape = box(*flat)
    elif key == "poly":
        shape = shapely.make_valid(Polygon(_points(flat)))
    else:
        shape = LineString(_points(flat))
    return Tracked(index, obj, key, shape)


def _measure(kind: str):
    return (lambda g: g.length) if kind == "line" else (lambda g: g.area)


def move(item: Tracked, matrix: np.ndarray, width: int, height: int, counts: Counter) -> Tracked | None:
    """Transform one object and clip it to the canvas; None when nothing of it is left."""
    shape = _apply(matrix, item.shape)
    kind = item.kind
    if kind == "bbox_2d":
        if axis_aligned(matrix):
            shape = box(*shape.bounds)
        else:
            kind = "poly"
            counts["boxes_to_poly"] += 1
    measure = _measure(kind)
    full = measure(shape)
    clipped = shape.intersection(box(0, 0, width, height))
    keep = ("LineString", "MultiLineString") if kind == "line" else ("Polygon", "MultiPolygon")
    if kind == "poly":
        clipped = shapely.make_valid(clipped)
    if clipped.geom_type == "GeometryCollection":  # a clip that also touches the edge leaves points or lines
        clipped = shapely.union_all([g for g in clipped.geoms if g.geom_type in keep])
    part, split = _largest(clipped, measure)
    if part is None or full <= 0:
        return None
    if split:
        counts[f"{'lines' if kind == 'line' else 'polygons'}_split"] += 1
    if measure(part) < full * (1 - 1e-9):
        counts["objects_clipped"] += 1
    return Tracked(item.index, item.obj, kind, part, item.coverage * measure(part) / full)


def finish(item: Tracked) -> dict | None:
    """The object in contract form, or None when it is degenerate after rounding."""
    obj = {k: v for k, v in item.obj.items() if k not in contract.GEOMETRY_KEYS and k not in ("poly_points", "line_points")}
    if item.kind == "bbox_2d":
        flat = _flat(_points(list(item.shape.bounds)))
        if flat[2] - flat[0] < MIN_SIDE or flat[3] - flat[1] < MIN_SIDE:
            return None
        return {"bbox_2d": flat, **obj}
    if item.kind == "poly":
        if item.shape.geom_type != "Polygon":
            return None
        x1, y1, x2, y2 = item.shape.bounds
        flat = contract.canonical_polygon(_flat(_four_corners(item.shape)))
        if x2 - x1 < MIN_SIDE or y2 - y1 < MIN_SIDE or len(flat) < 2 * contract.POLY_MIN_POINTS:
            return None
        return {"poly": flat, "poly_points": len(flat) // 2, **obj}
    if item.shape.geom_type != "LineString" or item.shape.length < MIN_SIDE:
        return None
    flat = _flat(item.shape.coords)
    return {"line": flat, "line_points": len(flat) // 2, **obj}


# --- one record -----------------------------------------------------------------------------------


@dataclass
class Variant:
    """What augmenting one record gave: the record to write, the image to save (None: unchanged), counts."""

    record: dict
    image: Image.Image | None
    counts: Counter
    passed: str = ""  # why the record passed through unchanged, if it did


def _crop_window(op: AugmentOp, rng: np.random.Generator, width: int, height: int, items: list[Tracked],
                 matrix: np.ndarray) -> tuple[np.ndarray, tuple[int, int]] | None:
    """A crop's matrix (a shift to the window) and size, or None when no window keeps `coverage` of every object."""
    moved = [(_measure(it.kind), _apply(matrix, it.shape)) for it in items] if op.coverage > 0 else []
    for _ in range(max(1, op.attempts)):
        scale = rng.uniform(op.min_scale, 1.0)
        w, h = max(1, round(width * scale)), max(1, round(height * scale))
        x0, y0 = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        window = box(x0, y0, x0 + w, y0 + h)
        if all(measure(shape) <= 0 or measure(shape.intersection(window)) >= op.coverage * measure(shape)
               for measure, shape in moved):
            return _translation(-x0, -y0), (w, h)
    return None


def _surviving_objects(items: list, min_coverage: float, counts: Counter) -> tuple[list[tuple[int, dict]], list[float]]:
    """(original index, object) of each moved object still covered enough and not degenerate, and its coverage."""
    kept, coverage = [], []
    for item in items:
        if item.coverage < min_coverage:
            counts["objects_dropped_coverage"] += 1
            continue
        obj = finish(item)
        if obj is None:
            counts["objects_dropped_degenerate"] += 1
            continue
        kept.append((item.index, obj))
        coverage.append(round(item.coverage, 3))
    return kept, coverage


def augment_record(record: dict, image: Image.Image, ops: list[AugmentOp], rng: np.random.Generator,
                   min_coverage: float) -> Variant:
    """Apply the ops to one single-image record whose image is `image` (upright, width x height)."""
    counts = Counter()
    items = [_start(i, obj) for i, obj in enumerate(record.get("objects") or [])]
    width, height = image.size
    matrix, total = np.eye(3), np.eye(3)
    colours = []

    def flush(new_size: tuple[int, int]) -> None:
        nonlocal image, items, matrix, total, width, height
        total = matrix @ total
        if not np.allclose(matrix, np.eye(3)) or new_size != (width, height):
            inverse = np.linalg.inv(matrix)
            image = image.transform(new_size, Image.AFFINE, data=tuple(inverse[:2].flatten()),
                                    resample=Image.BILINEAR, fillcolor=FILL if image.mode == "RGB" else 0)
            counts["resamples"] += 1
            width, height = new_size
            items = [moved for it in items if (moved := move(it, matrix, width, height, counts)) is not None]
        matrix = np.eye(3)

    for op in ops:
        if op.prob < 1 and rng.random() >= op.prob:
            continue
        if op.op in COLOUR_OPS:
            colours.append(op)
            continue
        if op.op in AFFINE_OPS:
            matrix = affine_matrix(op, rng, width, height) @ matrix
        elif op.op == "crop":
            found = _crop_window(op, rng, width, height, items, matrix)
            if found is None:
                counts["crops_skipped"] += 1
                continue
            shift, size = found
            matrix = shift @ matrix
            flush(size)
        elif op.op == "resize_to_budget":
            new_h, new_w = smart_resize(height, width, op.factor, op.min_pixels, op.max_pixels)
            matrix = np.diag([new_w / width, new_h / height, 1.0]) @ matrix
            flush((new_w, new_h))
        else:  # pad_to_multiple: flush, then paste onto a bigger canvas (geometry does not move)
            flush((width, height))
            size = (math.ceil(width / op.multiple) * op.multiple, math.ceil(height / op.multiple) * op.multiple)
            if size != (width, height):
                canvas = Image.new(image.mode, size, FILL if image.mode == "RGB" else 0)
                canvas.paste(image, (0, 0))
                image, (width, height) = canvas, size
        counts[f"op.{op.op}"] += 1
    flush((width, height))
    for op in colours:
        image = _colour(image, op, rng)
        counts[f"op.{op.op}"] += 1

    kept, coverage = _surviving_objects(items, min_coverage, counts)
    objects = record.get("objects") or []
    counts["objects_dropped_clipped_away"] += len(objects) - len(items)
    out = {**record, "width": width, "height": height}
    if objects:
        out["objects"] = [obj for _, obj in kept]
    if len(kept) < len(objects):
        if not kept:
            return Variant(record, None, Counter(), "every_object_dropped")
        summary = record.get("summary")
        if summary is not None:
            if summary != contract.build_summary(objects):
                return Variant(record, None, Counter(), "summary_not_rebuildable")
            out["summary"] = contract.build_summary(out["objects"])
            counts["summaries_rebuilt"] += 1
    metadata = dict(record.get("metadata") or {})
    metadata["_augment"] = {"ops": sorted(k.removeprefix("op.") for k in counts if k.startswith("op.")),
                            "matrix": [round(float(v), 6) for v in total[:2].flatten()],
                            "kept_indices": [index for index, _ in kept], "coverage": coverage}
    out["metadata"] = metadata
    counts["objects_in"] += len(objects)
    counts["objects_out"] += len(kept)
    return Variant(out, image, counts)


def _colour(image: Image.Image, op: AugmentOp, rng: np.random.Generator) -> Image.Image:
    if op.op == "hue":
        if image.mode != "RGB":
            return image
        h, s, v = image.convert("HSV").split()
        shift = round(rng.uniform(-op.strength, op.strength) * 255)
        h = h.point(lambda value: (value + shift) % 256)
        return Image.merge("HSV", (h, s, v)).convert("RGB")
    enhancer = {"brightness": ImageEnhance.Brightness, "contrast": ImageEnhance.Contrast, "saturation": ImageEnhance.Color}[op.op]
    return enhancer(image).enhance(rng.uniform(1 - op.strength, 1 + op.strength))


# --- the stage ------------------------------------------------------------------------------------


WINDOW = 256  # records augmented at a time (memory holds one window)
PASSED_SHOWN = 200  # records passed through unaugmented, listed in the report


def _load(path: Path, record: dict) -> tuple[Image.Image | None, str]:
    try:
        with Image.open(path) as opened:
            image = opened.convert("RGB") if opened.mode not in ("RGB", "L") else opened.copy()
    except (OSError, ValueError) as exc:
        return None, f"image_unreadable: {exc}"
    if image.size != (record.get("width"), record.get("height")):
        return None, f"size_mismatch: image is {image.size[0]}x{image.size[1]}, record says {record.get('width')}x{record.get('height')}"
    return image, ""


def with_epoch(record: dict, epoch: int) -> dict:
    """A mixed-mode record carries its epoch, from which it draws dense or summary (messages.record_mode)."""
    metadata = record.get("metadata") or {}
    if metadata.get("_fusion_mode") != "mixed":
        return record
    return {**record, "metadata": {**metadata, "_epoch": epoch}}


def augment_epoch(records_path: str | Path, out_path: str | Path, images_dir: str | Path, report_path: str | Path,
                  preview_path: str | Path, options: dict, epoch: int, workers: int = 1) -> StageResult:
    """Write epoch `epoch` of the augmentation of `records_path` (every output path given by the rule)."""
    opts = AugmentOptions.from_dict(options)
    records_path, out_path, images_dir = Path(records_path), Path(out_path), Path(images_dir)
    source_dir, out_dir = records_path.parent, out_path.parent
    counts, passed, previews = Counter(), [], []

    def one(line: int, record: dict) -> tuple[Variant, Path | None]:
        rng = np.random.default_rng([opts.seed, epoch, line])
        images = record.get("images") or []
        reason = ""
        if not images:
            reason = "no_image"
        elif len(images) > 1:
            reason = "several_images"
        elif rng.random() < opts.bypass_prob:
            reason = "bypassed"
        if reason:
            return Variant(record, None, Counter(), reason), None
        source = Path(images[0]) if os.path.isabs(images[0]) else source_dir / images[0]
        image, reason = _load(source, record)
        if image is None:
            return Variant(record, None, Counter(), reason), None
        variant = augment_record(record, image, opts.ops, rng, opts.min_coverage)
        return variant, source

    def save(line: int, record: dict, work_images: Path) -> tuple[dict, Counter, str, tuple | None]:
        variant, source = one(line, record)
        if variant.image is None:
            return contract.rebase_media(dict(variant.record), source_dir, out_dir), variant.counts, variant.passed, None
        suffix = ".jpg" if source.suffix.lower() in (".jpg", ".jpeg") else ".png"
        name = f"{line:07d}{suffix}"
        variant.image.save(work_images / name, **({"quality": opts.jpeg_quality} if suffix == ".jpg" else {}))
        out = dict(variant.record)
        out["images"] = [os.path.relpath(images_dir / name, out_dir).replace(os.sep, "/")]
        problems = contract.check_record(out)[0] + contract.check_bounds(out)
        if problems:
            raise RuntimeError(f"{records_path}:{line}: augmentation made an invalid record ({problems[0].message}); "
                               "please report it with this line and augment.seed")
        return out, variant.counts, "", (source, record.get("objects") or [], name, out.get("objects") or [])

    # streamed: a window of records is augmented by the threads and written, in order, before the next is read
    records_in = 0
    with (atomic_write(out_path, "wb") as written, atomic_directory(images_dir) as work_images,
          ThreadPoolExecutor(max(1, workers)) as pool, tqdm(desc=f"augment epoch {epoch}", unit="rec", mininterval=5) as bar):
        rows = read_jsonl(records_path)
        while window := list(islice(rows, WINDOW)):
            for (line, _), (record, record_counts, reason, pair) in zip(
                    window, pool.map(lambda row: save(*row, work_images), window), strict=True):
                written.write(orjson.dumps(with_epoch(record, epoch)) + b"\n")
                records_in += 1
                counts.update(record_counts)
                if reason:
                    counts[f"passed.{reason.split(':')[0]}"] += 1
                    if reason not in ("no_image", "bypassed"):
                        counts["passed_through_total"] += 1
                        if len(passed) < PASSED_SHOWN:
                            passed.append({"line": line, "reason": reason})
                else:
                    counts["augmented"] += 1
                    if pair[1] and len(previews) < opts.preview:
                        previews.append(pair)
            bar.update(len(window))
    draw_augment_pairs([(source, before, images_dir / name, after) for source, before, name, after in previews], preview_path)
    passed_total = counts.pop("passed_through_total", 0)
    report = {"epoch": epoch, "seed": opts.seed, "records_in": records_in, "records_out": records_in,
              "counts": dict(sorted(counts.items())), "passed_through": passed, "passed_through_total": passed_total}
    write_json(report_path, report)
    return StageResult(report=report, metrics={"records": records_in, **report["counts"]}, params={"epoch": epoch},
                       artifacts=[report_path, preview_path], inputs={"records": records_path},
                       outputs={"records": out_path, "images": images_dir})
