"""Our readers on exports written by the real tools, not by this project: labelme2coco's COCO, Label Studio's
converter importing that COCO, and the same converter exporting the Label Studio tasks to YOLO and VOC
(tests/fixtures/real_tools, made by its generate.py from labelme's own example annotations). Each reading agrees
with the reading of the file the tool was given."""

import json
import shutil
from collections import Counter
from pathlib import Path

from shapely.geometry import Polygon, box
from shapely.ops import unary_union

from visionqc import contract

from conftest import REFERENCE, convert_into, read_jsonl

REAL = Path(__file__).parent / "fixtures" / "real_tools"
PHOTOS = REFERENCE / "labelme-instance-seg"


def regions(out: Path, key: str | None = None) -> dict[str, list[tuple[str, object]]]:
    """Per image stem: (category, region) of every converted object (of one geometry key, when given)."""
    found = {}
    for record in read_jsonl(out / "train.jsonl") + read_jsonl(out / "val.jsonl"):
        objects = [(contract.desc_category(obj["desc"]), region(obj)) for obj in record["objects"]
                   if key in (None, contract.geometry_key(obj))]
        found[Path(record["images"][0]).stem] = objects
    return found


def region(obj: dict):
    key = contract.geometry_key(obj)
    flat = obj[key]
    return box(*flat) if key == "bbox_2d" else Polygon(list(zip(flat[::2], flat[1::2], strict=True)))


def iou(a, b) -> float:
    return a.intersection(b).area / a.union(b).area


# Whole pixels on our side, percentages and floats on theirs, and VOC's 1-based corners (which Label Studio's VOC
# writer does not add): every outline within 1.5 px of the other's
PIXELS = 1.5


def unmatched(ours: list, theirs: list, pixels: float = PIXELS) -> tuple[list, list]:
    """One-to-one matching of same-category regions whose outlines lie within `pixels` of each other (Hausdorff),
    nearest first: (ours left, theirs left)."""
    pairs = sorted((a.exterior.hausdorff_distance(b.exterior), i, j)
                   for i, (ca, a) in enumerate(ours) for j, (cb, b) in enumerate(theirs) if ca == cb)
    used_ours, used_theirs = set(), set()
    for distance, i, j in pairs:
        if distance <= pixels and i not in used_ours and j not in used_theirs:
            used_ours.add(i)
            used_theirs.add(j)
    return ([x for i, x in enumerate(ours) if i not in used_ours], [x for j, x in enumerate(theirs) if j not in used_theirs])


def distinct_points(flat: list) -> int:
    return len(set(zip(flat[::2], flat[1::2], strict=True)))


def test_labelme2coco_output_reads_as_the_labelme_it_came_from(tmp_path):
    """labelme2coco writes each shape as an annotation (it ignores group_id) and was told to skip __ignore__. Every
    ungrouped shape that does not cross itself matches; a self-crossing one is repaired by labelme2coco (through sahi),
    which moves its outline. A group's parts are separate annotations: a part of three points is a polygon the contract
    refuses on its own (reported), and inside our hull as a part."""
    convert_into("labelme", PHOTOS, tmp_path / "labelme")
    report = convert_into("coco", REAL / "coco/dataset.json", tmp_path / "coco", {"coco": {"images": str(REFERENCE)}})
    from_labelme, from_coco = regions(tmp_path / "labelme"), regions(tmp_path / "coco")
    assert from_coco.keys() == from_labelme.keys() == {path.stem for path in PHOTOS.glob("*.json")}
    coco = json.loads((REAL / "coco/dataset.json").read_text())
    names = {category["name"]: category["id"] for category in coco["categories"]}
    too_few = Counter(Path(image["file_name"]).stem for image in coco["images"] for a in coco["annotations"]
                      if a["image_id"] == image["id"] and distinct_points(a["segmentation"][0]) < 4)
    assert report["issues_by_reason"] == {"poly_too_few_points": sum(too_few.values())} and sum(too_few.values()) > 0
    for path in PHOTOS.glob("*.json"):
        shapes = [shape for shape in json.loads(path.read_text())["shapes"] if shape["label"] != "__ignore__"]
        assert len(from_coco[path.stem]) == len(shapes) - too_few[path.stem], path.stem  # one annotation per shape
        ours, _ = unmatched(from_labelme[path.stem], from_coco[path.stem])
        groups = Counter(label for label, _ in {(shape["label"], shape["group_id"]) for shape in shapes if shape["group_id"] is not None})
        crossing = Counter(shape["label"] for shape in shapes if shape["group_id"] is None and not Polygon(shape["points"]).is_valid)
        assert Counter(category for category, _ in ours) == groups + crossing, (path.stem, ours)
        image_id = next(image["id"] for image in coco["images"] if Path(image["file_name"]).stem == path.stem)
        for category in [label for label in groups if all(s["group_id"] is not None for s in shapes if s["label"] == label)]:
            (merged,) = [shape for name, shape in ours if name == category]
            rings = [Polygon(list(zip(ring[::2], ring[1::2], strict=True))) for a in coco["annotations"]
                     if a["image_id"] == image_id and a["category_id"] == names[category] for ring in a["segmentation"]]
            assert iou(unary_union(rings).convex_hull, merged) > 0.97, (path.stem, category)  # every part, the reported one too


def test_label_studio_converter_import_reads_as_the_coco_it_came_from(tmp_path):
    """`label-studio-converter import coco` turns each annotation into two regions: a rectangle from its bbox and a
    polygon from the first ring of its segmentation. Both come back; where the annotation has one ring, the polygon is
    our COCO reading of it."""
    convert_into("coco", REAL / "coco/dataset.json", tmp_path / "coco", {"coco": {"images": str(REFERENCE)}})
    convert_into("label_studio", REAL / "label_studio/tasks.json", tmp_path / "ls", {"label_studio": {"images": str(REFERENCE)}})
    from_coco = regions(tmp_path / "coco")
    coco = json.loads((REAL / "coco/dataset.json").read_text())
    names = {category["id"]: category["name"] for category in coco["categories"]}
    stems = {image["id"]: Path(image["file_name"]).stem for image in coco["images"]}
    ls_boxes, ls_polygons = regions(tmp_path / "ls", "bbox_2d"), regions(tmp_path / "ls", "poly")
    for image_id, stem in stems.items():
        annotations = [a for a in coco["annotations"] if a["image_id"] == image_id]
        boxes = [(names[a["category_id"]], box(a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]))
                 for a in annotations]
        first_rings = [(names[a["category_id"]], Polygon(list(zip(ring[::2], ring[1::2], strict=True))))
                       for a in annotations if distinct_points(ring := a["segmentation"][0]) >= 4]
        assert unmatched(boxes, ls_boxes[stem]) == ([], []), stem
        assert unmatched(first_rings, ls_polygons[stem]) == ([], []), stem
        several_rings = sum(len(a["segmentation"]) > 1 for a in annotations)
        assert len(unmatched(from_coco[stem], ls_polygons[stem])[0]) == several_rings, stem  # ours hulls every ring


def test_label_studio_converter_exports_read_as_the_tasks(tmp_path):
    """Label Studio's converter exports the tasks to YOLO (rectangles and polygons) and VOC (its rectangles)."""
    convert_into("label_studio", REAL / "label_studio/tasks.json", tmp_path / "ls", {"label_studio": {"images": str(REFERENCE)}})
    yolo, voc = tmp_path / "yolo", tmp_path / "voc"
    shutil.copytree(REAL / "yolo", yolo)
    shutil.copytree(REAL / "voc", voc)
    for photo in PHOTOS.glob("*.jpg"):
        for folder in (yolo / "images", voc / "JPEGImages"):
            folder.mkdir(exist_ok=True)
            shutil.copy(photo, folder)
    convert_into("yolo", yolo, tmp_path / "from_yolo")
    convert_into("voc", voc, tmp_path / "from_voc")
    from_ls, from_yolo, from_voc = regions(tmp_path / "ls"), regions(tmp_path / "from_yolo"), regions(tmp_path / "from_voc")
    boxes = regions(tmp_path / "ls", "bbox_2d")
    assert from_ls.keys() == from_yolo.keys() == from_voc.keys() and len(from_ls) == 3
    for stem, objects in from_ls.items():
        assert unmatched(objects, from_yolo[stem]) == ([], []), stem
        # its VOC writer floors (up to 1 px) and stays 0-based where VOC counts from 1 (1 px): 2 px a coordinate
        assert unmatched(boxes[stem], from_voc[stem], 2 * 2**0.5) == ([], []), stem
