"""The same seeded scenes written in every exchange format: the platform's GeoJSON (the reference),
CVAT for images 1.1, Label Studio JSON, YOLO and Pascal VOC (resources/demo/formats/<format>/).

Each format says what it can: CVAT everything (boxes with attributes and occlusion, polygons,
polylines); Label Studio boxes and polygons, attributes as per-region choices, no lines; YOLO boxes
and polygons, no attributes, no lines; VOC boxes only (a 标签 becomes its box), no lines. Each also
carries what convert must report rather than convert: a CVAT point, ellipse and mask, a Label
Studio keypoint and a cancelled and an earlier annotation, a VOC part, a YOLO image with no label
file (background). tests/test_convert_formats.py converts each against the platform reference.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from xml.etree import ElementTree  # writing only; exports are parsed with defusedxml

import numpy as np
import yaml

from visionqc.demo.scenes import (
    CLASSES,
    SIZE,
    Item,
    platform_feature,
    scene,
    write_platform_json,
)
from visionqc.io import atomic_directory

FORMATS = ("platform", "cvat", "label_studio", "yolo", "voc")
SCENE_TAG = ("机房", "室外")


def demo_scenes(rng: np.random.Generator, count: int) -> list[tuple[str, object, list[Item]]]:
    """(stem, image, items): scene 1 is empty; every fourth scene's first BBU is partly hidden (遮挡=是)."""
    scenes = []
    for n in range(count):
        image, items = scene(rng, {c: 0 for c in CLASSES} if n == 1 else None)
        for item in items:
            if item.category == "BBU" and n % 4 == 0:
                item.attributes["遮挡"] = "是"
                break
        scenes.append((f"scene{n:04d}", image, items))
    return scenes


def _xml(root: ElementTree.Element, target: Path) -> None:
    ElementTree.indent(root)
    target.parent.mkdir(parents=True, exist_ok=True)
    ElementTree.ElementTree(root).write(target, encoding="utf-8", xml_declaration=True)


def _sub(parent, tag: str, text=None, **attributes) -> ElementTree.Element:
    node = ElementTree.SubElement(parent, tag, {k: str(v) for k, v in attributes.items()})
    if text is not None:
        node.text = str(text)
    return node


def _save(image, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    image.save(target, quality=92)


def write_platform_reference(out: Path, scenes) -> None:
    for stem, image, items in scenes:
        _save(image, out / f"{stem}.jpg")
        write_platform_json(out / f"{stem}.json", [platform_feature(i, item) for i, item in enumerate(items)])


def write_cvat(out: Path, scenes) -> None:
    root = ElementTree.Element("annotations")
    _sub(root, "version", "1.1")
    task = _sub(_sub(root, "meta"), "task")
    _sub(task, "name", "visionqc demo")
    _sub(task, "size", len(scenes))
    labels = _sub(task, "labels")
    for name in (*CLASSES, "螺丝", "铭牌", "油污"):
        label = _sub(labels, "label")
        _sub(label, "name", name)
        if name == "BBU":
            attribute = _sub(_sub(label, "attributes"), "attribute")
            _sub(attribute, "name", "厂商")
            _sub(attribute, "input_type", "select")
            _sub(attribute, "values", "华为\n中兴\n爱立信")
    tags = {"bbox": "box", "poly": "polygon", "line": "polyline"}
    for n, (stem, image, items) in enumerate(scenes):
        _save(image, out / "images" / f"{stem}.jpg")
        node = _sub(root, "image", id=n, name=f"{stem}.jpg", width=SIZE, height=SIZE)
        for item in items:
            occluded = int(item.attributes.get("遮挡") == "是")
            common = {"label": item.category, "source": "manual", "occluded": occluded, "z_order": 0}
            if item.kind == "bbox":
                (x1, y1), (x2, y2) = item.points
                shape = _sub(node, "box", **common, xtl=f"{x1:.2f}", ytl=f"{y1:.2f}", xbr=f"{x2:.2f}", ybr=f"{y2:.2f}")
            else:
                shape = _sub(node, tags[item.kind], **common, points=";".join(f"{x:.2f},{y:.2f}" for x, y in item.points))
            for name, value in item.attributes.items():
                if name != "遮挡":
                    _sub(shape, "attribute", value, name=name)
        _sub(node, "tag", label=SCENE_TAG[n % 2], source="manual")
        if n % 6 == 2:
            _sub(node, "points", label="螺丝", source="manual", occluded=0, points="6.00,6.00", z_order=0)
        if n % 6 == 3:
            _sub(node, "ellipse", label="铭牌", source="manual", occluded=0, cx="64", cy="64", rx="6", ry="4", z_order=0)
        if n % 6 == 4:
            _sub(node, "mask", label="油污", source="manual", occluded=0, rle="5, 3, 5", left=10, top=10, width=3, height=3, z_order=0)
    _xml(root, out / "annotations.xml")


def _percent(value: float) -> float:
    return value / SIZE * 100


def _ls_region(region_id: str, item: Item) -> list[dict]:
    common = {"id": region_id, "from_name": "label", "to_name": "image", "original_width": SIZE, "original_height": SIZE,
              "image_rotation": 0}
    if item.kind == "bbox":
        (x1, y1), (x2, y2) = item.points
        value = {"x": _percent(x1), "y": _percent(y1), "width": _percent(x2 - x1), "height": _percent(y2 - y1), "rotation": 0,
                 "rectanglelabels": [item.category]}
        results = [{**common, "type": "rectanglelabels", "value": value}]
    else:
        value = {"points": [[_percent(x), _percent(y)] for x, y in item.points], "closed": True, "polygonlabels": [item.category]}
        results = [{**common, "type": "polygonlabels", "value": value}]
    for name, chosen in item.attributes.items():  # per-region controls share the region's id
        results.append({**common, "type": "choices", "from_name": name, "value": {"choices": [chosen]}})
    return results


def write_label_studio(out: Path, scenes) -> None:
    tasks = []
    for n, (stem, image, items) in enumerate(scenes):
        _save(image, out / "images" / f"{stem}.jpg")
        upload = hashlib.sha256(stem.encode()).hexdigest()[:8]  # the prefix Label Studio gives uploaded files
        regions = [r for i, item in enumerate(items) if item.kind != "line" for r in _ls_region(f"{stem}-{i}", item)]
        if n % 6 == 2:
            regions.append({"id": f"{stem}-screw", "type": "keypointlabels", "from_name": "point", "to_name": "image",
                            "original_width": SIZE, "original_height": SIZE, "value": {"x": 5.0, "y": 5.0, "width": 1.0,
                                                                                       "keypointlabels": ["螺丝"]}})
        regions.append({"id": f"{stem}-scene", "type": "choices", "from_name": "场景", "to_name": "image",
                        "value": {"choices": [SCENE_TAG[n % 2]]}})
        final = {"id": 1000 + n, "completed_by": 1, "result": regions, "was_cancelled": False, "ground_truth": False,
                 "created_at": "2026-11-02T09:00:00.000000Z", "updated_at": "2026-11-02T09:30:00.000000Z"}
        annotations = [final]
        if n % 6 == 3 and regions:  # an earlier annotator's draft of the first region
            annotations.insert(0, {**final, "id": 2000 + n, "completed_by": 2, "result": regions[:1],
                                   "created_at": "2026-11-01T09:00:00.000000Z", "updated_at": "2026-11-01T09:05:00.000000Z"})
        if n % 6 == 4 and regions:  # a cancelled (skipped) annotation
            annotations.append({**final, "id": 3000 + n, "completed_by": 3, "result": regions[:1], "was_cancelled": True,
                                "updated_at": "2026-11-03T09:00:00.000000Z"})
        tasks.append({"id": n + 1, "data": {"image": f"/data/upload/1/{upload}-{stem}.jpg"}, "annotations": annotations,
                      "predictions": []})
    (out / "export.json").write_text(json.dumps(tasks, ensure_ascii=False, indent=1), "utf-8")


def write_yolo(out: Path, scenes) -> None:
    names = dict(enumerate(CLASSES))
    ids = {name: i for i, name in names.items()}
    (out / "data.yaml").write_text(yaml.safe_dump({"path": ".", "train": "images/train", "val": "images/train", "names": names},
                                                  allow_unicode=True, sort_keys=False), "utf-8")
    for stem, image, items in scenes:
        _save(image, out / "images" / "train" / f"{stem}.jpg")
        lines = []
        for item in items:
            if item.kind == "bbox":
                (x1, y1), (x2, y2) = item.points
                numbers = [(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1]
            elif item.kind == "poly":
                numbers = [c for point in item.points for c in point]
            else:
                continue
            lines.append(" ".join([str(ids[item.category]), *(f"{v / SIZE:.6f}" for v in numbers)]))
        if lines:  # a scene without objects has no label file: YOLO's background image
            target = out / "labels" / "train" / f"{stem}.txt"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("\n".join(lines) + "\n", "utf-8")


def write_voc(out: Path, scenes) -> None:
    for n, (stem, image, items) in enumerate(scenes):
        _save(image, out / "JPEGImages" / f"{stem}.jpg")
        root = ElementTree.Element("annotation")
        _sub(root, "folder", "VOC2012")
        _sub(root, "filename", f"{stem}.jpg")
        size = _sub(root, "size")
        for tag, value in (("width", SIZE), ("height", SIZE), ("depth", 3)):
            _sub(size, tag, value)
        _sub(root, "segmented", 0)
        for index, item in enumerate(i for i in items if i.kind != "line"):
            xs, ys = [p[0] for p in item.points], [p[1] for p in item.points]
            node = _sub(root, "object")
            _sub(node, "name", item.category)
            _sub(node, "pose", "Unspecified")
            _sub(node, "truncated", 0)
            _sub(node, "difficult", int(n % 5 == 0 and index == 0))
            _sub(node, "occluded", int(item.attributes.get("遮挡") == "是"))
            box = _sub(node, "bndbox")  # VOC corners are 1-based pixel indices
            for tag, value in (("xmin", min(xs) + 1), ("ymin", min(ys) + 1), ("xmax", max(xs)), ("ymax", max(ys))):
                _sub(box, tag, value)
            if n % 6 == 2 and item.category == "BBU":
                part = _sub(node, "part")
                _sub(part, "name", "螺丝")
                part_box = _sub(part, "bndbox")
                for tag, value in (("xmin", min(xs) + 2), ("ymin", min(ys) + 2), ("xmax", min(xs) + 4), ("ymax", min(ys) + 4)):
                    _sub(part_box, tag, value)
        _xml(root, out / "Annotations" / f"{stem}.xml")


WRITERS = {"platform": write_platform_reference, "cvat": write_cvat, "label_studio": write_label_studio, "yolo": write_yolo,
           "voc": write_voc}


def write_formats(out: Path, rng: np.random.Generator, count: int) -> None:
    """`out/<format>/` for every format in FORMATS, all from the same `count` scenes; each built, then renamed."""
    scenes = demo_scenes(rng, count)
    for name, writer in WRITERS.items():
        with atomic_directory(Path(out) / name) as work:
            writer(work, scenes)
