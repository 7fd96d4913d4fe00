"""Seeded procedural inspection scenes: cabinets with BBU devices (boxes), labels (polygons) and cables (lines).

A scene is a 128×128 cabinet panel cut into a 4×4 grid of 32-px cells. Each object fills one
cell, so a tiny vision model sees one object per merged vision token, and every class is solid and
distinct (red box, blue diamond, thick green diagonal). Counts are 0-3 per class.

Outputs (all under one folder):
- platform/: labelling-platform GeoJSON exports (one JSON per image; some images stored rotated
  with an EXIF orientation tag, some with an unsupported Point feature the converter must report);
  with `label_errors` > 0, that share of the scenes with objects carries one wrong annotation (an
  object deleted, given the wrong class, or annotated twice), listed in label_errors.jsonl, which
  only label QA's evaluation reads;
- labelme/: LabelMe files (some with a point shape, reported by convert);
- coco/instances.json + coco/images/: an auxiliary COCO source on grey-blue panels (boxes and
  labels only, one crowd region now and then);
- groups/<mission>/{审核通过,审核不通过}/<group_id>/*.jpg: reviewed photo groups for Stage-A/B, and
  groups/<mission>/NEW-*/*.jpg: new groups with no verdict yet, plus groups/truth.jsonl with each
  group's label (null for the new) and per-image summaries;
- formats/<format>/: the same few scenes as platform, CVAT, Label Studio, YOLO and VOC exports
  (demo/formats.py; demo/exports.py writes them all).

Group rule (mission BBU安装检查): a group passes (审核通过) when every photo shows at least one BBU
and at least as many 标签 as BBU (every device is labelled); otherwise it fails (审核不通过).
Some failing groups were resubmitted and passed: the same group id then exists under both folders.
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from visionqc import contract
from visionqc.io import atomic_write, write_jsonl

SIZE = 128
CELL = 32
GRID = SIZE // CELL
CLASSES = ("BBU", "标签", "线缆")
MISSION = "BBU安装检查"
PASS_DIR, FAIL_DIR = "审核通过", "审核不通过"
VENDORS = ("华为", "中兴", "爱立信")


@dataclass
class Item:
    category: str
    kind: str  # bbox | poly | line
    points: list[tuple[int, int]]
    attributes: dict


def _layout(rng: np.random.Generator, counts: dict[str, int]) -> list[Item]:
    cells = rng.permutation(GRID * GRID)[: sum(counts.values())]
    items, cursor = [], 0
    for category in CLASSES:
        for _ in range(counts.get(category, 0)):
            row, col = divmod(int(cells[cursor]), GRID)
            cursor += 1
            x, y = col * CELL + int(rng.integers(-1, 2)), row * CELL + int(rng.integers(-1, 2))
            x, y = min(max(x, 0), SIZE - CELL), min(max(y, 0), SIZE - CELL)
            if category == "BBU":
                items.append(Item(category, "bbox", [(x + 4, y + 5), (x + 28, y + 27)], {"厂商": VENDORS[int(rng.integers(3))]}))
            elif category == "标签":
                items.append(Item(category, "poly", [(x + 16, y + 3), (x + 29, y + 16), (x + 16, y + 29), (x + 3, y + 16)], {}))
            else:
                items.append(Item(category, "line", [(x + 4, y + 28), (x + 28, y + 4)], {}))
    return items


def _render(rng: np.random.Generator, items: list[Item], background: tuple[int, int, int]) -> Image.Image:
    base = np.array(background, dtype=np.float32) + rng.normal(0, 5, (SIZE, SIZE, 3))
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for item in items:
        if item.kind == "bbox":
            draw.rectangle([*item.points[0], *item.points[1]], fill=(210, 40, 40), outline=(120, 20, 20))
        elif item.kind == "poly":
            draw.polygon(item.points, fill=(40, 90, 225))
        else:
            draw.line(item.points, fill=(30, 170, 60), width=7)
    return image


def random_counts(rng: np.random.Generator) -> dict[str, int]:
    return {category: int(rng.integers(0, 4)) for category in CLASSES}


def scene(rng: np.random.Generator, counts: dict[str, int] | None = None, background=(215, 215, 210)) -> tuple[Image.Image, list[Item]]:
    items = _layout(rng, counts or random_counts(rng))
    return _render(rng, items, background), items


def summary_of(items: list[Item]) -> str:
    return contract.build_summary([{"desc": contract.format_desc(item.category)} for item in items])


def _ring(points: list[tuple[int, int]]) -> list[list[int]]:
    return [list(p) for p in points] + [list(points[0])]


def platform_feature(index: int, item: Item) -> dict:
    if item.kind == "bbox":
        (x1, y1), (x2, y2) = item.points
        geometry = {"type": "ExtentPolygon", "coordinates": [_ring([(x1, y1), (x2, y1), (x2, y2), (x1, y2)])]}
    elif item.kind == "poly":
        geometry = {"type": "Polygon", "coordinates": [_ring(item.points)]}
    else:
        geometry = {"type": "LineString", "coordinates": [list(p) for p in item.points]}
    return {
        "type": "Feature",
        "geometry": geometry,
        "properties": {
            "objectId": f"obj-{index}",
            "content": {"label": item.category, **item.attributes},
            "groups": [],
            "quality": {"qualityStatus": "passed"},
        },
    }


LABEL_ERRORS = ("deleted", "wrong_class", "extra")


def inject_label_error(features: list[dict], kind: str, rng: np.random.Generator) -> dict:
    """Corrupt one object's annotation in place (the pixels stay right); returns what was done."""
    index = int(rng.integers(len(features)))
    label = features[index]["properties"]["content"]["label"]
    if kind == "deleted":
        features.pop(index)
        return {"kind": kind, "object": index, "label": label}
    if kind == "wrong_class":
        wrong = [c for c in CLASSES if c != label][int(rng.integers(len(CLASSES) - 1))]
        features[index]["properties"]["content"] = {"label": wrong}
        return {"kind": kind, "object": index, "label": label, "given": wrong}
    copy = json.loads(json.dumps(features[index]))  # a second annotation of the same object, 2 px off
    copy["properties"]["objectId"] = f"obj-{len(features)}"
    copy["geometry"]["coordinates"] = _shifted(copy["geometry"]["coordinates"])
    features.append(copy)
    return {"kind": kind, "object": index, "label": label}


def _shifted(coordinates):
    """GeoJSON coordinates (any nesting) moved 2 px right and down."""
    if isinstance(coordinates[0], (int, float)):
        return [coordinates[0] + 2, coordinates[1] + 2]
    return [_shifted(part) for part in coordinates]


def write_platform(out: Path, rng: np.random.Generator, count: int, label_errors: float = 0.0,
                   errors_rng: np.random.Generator | None = None) -> list[dict]:
    """The platform export; a `label_errors` share of the scenes with objects gets one corrupted annotation
    (drawn from `errors_rng`, so the scenes are the same at any rate). Returns the corruptions made."""
    out.mkdir(parents=True, exist_ok=True)
    errors_rng = errors_rng or np.random.default_rng(0)
    injected = []
    for n in range(count):
        if n % 10 == 5:  # a 标签 split by a bracket, exported as one MultiPolygon feature
            image, items, parts = multipart_scene(rng)
        else:
            (image, items), parts = scene(rng), []
        features = [platform_feature(i, item) for i, item in enumerate(items)]
        if features and errors_rng.random() < label_errors:
            kind = LABEL_ERRORS[len(injected) % len(LABEL_ERRORS)]
            injected.append({"source_file": f"site{n:04d}.json", **inject_label_error(features, kind, errors_rng)})
        if parts:
            features.append({"type": "Feature", "geometry": {"type": "MultiPolygon", "coordinates": [[_ring(part)] for part in parts]},
                             "properties": {"objectId": "split", "content": {"label": "标签"}, "quality": {"qualityStatus": "passed"}}})
        # a screw marked as a point: the converter must report it, not drop it silently. Only beside other objects: a
        # photo whose every shape is reported is no record (all_shapes_reported), and the demo keeps every photo
        if n % 10 == 7 and features:
            features.append({"type": "Feature", "geometry": {"type": "Point", "coordinates": [5, 5]},
                             "properties": {"objectId": "screw", "content": {"label": "螺丝"}, "quality": {"qualityStatus": "passed"}}})
        stem = f"site{n:04d}"
        if n % 8 == 3:  # stored rotated; the EXIF tag says how to show it upright
            exif = Image.Exif()
            exif[0x0112] = 6
            image.transpose(Image.Transpose.ROTATE_90).save(out / f"{stem}.jpg", quality=92, exif=exif)
        else:
            image.save(out / f"{stem}.jpg", quality=92)
        write_platform_json(out / f"{stem}.json", features)
    return injected


def write_platform_json(target: Path, features: list[dict]) -> None:
    """One scene's labelling-platform export: its GeoJSON features and the image size."""
    export = {"info": {"width": SIZE, "height": SIZE, "depth": 3}, "markResult": {"type": "FeatureCollection", "features": features}}
    target.write_text(json.dumps(export, ensure_ascii=False), "utf-8")


def split_label(x: int, y: int) -> tuple[list[tuple[int, int]], list[list[tuple[int, int]]]]:
    """A slanted 标签 in the cell at (x, y) and its two visible parts either side of a bracket that covers its middle."""
    outline = [(x + 4, y + 10), (x + 28, y + 4), (x + 28, y + 22), (x + 4, y + 28)]
    left = [(x + 4, y + 10), (x + 12, y + 8), (x + 12, y + 26), (x + 4, y + 28)]
    right = [(x + 20, y + 6), (x + 28, y + 4), (x + 28, y + 22), (x + 20, y + 24)]
    return outline, [left, right]


def _draw_split_label(image: Image.Image, x: int, y: int) -> list[list[tuple[int, int]]]:
    outline, parts = split_label(x, y)
    draw = ImageDraw.Draw(image)
    draw.polygon(outline, fill=(40, 90, 225))
    draw.rectangle([x + 12, y + 1, x + 20, y + 31], fill=(95, 95, 100))  # the bracket that hides its middle
    return parts


def multipart_scene(rng: np.random.Generator) -> tuple[Image.Image, list[Item], list[list[tuple[int, int]]]]:
    """1-3 whole 标签 plus one split by a bracket: (image, whole labels, the split label's parts)."""
    items = _layout(rng, {"标签": int(rng.integers(2, 5))})
    last = items.pop()
    image = _render(rng, items, (215, 215, 210))
    return image, items, _draw_split_label(image, last.points[0][0] - 16, last.points[0][1] - 3)


def write_labelme(out: Path, rng: np.random.Generator, count: int) -> list[str]:
    """LabelMe files. Every fifth scene (from the third) holds a 标签 drawn in two parts sharing a group_id; every
    seventh (from the fourth) keeps its image only as imageData; one extra file is truncated (convert reports it).
    Returns the stems of the scenes with parts."""
    out.mkdir(parents=True, exist_ok=True)
    multipart = []
    kinds = {"bbox": "rectangle", "poly": "polygon", "line": "line"}
    for n in range(count):
        stem = f"panel{n:04d}"
        if n % 5 == 2:
            image, items, parts = multipart_scene(rng)
            multipart.append(stem)
        else:
            (image, items), parts = scene(rng), []
        shapes = [{"label": item.category, "points": [list(p) for p in item.points], "group_id": None,
                   "shape_type": kinds[item.kind], "flags": {}} for item in items]
        shapes += [{"label": "标签", "points": [list(p) for p in part], "group_id": 1, "shape_type": "polygon", "flags": {}}
                   for part in parts]
        if n % 9 == 4 and not parts:  # the split scenes keep to polygons, which labelme2coco writes as they are
            shapes.append({"label": "螺丝", "points": [[6, 6]], "group_id": None, "shape_type": "point", "flags": {}})
        doc = {"version": "5.4.1", "flags": {}, "shapes": shapes, "imagePath": f"{stem}.png", "imageData": None,
               "imageHeight": SIZE, "imageWidth": SIZE}
        if n % 7 == 3 and not parts:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            doc.update(imagePath="", imageData=base64.b64encode(buffer.getvalue()).decode("ascii"))
        else:
            image.save(out / f"{stem}.png")
        (out / f"{stem}.json").write_text(json.dumps(doc, ensure_ascii=False, indent=1), "utf-8")
    (out / "panel_truncated.json").write_text('{"version": "5.4.1", "shapes": [{"label": "BBU", "points": [[1, 2], ', "utf-8")
    return multipart


def _labelme_mask(shape: dict, size: tuple[int, int]) -> np.ndarray:
    """The pixel mask labelme draws for a polygon or rectangle shape (PIL, outline and fill)."""
    mask = Image.new("1", size)
    points = [tuple(p) for p in shape["points"]]
    if shape.get("shape_type", "polygon") not in ("polygon", "rectangle") or len(points) < 2:
        raise ValueError(f"labelme_as_coco writes polygons and rectangles only, got a {shape.get('shape_type')} shape")
    if shape.get("shape_type") == "rectangle":
        ImageDraw.Draw(mask).rectangle([points[0], points[1]], outline=1, fill=1)
    else:
        ImageDraw.Draw(mask).polygon(points, outline=1, fill=1)
    return np.asarray(mask, dtype=np.uint8)


def labelme_as_coco(folder: Path, target: Path, stems: list[str] | None = None) -> None:
    """The COCO instances file that labelme's own labelme2coco.py writes for LabelMe files (polygons, rectangles).

    As labelme does: shapes sharing (label, group_id) become one annotation with one segmentation polygon per
    part; area and bbox come from the union mask (pycocotools); ids count from 0; __ignore__ is left out.
    `file_name` points at the images beside the LabelMe files; `stems` limits it to some files.
    """
    from pycocotools import mask as coco_mask

    files = [path for path in sorted(folder.glob("*.json")) if stems is None or path.stem in stems]
    docs = [json.loads(path.read_text("utf-8")) for path in files]
    labels = sorted({shape["label"] for doc in docs for shape in doc["shapes"]} - {"__ignore__", "_background_"})
    categories = [{"supercategory": None, "id": i, "name": name} for i, name in enumerate(["_background_", *labels])]
    ids = {c["name"]: c["id"] for c in categories}
    images, annotations = [], []
    for image_id, doc in enumerate(docs):
        size = (doc["imageWidth"], doc["imageHeight"])
        images.append({"license": 0, "url": None, "file_name": doc["imagePath"], "height": size[1], "width": size[0],
                       "date_captured": None, "id": image_id})
        masks, segmentations = {}, {}
        for index, shape in enumerate(doc["shapes"]):
            instance = (shape["label"], shape.get("group_id") if shape.get("group_id") is not None else f"#{index}")
            masks[instance] = masks.get(instance, 0) | _labelme_mask(shape, size)
            points = shape["points"]
            if shape.get("shape_type") == "rectangle":
                (x1, y1), (x2, y2) = points
                x1, x2 = sorted([x1, x2])
                y1, y2 = sorted([y1, y2])
                points = [[x1, y1], [x2, y1], [x2, y2], [x1, y2]]
            segmentations.setdefault(instance, []).append([float(c) for p in points for c in p])
        for instance, mask in masks.items():
            if instance[0] not in ids:
                continue
            encoded = coco_mask.encode(np.asfortranarray(mask))
            annotations.append({"id": len(annotations), "image_id": image_id, "category_id": ids[instance[0]],
                                "segmentation": segmentations[instance], "area": float(coco_mask.area(encoded)),
                                "bbox": coco_mask.toBbox(encoded).flatten().tolist(), "iscrowd": 0})
    doc = {"info": {"description": "labelme2coco of VisionQC LabelMe files"}, "licenses": [{"url": None, "id": 0, "name": None}],
           "images": images, "type": "instances", "annotations": annotations, "categories": categories}
    with atomic_write(target) as handle:
        handle.write(json.dumps(doc, ensure_ascii=False))


def write_coco(instances: Path, images_dir: Path, rng: np.random.Generator, count: int) -> None:
    """COCO instances JSON plus its images folder (file_name relative to it)."""
    images_dir.mkdir(parents=True, exist_ok=True)
    categories = [{"id": i + 1, "name": name, "supercategory": "机柜"} for i, name in enumerate(CLASSES[:2])]
    ids = {c["name"]: c["id"] for c in categories}
    images, annotations = [], []
    for n in range(count):
        counts = {"BBU": int(rng.integers(0, 4)), "标签": int(rng.integers(0, 4))}
        image, items = scene(rng, counts, background=(180, 190, 205))
        name = f"aux{n:04d}.png"
        image.save(images_dir / name)
        images.append({"id": n + 1, "file_name": name, "width": SIZE, "height": SIZE})
        for item in items:
            xs, ys = [p[0] for p in item.points], [p[1] for p in item.points]
            bbox = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
            segmentation = [[c for p in item.points for c in p]] if item.kind == "poly" else []
            annotations.append({"id": len(annotations) + 1, "image_id": n + 1, "category_id": ids[item.category],
                                "bbox": bbox, "area": bbox[2] * bbox[3], "segmentation": segmentation, "iscrowd": 0})
        if n % 15 == 2 and items:  # a crowd region, reported; beside objects, so that every photo stays a record
            annotations.append({"id": len(annotations) + 1, "image_id": n + 1, "category_id": 1, "bbox": [0, 0, 20, 20],
                                "area": 400, "segmentation": {"size": [SIZE, SIZE], "counts": "PPYo1"}, "iscrowd": 1})
    # an object whose image was deleted from the export: convert reports it as unknown_image
    annotations.append({"id": len(annotations) + 1, "image_id": count + 100, "category_id": 1, "bbox": [4, 4, 20, 20],
                        "area": 400, "segmentation": [], "iscrowd": 0})
    doc = {"info": {"description": "VisionQC auxiliary demo source"}, "images": images, "annotations": annotations, "categories": categories}
    with atomic_write(instances) as handle:
        handle.write(json.dumps(doc, ensure_ascii=False))


def _group_counts(rng: np.random.Generator, passing: bool, size: int) -> list[dict[str, int]]:
    photos = []
    for _ in range(size):
        bbu = int(rng.integers(1, 4))
        photos.append({"BBU": bbu, "标签": int(rng.integers(bbu, 4)), "线缆": int(rng.integers(0, 4))})
    if not passing:
        for index in rng.choice(size, int(rng.integers(1, size + 1)), replace=False):
            bbu = int(rng.integers(0, 4))
            photos[index] = {"BBU": bbu, "标签": int(rng.integers(0, bbu)) if bbu else int(rng.integers(0, 4)), "线缆": int(rng.integers(0, 4))}
    return photos


def write_groups(out: Path, rng: np.random.Generator, count: int, resubmit_every: int = 4, new: int = 0,
                 new_rng: np.random.Generator | None = None) -> None:
    """`count` reviewed groups under the verdict folders, then `new` unreviewed ones (NEW-*, no verdict folder,
    drawn from `new_rng`), and truth.jsonl with every group's per-image summaries (label null for the new)."""
    truth, failed = [], 0
    for n in range(count):
        group_id = f"QC-DEMO-{n:04d}"
        passing = bool(rng.integers(0, 2))
        versions = [True] if passing else [False, True] if failed % resubmit_every == 0 else [False]
        failed += not passing
        for label_pass in versions:
            folder = out / MISSION / (PASS_DIR if label_pass else FAIL_DIR) / group_id
            truth.append(_write_group(out, folder, rng, label_pass, "pass" if label_pass else "fail"))
    for n in range(new):
        passing = bool(new_rng.integers(0, 2))
        truth.append(_write_group(out, out / MISSION / f"NEW-{n:04d}", new_rng, passing, None))
    write_jsonl(out / "truth.jsonl", truth)


def _write_group(out: Path, folder: Path, rng: np.random.Generator, passing: bool, label: str | None) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    per_image, images = {}, []
    for index, counts in enumerate(_group_counts(rng, passing, int(rng.integers(2, 5))), start=1):
        image, items = scene(rng, counts)
        image.save(folder / f"{index:02d}.jpg", quality=92)
        images.append((folder / f"{index:02d}.jpg").relative_to(out).as_posix())
        per_image[f"image_{index}"] = summary_of(items)
    return {"group_id": folder.name, "mission": MISSION, "label": label, "images": images, "per_image": per_image}


def verdict_reason(photos: list[dict[str, int]]) -> tuple[bool, str]:
    """The demo rule applied to per-photo counts, with the reason a reviewer would write."""
    for number, counts in enumerate(photos, start=1):
        if counts.get("BBU", 0) == 0:
            return False, f"图片_{number}没有BBU设备"
        if counts.get("标签", 0) < counts["BBU"]:
            return False, f"图片_{number}有{counts['BBU']}台BBU，只有{counts.get('标签', 0)}个标签"
    return True, "每张照片都有BBU，且每台BBU都贴有标签"


def write_verdicts(target: Path, rng: np.random.Generator, count: int, guidance: str = "") -> None:
    """Chat-only Stage-B training records: a verdict prompt over true per-image summaries, and its answer.

    This is the reference project's distillation idea with the rule itself as the teacher.
    """
    from visionqc.messages import verdict_answer, verdict_prompt

    records = []
    for _ in range(count):
        photos = _group_counts(rng, bool(rng.integers(0, 2)), int(rng.integers(2, 5)))
        per_image = {f"image_{i}": contract.build_summary([{"desc": contract.format_desc(c)} for c in CLASSES for _ in range(p[c])])
                     for i, p in enumerate(photos, start=1)}
        passed, reason = verdict_reason(photos)
        records.append({"messages": [{"role": "user", "content": verdict_prompt(guidance, per_image)},
                                     {"role": "assistant", "content": verdict_answer(passed, reason)}],
                        "metadata": {"verdict": "pass" if passed else "fail"}})
    write_jsonl(target, records)
