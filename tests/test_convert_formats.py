"""The exchange formats (CVAT, Label Studio, YOLO, VOC): the same scenes convert to the platform's records up
to what each format can say, every input shape is converted or reported, and malformed files are named."""

import json
import math
import re
from pathlib import Path

import pytest
import yaml
from defusedxml import ElementTree

from visionqc import contract
from visionqc.cli import main

from conftest import convert_into, held_by, make_image, read_jsonl

OPTIONS = {"val_fraction": 0.25, "overlays": 1}


def by_stem(out: Path) -> dict[str, dict]:
    records = read_jsonl(out / "train.jsonl") + read_jsonl(out / "val.jsonl")
    return {Path(record["images"][0]).stem: record for record in records}


def geometry(obj: dict) -> tuple:
    key = contract.geometry_key(obj)
    return key, tuple(obj[key])


def box_of(obj: dict) -> list[int]:
    key = contract.geometry_key(obj)
    return obj["bbox_2d"] if key == "bbox_2d" else contract.bbox_of(list(zip(obj[key][::2], obj[key][1::2], strict=True)))


def counted_shapes(fmt: str, source: Path) -> int:
    """Input shapes counted straight from the files, independently of the readers."""
    if fmt == "cvat":
        return sum(len([n for n in image if n.tag != "tag"]) for image in ElementTree.parse(source / "annotations.xml").getroot().iter("image"))
    if fmt == "label_studio":
        tasks = json.loads((source / "export.json").read_text("utf-8"))
        return sum(1 for task in tasks for a in task["annotations"] for r in a["result"] if r["type"] != "choices")
    if fmt == "yolo":
        return sum(len(path.read_text().split("\n")) - 1 for path in (source / "labels").rglob("*.txt"))
    roots = [ElementTree.parse(path).getroot() for path in (source / "Annotations").glob("*.xml")]
    return sum(len(root.findall("object")) + len(root.findall("object/part")) for root in roots)


# What each format can say, so what is compared with the platform record of the same scene.
COMPARED = {
    "cvat": "every object (geometry and desc with attributes), width, height, summary",
    "label_studio": "objects other than lines (no polyline tool): geometry and desc with attributes (per-region choices)",
    "yolo": "objects other than lines: geometry and category (no attributes)",
    "voc": "objects other than lines: their box (a 标签 polygon is exported as its box) and category",
}


def comparable(fmt: str, objects: list[dict]) -> list[tuple]:
    if fmt == "cvat":
        return sorted((geometry(o), o["desc"]) for o in objects)
    kept = [o for o in objects if "line" not in o]
    if fmt == "label_studio":
        return sorted((geometry(o), o["desc"]) for o in kept)
    if fmt == "yolo":
        return sorted((geometry(o), contract.desc_category(o["desc"])) for o in kept)
    return sorted((tuple(box_of(o)), contract.desc_category(o["desc"])) for o in kept)


@pytest.mark.parametrize("fmt", sorted(COMPARED))
def test_each_format_converts_to_the_platform_records_of_the_same_scenes(demo_exports, tmp_path, fmt):
    formats = demo_exports / "formats"
    convert_into("platform", formats / "platform", tmp_path / "platform", OPTIONS)
    report = convert_into(fmt, formats / fmt, tmp_path / fmt, OPTIONS)
    reference, converted = by_stem(tmp_path / "platform"), by_stem(tmp_path / fmt)
    assert sorted(converted) == sorted(reference) and len(reference) == 24
    for stem, record in converted.items():
        expected = reference[stem]
        assert comparable(fmt, record["objects"]) == comparable(fmt, expected["objects"]), (fmt, stem, COMPARED[fmt])
        assert (record["width"], record["height"]) == (expected["width"], expected["height"])
        if fmt == "cvat":
            assert record["summary"] == expected["summary"]
            assert record["metadata"]["tags"] in (["机房"], ["室外"])
        if fmt == "label_studio":
            assert record["metadata"]["choices"]["场景"] in (["机房"], ["室外"])
    occluded = any("遮挡=是" in o["desc"] for r in converted.values() for o in r["objects"])
    assert occluded == (fmt != "yolo"), "the occluded BBUs keep their flag where the format has one"
    shapes = report["shapes"]
    assert shapes["in"] == counted_shapes(fmt, formats / fmt) > 0
    assert shapes["converted"] + shapes["reported"] == shapes["in"]
    reported = {
        "cvat": {"unsupported_points", "unsupported_ellipse", "unsupported_mask"},
        "label_studio": {"unsupported_keypoint", "other_annotation", "cancelled_annotation"},
        "yolo": set(),
        "voc": {"unsupported_part"},
    }[fmt]
    assert set(report["issues_by_reason"]) == reported
    if fmt == "yolo":
        assert report["notes_by_reason"]["background_image"] >= 1  # scene 1 is empty: no label file


# --- Label Studio ------------------------------------------------------------------------------------


def ls_task(results: list, image="/data/upload/3/0a1b2c3d-a.png", **annotation) -> dict:
    return {"id": 7, "data": {"image": image}, "annotations": [{"id": 70, "result": results, **annotation}]}


def ls_rect(x, y, w, h, label="BBU", rotation=0, rid="r1", size=(100, 50)) -> dict:
    return {"id": rid, "type": "rectanglelabels", "from_name": "label", "to_name": "image", "original_width": size[0],
            "original_height": size[1], "value": {"x": x, "y": y, "width": w, "height": h, "rotation": rotation, "rectanglelabels": [label]}}


def ls_export(folder: Path, tasks: list, size=(100, 50)) -> Path:
    make_image(folder / "images" / "a.png", size=size)
    (folder / "export.json").write_text(json.dumps(tasks, ensure_ascii=False), "utf-8")
    return folder


def test_label_studio_percentages_become_pixels(tmp_path):
    """A 100×50 image's box at x=10% lands at pixel 10; y=20% of 50 px at pixel 10."""
    results = [ls_rect(10, 20, 30, 40), {"id": "p1", "type": "polygonlabels", "original_width": 100, "original_height": 50,
                                         "value": {"points": [[50, 10], [90, 10], [90, 90], [50, 90]], "polygonlabels": ["标签", "铭牌"]}}]
    report = convert_into("label_studio", ls_export(tmp_path / "ls", [ls_task(results)]), tmp_path / "out", {"val_fraction": 0})
    (record,) = read_jsonl(tmp_path / "out" / "train.jsonl")
    assert record["images"] == ["images/a.png"]  # found without the upload prefix 0a1b2c3d-
    box, poly = record["objects"]
    assert box["bbox_2d"] == [10, 10, 40, 30]
    assert sorted(zip(poly["poly"][::2], poly["poly"][1::2])) == [(50, 5), (50, 45), (90, 5), (90, 45)]
    assert poly["desc"] == "类别=标签,其他标签=铭牌"
    assert report["shapes"] == {"in": 2, "converted": 2, "reported": 0}


def test_label_studio_image_urls():
    from visionqc.convert.label_studio import image_candidates

    assert image_candidates("/data/upload/3/0a1b2c3d-site%201.jpg") == ["0a1b2c3d-site 1.jpg", "site 1.jpg"]
    assert image_candidates("/data/local-files/?d=photos/2026/a.jpg") == ["photos/2026/a.jpg", "a.jpg"]
    assert image_candidates("/data/local-files/?d=../../etc/passwd") == ["../../etc/passwd"]
    assert image_candidates("s3://bucket/raw/a.png") == ["a.png"]


def test_label_studio_rotation_turns_about_the_top_left_corner(tmp_path):
    # 20×10 px at (50, 10), turned 90° clockwise about (50, 10): it now hangs down and to the left
    results = [ls_rect(50, 20, 20, 20, rotation=90)]
    convert_into("label_studio", ls_export(tmp_path / "ls", [ls_task(results)]), tmp_path / "out", {"val_fraction": 0})
    (obj,) = read_jsonl(tmp_path / "out" / "train.jsonl")[0]["objects"]
    assert sorted(zip(obj["poly"][::2], obj["poly"][1::2])) == [(40, 10), (40, 30), (50, 10), (50, 30)]


def test_label_studio_annotator_policy_and_controls(tmp_path):
    older = {"id": 1, "result": [ls_rect(0, 0, 10, 10, rid="a")], "updated_at": "2026-01-01T00:00:00Z", "created_at": "2026-01-01T00:00:00Z"}
    newer = {"id": 2, "result": [ls_rect(20, 0, 10, 10, rid="b"), ls_rect(40, 0, 10, 10, rid="c"),
                                 {"id": "b", "type": "choices", "from_name": "厂商", "value": {"choices": ["华为"]}},
                                 {"id": "z", "type": "choices", "from_name": "场景", "value": {"choices": ["机房"]}}],
             "updated_at": "2026-02-01T00:00:00Z", "created_at": "2026-01-05T00:00:00Z"}
    cancelled = {"id": 3, "result": [ls_rect(60, 0, 10, 10, rid="d")], "was_cancelled": True, "updated_at": "2026-03-01T00:00:00Z"}
    task = {"id": 9, "data": {"image": "a.png"}, "annotations": [older, newer, cancelled]}
    export = ls_export(tmp_path / "ls", [task])
    report = convert_into("label_studio", export, tmp_path / "latest", {"val_fraction": 0})
    (record,) = read_jsonl(tmp_path / "latest" / "train.jsonl")
    assert [o["bbox_2d"][0] for o in record["objects"]] == [20, 40]
    assert record["objects"][0]["desc"] == "类别=BBU,厂商=华为" and record["objects"][1]["desc"] == "类别=BBU"
    assert record["metadata"]["choices"] == {"场景": ["机房"]}
    assert sorted((i["reason"], i["ref"]) for i in report["issues"]) == [
        ("cancelled_annotation", "task id=9 annotation id=3 result id=d"), ("other_annotation", "task id=9 annotation id=1 result id=a")]
    assert report["shapes"] == {"in": 4, "converted": 2, "reported": 2}
    # ground truth wins over the latest; `first` takes the earliest created
    older["ground_truth"] = True
    export = ls_export(tmp_path / "gt", [task])
    convert_into("label_studio", export, tmp_path / "gt-out", {"val_fraction": 0})
    assert [o["bbox_2d"][0] for o in read_jsonl(tmp_path / "gt-out" / "train.jsonl")[0]["objects"]] == [0]
    older["ground_truth"] = False
    convert_into("label_studio", export, tmp_path / "first", {"val_fraction": 0, "label_studio": {"annotations": "first"}})
    assert [o["bbox_2d"][0] for o in read_jsonl(tmp_path / "first" / "train.jsonl")[0]["objects"]] == [0]


def test_label_studio_malformed_tasks_are_reported_by_task_and_result(tmp_path):
    tasks = [ls_task([ls_rect(10, 10, 95, 10), ls_rect(-5, 0, 10, 10, rid="r2"), ls_rect(10, 10, 10, 10, rid="ok")]),
             ls_task([ls_rect(10, 10, 10, 10)], image="/data/upload/3/gone.png"),
             {"id": 8, "data": {"image": "a.png"}, "annotations": []},
             "not a task"]
    report = convert_into("label_studio", ls_export(tmp_path / "ls", tasks), tmp_path / "out", {"val_fraction": 0})
    issues = {(i["reason"], i["ref"]): i["detail"] for i in report["issues"]}
    assert "105% is outside 0-100%" in issues[("out_of_range", "task id=7 annotation id=70 result id=r1")]
    assert "-5% is outside 0-100%" in issues[("out_of_range", "task id=7 annotation id=70 result id=r2")]
    missing = [i for i in report["issues"] if i["reason"] == "missing_image"]
    assert len(missing) == 1 and "gone.png" in missing[0]["detail"] and missing[0]["file"] == "export.json"
    assert ("unannotated_task", "task id=8") in issues and ("bad_task", "task #3") in issues
    assert report["records_out"] == 1 and report["shapes"] == {"in": 4, "converted": 1, "reported": 3}


# --- CVAT ----------------------------------------------------------------------------------------------

CVAT = """<?xml version="1.0" encoding="utf-8"?>
<annotations>
  <version>1.1</version>
  <meta><task><labels><label><name>BBU</name></label><label><name>标签</name></label><label><name>螺丝</name></label></labels></task></meta>
  <image id="0" name="a.png" width="100" height="50">
    <polygon label="标签" occluded="0" points="60,10;70,10;70,20;60,20" z_order="2"/>
    <box label="BBU" occluded="1" xtl="10" ytl="10" xbr="30" ybr="20" rotation="90" z_order="0"><attribute name="厂商">中兴</attribute></box>
    <box label="机柜" occluded="0" xtl="1" ytl="1" xbr="5" ybr="5" z_order="0"/>
    <points label="螺丝" occluded="0" points="3,3"/>
    <polyline label="标签" occluded="0" points="1,40;90,40" z_order="1"/>
    <tag label="机房"/>
  </image>
  <image id="1" name="gone.png" width="100" height="50"><box label="BBU" xtl="1" ytl="1" xbr="5" ybr="5"/></image>
  <track id="0" label="BBU"><box frame="0" xtl="1" ytl="1" xbr="5" ybr="5" outside="0"/><box frame="1" xtl="1" ytl="1" xbr="5" ybr="5" outside="1"/></track>
</annotations>
"""


def cvat_export(folder: Path, text: str = CVAT) -> Path:
    make_image(folder / "images" / "a.png", size=(100, 50))
    (folder / "annotations.xml").write_text(text, "utf-8")
    return folder


def test_cvat_shapes_rotation_attributes_and_reports(tmp_path):
    report = convert_into("cvat", cvat_export(tmp_path / "cvat"), tmp_path / "out", {"val_fraction": 0})
    (record,) = read_jsonl(tmp_path / "out" / "train.jsonl")
    bbu, line, label = record["objects"]  # in z_order: 0, 1, 2
    # a 20×10 box centred at (20, 15), turned 90° about its centre, stands 10 wide and 20 high
    assert sorted(zip(bbu["poly"][::2], bbu["poly"][1::2])) == [(15, 5), (15, 25), (25, 5), (25, 25)]
    assert bbu["desc"] == "类别=BBU,厂商=中兴,遮挡=是"
    assert line["line"] == [1, 40, 90, 40] and "poly" in label
    assert record["metadata"]["tags"] == ["机房"]
    reasons = {(i["reason"], i["ref"]) for i in report["issues"]}
    assert ("unknown_label", "image id=0 box[2]") in reasons and ("unsupported_points", "image id=0 points[3]") in reasons
    assert ("missing_image", "gone.png") in reasons and ("unsupported_track", "track id=0") in reasons
    assert report["shapes"] == {"in": 8, "converted": 3, "reported": 5}


def test_truncated_cvat_xml_stops_naming_file_and_line(tmp_path, capsys):
    export = cvat_export(tmp_path / "cvat", CVAT[: CVAT.index("<track")])
    out = tmp_path / "out"
    code = main(["convert", "--format", "cvat", "--source", str(export), "--train", str(out / "train.jsonl"), "--val", str(out / "val.jsonl"),
                 "--report", str(out / "report.json"), "--media", str(out / "images"), "--overlays", str(out / "overlays"),
                 "--tracking-uri", ""])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert re.search(re.escape(str(export / "annotations.xml")) + r":\d+:\d+: not well-formed XML", err), err
    assert not (out / "report.json").exists()


def test_cvat_refuses_entity_expansion(tmp_path):
    bomb = '<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x "xxxxxxxx">]><annotations>&x;</annotations>'
    with pytest.raises(ValueError, match="refused"):
        convert_into("cvat", cvat_export(tmp_path / "cvat", bomb), tmp_path / "out")


def test_the_cvat_reader_holds_one_image_at_a_time(tmp_path):
    """The reader streams the XML: ten times the images hold about the same memory (a whole-file parse held
    every <image>: 36 MB RSS at 20,000 images, 271 MB at 200,000; streamed, flat)."""
    from visionqc.convert.common import CvatOptions
    from visionqc.convert.cvat import read

    def held(images: int) -> float:
        body = "".join(f'<image id="{i}" name="i{i}.png" width="40" height="30"><box label="a" xtl="1" ytl="1" xbr="9" ybr="9">'
                       f'<attribute name="color">blue</attribute></box><polygon label="a" points="1,1;20,1;20,20;1,20"/></image>'
                       for i in range(images))
        export = cvat_export(tmp_path / str(images), f"<annotations><meta><task><labels><label><name>a</name></label></labels>"
                                                     f"</task></meta>{body}</annotations>")
        shapes = []
        memory = held_by(lambda: shapes.extend(len(source.shapes) for source in read(export, CvatOptions())))
        assert sum(shapes) == 2 * images
        return memory

    held(2_000)  # first calls
    small, large = held(2_000), held(20_000)
    per_image = (large - small) / 18_000  # streamed: 6 bytes; the parsed images kept: 1,651 bytes
    assert per_image < 128, (small, large)


# --- YOLO ----------------------------------------------------------------------------------------------


def yolo_export(folder: Path, labels: str, names=("BBU", "标签"), names_file="data.yaml", image_size=(100, 50), orientation=None) -> Path:
    make_image(folder / "images" / "val" / "a.jpg", size=image_size, exif_orientation=orientation)
    (folder / "labels" / "val").mkdir(parents=True, exist_ok=True)
    (folder / "labels" / "val" / "a.txt").write_text(labels, "utf-8")
    if names_file == "data.yaml":
        (folder / "data.yaml").write_text(yaml.safe_dump({"names": dict(enumerate(names))}, allow_unicode=True), "utf-8")
    elif names_file:
        (folder / names_file).write_text("\n".join(names) + "\n", "utf-8")
    return folder


def test_yolo_boxes_polygons_and_line_reports(tmp_path):
    labels = "0 0.5 0.5 0.2 0.4\n\n1 0.1 0.1 0.3 0.1 0.3 0.5 0.1 0.5\n2 0.5 0.5 0.1 0.1\n0 1.2 0.5 0.1 0.1\n0 0.5 0.5 0.1\nx 1 2 3 4\n"
    export = yolo_export(tmp_path / "yolo", labels, names_file="classes.txt")
    (export / "labels" / "val" / "orphan.txt").write_text("0 0.5 0.5 0.1 0.1\n", "utf-8")
    make_image(export / "images" / "val" / "empty.jpg", size=(100, 50))
    report = convert_into("yolo", export, tmp_path / "out", {"val_fraction": 0})
    records = {Path(r["images"][0]).name: r for r in read_jsonl(tmp_path / "out" / "train.jsonl")}
    box, poly = records["a.jpg"]["objects"]
    assert box == {"bbox_2d": [40, 15, 60, 35], "desc": "类别=BBU"}
    assert sorted(zip(poly["poly"][::2], poly["poly"][1::2])) == [(10, 5), (10, 25), (30, 5), (30, 25)]
    assert records["empty.jpg"]["objects"] == []
    issues = {(i["file"], i["ref"], i["reason"]) for i in report["issues"]}
    assert issues == {("labels/val/a.txt", "line 4", "unknown_class"), ("labels/val/a.txt", "line 5", "out_of_range"),
                      ("labels/val/a.txt", "line 6", "bad_line"), ("labels/val/a.txt", "line 7", "bad_line"),
                      ("labels/val/orphan.txt", "labels/val/orphan.txt", "missing_image")}
    assert report["notes_by_reason"] == {"background_image": 1}
    assert report["shapes"] == {"in": 7, "converted": 2, "reported": 5}


def test_yolo_coordinates_are_of_the_upright_image(tmp_path):
    """Stored 100×50 with EXIF orientation 6: shown 50×100, which the normalised coordinates refer to."""
    export = yolo_export(tmp_path / "yolo", "0 0.5 0.25 0.2 0.1\n", names_file="obj.names", orientation=6)
    convert_into("yolo", export, tmp_path / "out", {"val_fraction": 0})
    (record,) = read_jsonl(tmp_path / "out" / "train.jsonl")
    assert (record["width"], record["height"]) == (50, 100)
    assert record["objects"][0]["bbox_2d"] == [20, 20, 30, 30]


def test_yolo_names_from_the_config_and_a_clear_error_without_names(tmp_path):
    export = yolo_export(tmp_path / "yolo", "1 0.5 0.5 0.2 0.4\n", names_file=None)
    with pytest.raises(ValueError, match=r"no class names .* convert\.yolo\.names"):
        convert_into("yolo", export, tmp_path / "out")
    convert_into("yolo", export, tmp_path / "out", {"val_fraction": 0, "yolo": {"names": ["sticker", "bbu"]},
                                                   "label_map": {"bbu": "BBU", "sticker": None}})
    assert read_jsonl(tmp_path / "out" / "train.jsonl")[0]["objects"][0]["desc"] == "类别=BBU"


# --- label_map, every format -----------------------------------------------------------------------------


def test_label_map_renames_and_reports(demo_exports, tmp_path):
    label_map = {"BBU": "设备", "线缆": None}
    report = convert_into("cvat", demo_exports / "formats" / "cvat", tmp_path / "out", {"val_fraction": 0, "label_map": label_map})
    categories = report["categories"]
    assert "设备" in categories and "BBU" not in categories and "线缆" not in categories
    assert report["issues_by_reason"]["unmapped_label"] == report["shapes"]["in"] - report["shapes"]["converted"] - 12
    with pytest.raises(ValueError, match=r"label_map\.BBU must be a category name or null"):
        convert_into("voc", demo_exports / "formats" / "voc", tmp_path / "bad", {"label_map": {"BBU": ""}})


def test_the_cli_offers_every_format():
    from visionqc.convert import FORMATS
    from visionqc.stages import BY_NAME

    assert BY_NAME["convert"].flags()["format"]["choices"] == list(FORMATS)


def test_demo_exports_validate_in_every_exchange_format(demo_exports, tmp_path):
    from visionqc.validate import validate

    for fmt in COMPARED:
        out = tmp_path / fmt
        convert_into(fmt, demo_exports / "formats" / fmt, out, OPTIONS)
        for split in ("train", "val"):
            report = validate(out / f"{split}.jsonl", out / f"{split}.clean.jsonl", out / f"{split}.rejects.jsonl",
                              out / f"{split}.report.json", {}).report
            assert report["rejected"] == 0, (fmt, split, report)
        assert math.isclose(len(read_jsonl(out / "train.jsonl")) + len(read_jsonl(out / "val.jsonl")), 24)


def test_an_image_name_that_climbs_out_of_the_export_is_reported(tmp_path):
    text = CVAT.replace('name="gone.png"', 'name="../elsewhere/outside.png"')
    make_image(tmp_path / "cvat" / "elsewhere" / "outside.png", size=(100, 50))
    report = convert_into("cvat", cvat_export(tmp_path / "cvat", text), tmp_path / "out", {"val_fraction": 0})
    (unsafe,) = [i for i in report["issues"] if i["reason"] == "unsafe_image_path"]
    assert unsafe["ref"] == "../elsewhere/outside.png"
    assert sorted(tmp_path.rglob("outside.png")) == [tmp_path / "cvat" / "elsewhere" / "outside.png"]  # no copy beside images/
