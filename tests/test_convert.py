import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visionqc import contract
from visionqc.validate import validate

from conftest import REFERENCE, convert_into, make_image, read_jsonl


def all_records(out: Path) -> list[dict]:
    return read_jsonl(out / "train.jsonl") + read_jsonl(out / "val.jsonl")


def assert_validates(out: Path, tmp_path: Path):
    for split in ("train", "val"):
        if not (out / f"{split}.jsonl").read_text().strip():
            continue  # an empty split is an empty_file reject, covered in test_validate
        report = validate(out / f"{split}.jsonl", tmp_path / f"{split}.clean.jsonl", tmp_path / f"{split}.rej.jsonl", tmp_path / f"{split}.rep.json").report
        assert report["rejected"] == 0, (tmp_path / f"{split}.rej.jsonl").read_text()


def feature(geometry_type, coordinates, label="BBU", **content):
    return {
        "type": "Feature",
        "geometry": {"type": geometry_type, "coordinates": coordinates},
        "properties": {"objectId": "o", "content": {"label": label, **content}, "quality": {"qualityStatus": "passed"}},
    }


def write_platform(folder: Path, stem: str, features, size=(100, 60), **image_kwargs):
    make_image(folder / f"{stem}.jpg", size=image_kwargs.pop("stored_size", size), **image_kwargs)
    export = {"info": {"width": size[0], "height": size[1], "depth": 3}, "markResult": {"type": "FeatureCollection", "features": features}}
    (folder / f"{stem}.json").write_text(json.dumps(export, ensure_ascii=False), "utf-8")


def test_labelme_reference_files_convert(tmp_path):
    out = tmp_path / "out"
    report = convert_into("labelme", REFERENCE / "labelme-instance-seg", out, {"val_fraction": 0.34})
    records = all_records(out)
    assert report["images_in"] == 3 and len(records) == 3
    # 16 labelled polygons; the sofa drawn in four parts and a person in two (shared group_id) count once each
    assert report["objects"] == {"poly": 12} and report["multipart_instances"] == 2
    assert report["issues_by_reason"] == {"ignored_label": 2}
    shapes = sum(len(json.loads(p.read_text())["shapes"]) for p in (REFERENCE / "labelme-instance-seg").glob("*.json"))
    assert report["shapes"] == {"in": shapes, "converted": 16, "reported": 2}
    for record in records:
        assert (out / record["images"][0]).exists()
        assert all(obj["desc"].startswith("类别=") for obj in record["objects"])
    assert len(list((out / "overlays").glob("*.png"))) == 3
    assert_validates(out, tmp_path)


def test_platform_geometries_desc_and_reported_shapes(tmp_path):
    src = tmp_path / "export"
    ring = [[10, 10], [40, 10], [40, 30], [10, 30], [10, 10]]
    features = [
        feature("ExtentPolygon", [ring], label="BBU/华为", 厂商="华为", 型号=["5900", "A"]),
        feature("Polygon", [[[50, 5], [70, 5], [70, 20], [50, 20], [50, 5]]], label="标签"),
        feature("Square", [ring], label="标签"),
        feature("TiltRectangle", [[[20, 40], [30, 35], [40, 45], [30, 50], [20, 40]]], label="标签"),
        feature("Trapezium", [[[60, 40], [90, 40], [95, 55], [55, 55], [60, 40]]], label="标签"),
        feature("LineString", [[0, 59], [99, 0]], label="线缆"),
        feature("Point", [5, 5], label="螺丝"),
        feature("Circle", [[5, 5], [9, 5]], label="螺丝"),
        feature("Ellipse", [[5, 5], [9, 5]], label="螺丝"),
    ]
    rejected = feature("Polygon", [ring], label="标签")
    rejected["properties"]["quality"]["qualityStatus"] = "failed"
    write_platform(src, "site", features + [rejected])
    report = convert_into("platform", src, tmp_path / "out", {"val_fraction": 0})
    (record,) = all_records(tmp_path / "out")
    kinds = [contract.geometry_key(obj) for obj in record["objects"]]
    assert kinds == ["bbox_2d", "poly", "poly", "poly", "poly", "line"]
    assert record["objects"][0] == {"bbox_2d": [10, 10, 40, 30], "desc": "类别=BBU/华为,厂商=华为,型号=5900|A"}
    assert record["objects"][1]["poly"] == [50, 5, 70, 5, 70, 20, 50, 20] and record["objects"][1]["poly_points"] == 4
    assert report["issues_by_reason"] == {"unsupported_geometry": 3, "quality_rejected": 1}
    assert json.loads(record["summary"]) == {"统计": [{"类别": "BBU/华为", "数量": 1}, {"类别": "标签", "数量": 4}, {"类别": "线缆", "数量": 1}]}
    assert_validates(tmp_path / "out", tmp_path)


@pytest.mark.parametrize("orient", [3, 6, 8])
def test_exif_orientation_is_baked_into_image_and_coordinates(tmp_path, orient):
    """A marked box drawn upright; the file is stored rotated with an EXIF tag."""
    upright = np.full((60, 100, 3), 200, dtype=np.uint8)
    upright[10:30, 20:50] = (255, 0, 0)
    image = Image.fromarray(upright)
    stored = {3: image.transpose(Image.Transpose.ROTATE_180), 6: image.transpose(Image.Transpose.ROTATE_90),
              8: image.transpose(Image.Transpose.ROTATE_270)}[orient]
    src = tmp_path / "export"
    src.mkdir()
    exif = Image.Exif()
    exif[0x0112] = orient
    stored.save(src / "a.png", exif=exif)
    frames = [("upright", (100, 60), [[20, 10], [50, 10], [50, 30], [20, 30]])]
    if orient in (6, 8):  # only a transposed size tells the stored frame apart from the upright one
        frames.append(("stored", stored.size, None))
    for frame, declared, box in frames:
        if box is None:  # the same box expressed in the stored frame
            from visionqc.images import orientation_mapper

            inverse = {3: 3, 6: 8, 8: 6}[orient]
            to_stored = orientation_mapper(inverse, (100, 60))
            box = [list(to_stored(x, y)) for x, y in [[20, 10], [50, 10], [50, 30], [20, 30]]]
        export = {"info": {"width": declared[0], "height": declared[1]}, "markResult": {"features": [feature("ExtentPolygon", [box + [box[0]]])]}}
        (src / "a.json").write_text(json.dumps(export))
        out = tmp_path / f"out-{frame}"
        report = convert_into("platform", src, out, {"val_fraction": 0})
        (record,) = all_records(out)
        assert (record["width"], record["height"]) == (100, 60), frame
        assert record["objects"][0]["bbox_2d"] == [20, 10, 50, 30], frame
        with Image.open(out / record["images"][0]) as written:
            assert written.size == (100, 60) and written.getexif().get(0x0112, 1) == 1
            assert written.convert("RGB").getpixel((35, 20))[0] > 200
        assert report["exif_rotated"] == 1
        assert_validates(out, tmp_path)


def test_size_mismatch_is_reported_not_converted(tmp_path):
    src = tmp_path / "export"
    write_platform(src, "a", [feature("LineString", [[0, 0], [5, 5]])], size=(100, 60), stored_size=(80, 60))
    write_platform(src, "b", [feature("LineString", [[0, 0], [5, 5]])], size=(100, 60))
    report = convert_into("platform", src, tmp_path / "out", {})
    assert report["records_out"] == 1 and report["issues_by_reason"] == {"size_mismatch": 1}


def test_resize_to_pixel_budget_scales_coordinates(tmp_path):
    src = tmp_path / "export"
    write_platform(src, "big", [feature("ExtentPolygon", [[[100, 100], [500, 100], [500, 300], [100, 300], [100, 100]]])], size=(1000, 700))
    report = convert_into("platform", src, tmp_path / "out", {"resize": True, "max_pixels": 256 * 256, "val_fraction": 0})
    (record,) = all_records(tmp_path / "out")
    w, h = record["width"], record["height"]
    assert w % 32 == 0 and h % 32 == 0 and w * h <= 256 * 256
    assert record["objects"][0]["bbox_2d"] == [round(100 * w / 1000), round(100 * h / 700), round(500 * w / 1000), round(300 * h / 700)]
    with Image.open(tmp_path / "out" / record["images"][0]) as written:
        assert written.size == (w, h)
    assert report["resized"] == 1


def test_coco_policies(tmp_path):
    make_image(tmp_path / "imgs" / "a.png", size=(100, 80))
    doc = {
        "images": [{"id": 1, "file_name": "a.png", "width": 100, "height": 80}],
        "categories": [{"id": 1, "name": "BBU"}, {"id": 2, "name": "标签"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 20, 30, 15], "segmentation": [], "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [0, 0, 1, 1], "iscrowd": 0,
             "segmentation": [[50, 10, 60, 10, 60, 20], [50, 30, 90, 30, 90, 70, 50, 70]]},
            {"id": 3, "image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "segmentation": {"counts": "x", "size": [80, 100]}, "iscrowd": 1},
            {"id": 4, "image_id": 1, "category_id": 1, "bbox": [60, 50, 10, 10], "segmentation": {"counts": "x", "size": [80, 100]}, "iscrowd": 0},
        ],
    }
    (tmp_path / "instances.json").write_text(json.dumps(doc, ensure_ascii=False))
    report = convert_into("coco", tmp_path / "instances.json", tmp_path / "out", {"val_fraction": 0, "coco": {"images": str(tmp_path / "imgs")}})
    (record,) = all_records(tmp_path / "out")
    assert record["objects"][0] == {"bbox_2d": [10, 20, 40, 35], "desc": "类别=BBU"}
    # two polygons are one instance; the default multipart policy keeps their convex hull
    assert record["objects"][1]["poly"] == [50, 10, 60, 10, 90, 30, 90, 70, 50, 70]
    assert record["objects"][2]["bbox_2d"] == [60, 50, 70, 60]
    assert report["issues_by_reason"] == {"crowd_region": 1}
    assert report["notes_by_reason"] == {"rle_as_bbox": 1}
    assert report["shapes"] == {"in": 4, "converted": 3, "reported": 1}


def test_demo_exports_convert_in_every_format(demo_exports, tmp_path):
    for fmt, source in (("platform", demo_exports / "platform"), ("labelme", demo_exports / "labelme"), ("coco", demo_exports / "coco" / "instances.json")):
        out = tmp_path / fmt
        report = convert_into(fmt, source, out, {"val_fraction": 0.25, "coco": {"images": str(demo_exports / "coco" / "images")}})
        assert report["records_out"] == report["images_in"] > 0
        assert report["records"]["val"] >= 1
        assert_validates(out, tmp_path / f"v-{fmt}")


def test_split_is_seeded_and_independent_of_order():
    from visionqc.convert.common import split_keys

    keys = [f"img{i}.jpg" for i in range(50)]
    val = split_keys(keys, 0.2, seed=3)
    assert len(val) == 10
    assert split_keys(list(reversed(keys)), 0.2, seed=3) == val
    assert split_keys(keys, 0.2, seed=4) != val


def test_convert_is_deterministic(demo_exports, tmp_path):
    first = convert_into("platform", demo_exports / "platform", tmp_path / "a", {})
    second = convert_into("platform", demo_exports / "platform", tmp_path / "b", {})
    assert first["records"] == second["records"]
    for name in ("train.jsonl", "val.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_failed_convert_leaves_no_output(tmp_path, monkeypatch):
    src = tmp_path / "export"
    write_platform(src, "a", [feature("LineString", [[0, 0], [5, 5]])])
    def boom(*args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr("visionqc.convert.draw_overlay", boom)
    with pytest.raises(RuntimeError):
        convert_into("platform", src, tmp_path / "out", {})
    assert [p for p in (tmp_path / "out").rglob("*")] == []  # no output, no scratch folder left behind


def test_labelme_circle_point_and_mask_policy(tmp_path):
    make_image(tmp_path / "a.png", size=(100, 80))
    shapes = [
        {"label": "螺丝", "points": [[50, 40], [60, 40]], "shape_type": "circle"},
        {"label": "螺丝", "points": [[5, 5]], "shape_type": "point"},
        {"label": "区域", "points": [[0, 0], [9, 9]], "shape_type": "mask", "mask": "..."},
        {"label": "线缆", "points": [[0, 0], [10, 10], [20, 0]], "shape_type": "linestrip"},
    ]
    doc = {"shapes": shapes, "imagePath": "a.png", "imageWidth": 100, "imageHeight": 80}
    (tmp_path / "a.json").write_text(json.dumps(doc, ensure_ascii=False))
    report = convert_into("labelme", tmp_path, tmp_path / "out", {"val_fraction": 0, "labelme": {"circle_vertices": 12}})
    (record,) = all_records(tmp_path / "out")
    circle, line = record["objects"]
    assert circle["poly_points"] == 12
    xs, ys = circle["poly"][0::2], circle["poly"][1::2]
    assert (min(xs), max(xs), min(ys), max(ys)) == (40, 60, 30, 50)
    assert line == {"line": [0, 0, 10, 10, 20, 0], "line_points": 3, "desc": "类别=线缆"}
    assert report["issues_by_reason"] == {"unsupported_point": 1, "unsupported_mask": 1}


def test_jsonl_records_are_split_and_rebased(tmp_path):
    make_image(tmp_path / "src" / "img" / "a.png", size=(10, 10))
    dense = {"images": ["img/a.png"], "width": 10, "height": 10, "objects": []}
    chat = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    (tmp_path / "src" / "r.jsonl").write_text("\n".join(json.dumps(r) for r in [dense, chat] * 5) + "\n")
    report = convert_into("jsonl", tmp_path / "src" / "r.jsonl", tmp_path / "out", {"val_fraction": 0.2})
    assert report["records"] == {"train": 8, "val": 2}
    records = all_records(tmp_path / "out")
    assert sum("messages" in r for r in records) == 5
    for record in records:
        if "images" in record:
            assert (tmp_path / "out" / record["images"][0]).resolve() == (tmp_path / "src" / "img" / "a.png").resolve()
    (tmp_path / "bad.jsonl").write_text(json.dumps(chat) + "\n{broken\n")
    with pytest.raises(ValueError, match="record 2: not valid JSON"):
        convert_into("jsonl", tmp_path / "bad.jsonl", tmp_path / "out2", {})
    assert [p for p in (tmp_path / "out2").rglob("*")] == []


def test_an_export_is_listed_in_the_order_of_sorted_rglob(tmp_path):
    from visionqc.convert.common import files_under

    root = tmp_path / "export"
    for name in ("a/b.json", "a-c.json", "a.json", "a/z/y.json", "b/a.json", "b/a.png", "A.json", "a b/c.json", "x.json/in.json"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("{}")
    (root / "linked").symlink_to(root / "b")  # a linked folder is not entered, as rglob does not enter it
    listed = list(files_under(root, "*.json"))
    assert listed == sorted(p for p in root.rglob("*.json") if p.is_file())
    assert [p.relative_to(root).as_posix() for p in listed][:5] == ["A.json", "a/b.json", "a/z/y.json", "a b/c.json", "a-c.json"]
    assert "x.json" not in {p.name for p in listed}  # a folder is not a file
