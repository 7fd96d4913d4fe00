"""A team's categories and honest targets: the taxonomy in convert, validate, the prompts and the config check; exports
that would become empty or wrong training targets; the clipping policy of rotated boxes in every format."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from street_export import write_cvat
from visionqc.config_check import ConfigError, check_references
from visionqc.fuse import fuse
from visionqc.validate import validate

from conftest import REPO, convert_into, make_image, read_jsonl, write_lines

TAXONOMY = {"categories": {"Cars": {}, "Two-wheelers": {}, "Pedestrians": {}, "Lane": {}}}


def cvat(folder: Path, images: dict[str, str], size=(100, 80), labels=("Cars", "Lane")) -> Path:
    """annotations.xml with one <image> per name holding the given shape elements, and the images."""
    body = []
    for index, (name, shapes) in enumerate(images.items()):
        make_image(folder / "images" / name, size)
        body.append(f'<image id="{index}" name="{name}" width="{size[0]}" height="{size[1]}">{shapes}</image>')
    meta = "".join(f"<label><name>{label}</name></label>" for label in labels)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "annotations.xml").write_text(f"<annotations><version>1.1</version><meta><job><labels>{meta}</labels></job></meta>"
                                            + "".join(body) + "</annotations>")
    return folder


BOX = '<box label="Cars" xtl="10" ytl="10" xbr="40" ybr="30" occluded="0"/>'
TRIANGLE = '<polygon label="Cars" points="50,50;60,50;55,60" occluded="0"/>'
POINTS = '<points label="Cars" points="5,5" occluded="0"/>'


# --- the taxonomy -----------------------------------------------------------------------------------------------------


def test_a_class_outside_the_taxonomy_is_reported_or_refused(tmp_path):
    counts = write_cvat(tmp_path / "export")
    known = {"categories": {"Cars": {}, "Two-wheelers": {}, "Pedestrians": {}}}  # no Lane
    report = convert_into("cvat", tmp_path / "export", tmp_path / "out", {"taxonomy": known, "val_fraction": 0})
    assert report["issues_by_reason"] == {"unknown_category": counts["Lane"]}
    assert "category 'Lane' is not in taxonomy.categories" in report["issues"][0]["detail"]
    records = read_jsonl(tmp_path / "out" / "train.jsonl")
    assert all(record["metadata"]["partial"] == 1 for record in records)  # each lost its lane: its counts are short
    with pytest.raises(ValueError, match=rf"classes not in taxonomy.categories: Lane \({counts['Lane']} shapes\)"):
        convert_into("cvat", tmp_path / "export", tmp_path / "refused", {"taxonomy": {**known, "unknown": "refuse"}})
    lanes_only = {"categories": {"Lane": {}}, "unknown": "refuse"}  # no record would be left: the refusal still says why
    with pytest.raises(ValueError, match=r"classes not in taxonomy.categories: Cars \(\d+ shapes\), Pedestrians"):
        convert_into("cvat", tmp_path / "export", tmp_path / "lanes", {"taxonomy": lanes_only, "label_map": {"Lane": None}})
    mapped = convert_into("cvat", tmp_path / "export", tmp_path / "mapped", {"taxonomy": known, "label_map": {"Lane": None}})
    assert mapped["issues_by_reason"] == {"unmapped_label": counts["Lane"]}  # left out on purpose: nothing is partial
    assert not any("partial" in r["metadata"] for name in ("train", "val") for r in read_jsonl(tmp_path / "mapped" / f"{name}.jsonl"))


def test_a_label_map_key_that_matches_no_class_is_a_warning_naming_the_closest(tmp_path, capsys):
    write_cvat(tmp_path / "export")
    report = convert_into("cvat", tmp_path / "export", tmp_path / "out", {"label_map": {"Car": "Cars"}})
    (note,) = [note for note in report["notes"] if note["reason"] == "label_map_unmatched"]
    assert "convert.label_map key 'Car' matches no class of this export; did you mean 'Cars'?" in note["detail"]
    assert "did you mean 'Cars'?" in capsys.readouterr().err


def test_validate_rejects_a_category_or_attribute_the_taxonomy_does_not_name(tmp_path):
    make_image(tmp_path / "a.png", (100, 80))
    good = {"images": ["a.png"], "width": 100, "height": 80, "objects": [{"bbox_2d": [1, 1, 9, 9], "desc": "类别=Cars"}]}
    truck = copy.deepcopy(good)
    truck["objects"][0]["desc"] = "类别=Truck"
    attribute = copy.deepcopy(good)
    attribute["objects"][0]["desc"] = "类别=Cars,颜色=红"
    summary = {**good, "summary": '{"统计":[{"类别":"Bus","数量":1}]}'}
    write_lines(tmp_path / "in.jsonl", [good, truck, attribute, summary])
    taxonomy = {"categories": {"Cars": {"attributes": ["遮挡"]}}}
    report = validate(tmp_path / "in.jsonl", tmp_path / "clean.jsonl", tmp_path / "rejects.jsonl", tmp_path / "r.json",
                      {"taxonomy": taxonomy}).report
    assert report["records_out"] == 1 and report["rejected_by_reason"] == {"unknown_category": 3}
    rejects = read_jsonl(tmp_path / "rejects.jsonl")
    assert [r["line"] for r in rejects] == [2, 3, 4]
    assert "'Truck' is not in taxonomy.categories" in rejects[0]["message"]
    assert "attribute '颜色' of category 'Cars'" in rejects[1]["message"] and rejects[2]["field"] == "summary"
    everything = validate(tmp_path / "in.jsonl", tmp_path / "c2.jsonl", tmp_path / "j2.jsonl", tmp_path / "r2.json", {}).report
    assert everything["records_out"] == 4  # no taxonomy: nothing is checked


CONFIG = yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def test_the_config_check_knows_the_taxonomy(tmp_path):
    config = copy.deepcopy(CONFIG)
    config.setdefault("stage_a", {}).setdefault("missions", [])
    config["prompts"]["dense"] = "找出图中的{categories}。"
    config["fusion"]["targets"][0].update(mode="dense", prompt="dense")
    config["convert"]["label_map"] = {"car": "Car"}
    with pytest.raises(ConfigError) as caught:
        check_references(config, lambda path: True, [])
    lines = str(caught.value).splitlines()
    assert any("prompts.dense: it uses {categories} (asked by fusion.targets[0].prompt) but taxonomy.categories is empty" in line
               for line in lines), lines
    config["taxonomy"] = {"categories": {"Cars": {}}}
    with pytest.raises(ConfigError, match=r"convert.label_map.car: 'Car' is not in taxonomy.categories; did you mean Cars\?"):
        check_references(config, lambda path: True, [])


# --- no silent emptiness ---------------------------------------------------------------------------------------------


def test_a_wrong_format_names_what_the_folder_holds(tmp_path):
    write_cvat(tmp_path / "export")
    for fmt in ("labelme", "voc", "platform"):
        with pytest.raises(ValueError, match=rf"format {fmt} converted no record.*holds annotations.xml, images/ \(8 files\): "
                                             r"format cvat\?"):
            convert_into(fmt, tmp_path / "export", tmp_path / fmt)
        assert not (tmp_path / fmt / "report.json").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"format labelme converted no record.*holds nothing: it is empty"):
        convert_into("labelme", tmp_path / "empty", tmp_path / "none")


# --- honest targets --------------------------------------------------------------------------------------------------


def test_an_image_whose_shapes_were_all_reported_is_no_record(tmp_path):
    export = cvat(tmp_path / "export", {"a.png": TRIANGLE + POINTS, "b.png": BOX, "c.png": ""})
    report = convert_into("cvat", export, tmp_path / "out", {"val_fraction": 0})
    reasons = {(issue["ref"].split()[-1] if issue["reason"] != "all_shapes_reported" else issue["ref"]): issue
               for issue in report["issues"]}
    assert report["issues_by_reason"] == {"poly_too_few_points": 1, "unsupported_points": 1, "all_shapes_reported": 1}
    assert "poly with 3 distinct points; the contract needs ≥4" in reasons["polygon[0]"]["detail"]
    records = {record["images"][0]: record for record in read_jsonl(tmp_path / "out" / "train.jsonl")}
    assert set(records) == {"images/b.png", "images/c.png"}  # a.png is not 无关图片
    assert records["images/c.png"]["summary"] == "无关图片"  # an image with no shape at all is
    assert report["shapes"] == {"in": 3, "converted": 1, "reported": 2}


def test_summary_fusion_leaves_out_partial_records_unless_told(tmp_path):
    export = cvat(tmp_path / "export", {"a.png": BOX + POINTS, "b.png": BOX})
    convert_into("cvat", export, tmp_path / "out", {"val_fraction": 0})
    records = {r["images"][0]: r for r in read_jsonl(tmp_path / "out" / "train.jsonl")}
    assert records["images/a.png"]["metadata"]["partial"] == 1 and "partial" not in records["images/b.png"]["metadata"]
    inputs = {"street": tmp_path / "out" / "train.jsonl"}
    for mode, policy, kept in (("summary", "drop", 1), ("summary", "keep", 2), ("dense", "drop", 2)):
        spec = {"targets": [{"dataset": "street", "mode": mode}], "partial_records": policy}
        out = tmp_path / f"fused-{mode}-{policy}.jsonl"
        report = fuse(spec, inputs, out, tmp_path / "report.json").report
        assert len(read_jsonl(out)) == kept and report["datasets"][0]["partial_left_out"] == 2 - kept, (mode, policy)


# --- smaller fixes ---------------------------------------------------------------------------------------------------


def test_an_extensionless_label_studio_image_converts_under_resize(tmp_path):
    make_image(tmp_path / "export" / "images" / "image1.png", (200, 100))
    (tmp_path / "export" / "images" / "image1.png").rename(tmp_path / "export" / "images" / "image1")  # as the SDK names it
    task = {"id": 1, "data": {"image": "/data/upload/1/image1"}, "annotations": [{"id": 5, "result": [
        {"id": "r1", "type": "rectanglelabels", "original_width": 200, "original_height": 100,
         "value": {"x": 10, "y": 10, "width": 20, "height": 30, "rotation": 0, "rectanglelabels": ["Cars"]}}]}]}
    (tmp_path / "export" / "export.json").write_text(json.dumps([task]))
    report = convert_into("label_studio", tmp_path / "export", tmp_path / "out",
                          {"resize": True, "max_pixels": 64 * 32, "min_pixels": 32 * 32, "val_fraction": 0})
    assert report["issues"] == [] and report["resized"] == 1
    (record,) = read_jsonl(tmp_path / "out" / "train.jsonl")
    from PIL import Image

    with Image.open(tmp_path / "out" / record["images"][0]) as image:
        assert image.format == "PNG" and image.size == (record["width"], record["height"])


def _rotated_exports(tmp_path: Path, overshoot: float) -> dict[str, Path]:
    """Per format, a 100x80 image holding one box turned 90° whose right edge lies `overshoot` px past the image."""
    exports = {}
    # CVAT turns about the centre: a 60x20 box centred at (cx, 40), turned 90°, spans x cx-10..cx+10 and y 10..70
    cx = 90 + overshoot
    exports["cvat"] = cvat(tmp_path / "cvat", {"a.png": f'<box label="Cars" xtl="{cx - 30}" ytl="30" xbr="{cx + 30}" ybr="50" '
                                                         'rotation="90" occluded="0"/>'})
    # Label Studio turns about the top-left corner (x, y): a 60x20 box turned 270° spans x x..x+20 and y y-60..y
    ls = tmp_path / "label_studio"
    make_image(ls / "images" / "a.png", (100, 80))
    region = {"id": "r", "type": "rectanglelabels", "original_width": 100, "original_height": 80,
              "value": {"x": 80 + overshoot, "y": 87.5, "width": 60, "height": 25, "rotation": 270, "rectanglelabels": ["Cars"]}}
    (ls / "export.json").write_text(json.dumps([{"id": 1, "data": {"image": "a.png"}, "annotations": [{"id": 1, "result": [region]}]}]))
    exports["label_studio"] = ls
    # YOLO writes an oriented box as its four corners, normalised
    yolo = tmp_path / "yolo"
    make_image(yolo / "images" / "a.png", (100, 80))
    (yolo / "labels").mkdir(parents=True)
    (yolo / "data.yaml").write_text("names: [Cars]\n")
    right = (100 + overshoot) / 100
    (yolo / "labels" / "a.txt").write_text(f"0 0.8 0.125 {right:.6f} 0.125 {right:.6f} 0.875 0.8 0.875\n")
    exports["yolo"] = yolo
    return exports


@pytest.mark.parametrize("fmt", ["cvat", "label_studio", "yolo"])
def test_one_clipping_policy_for_rotated_boxes_in_every_format(tmp_path, fmt):
    for overshoot in (0.1, 1.5):  # within 2% of the side past the edge: kept, its corners clipped to the edge
        near = _rotated_exports(tmp_path / f"near{overshoot}", overshoot)[fmt]
        report = convert_into(fmt, near, tmp_path / f"near{overshoot}-out", {"val_fraction": 0})
        assert report["issues"] == [] and report["clipped_coordinates"] >= (overshoot > 0.5), report
        (record,) = read_jsonl(tmp_path / f"near{overshoot}-out" / "train.jsonl")
        assert max(record["objects"][0]["poly"][0::2]) == 100
    far = _rotated_exports(tmp_path / "far", 5.0)[fmt]  # 5% of the side past it: reported, in every format
    with pytest.raises(ValueError, match="out_of_range"):  # its only shape: the export converts nothing
        convert_into(fmt, far, tmp_path / "far-out", {"val_fraction": 0})
