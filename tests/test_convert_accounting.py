"""Nothing lost in convert: every input shape is converted or reported, one multi-part policy for every
format, the LabelMe image fallbacks, and no traceback on any broken input."""

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visionqc import contract
from visionqc.cli import main
from visionqc.demo.scenes import labelme_as_coco, split_label, write_labelme

from conftest import REFERENCE, convert_into, make_image, read_jsonl


def records_by_image(out: Path) -> dict[str, dict]:
    records = read_jsonl(out / "train.jsonl") + read_jsonl(out / "val.jsonl")
    return {record["images"][0]: {k: v for k, v in record.items() if k != "metadata"} for record in records}


def raw_shapes(fmt: str, source: Path) -> int:
    """Input shapes counted straight from the files, independently of the readers."""
    if fmt == "coco":
        return len(json.loads(source.read_text())["annotations"])
    total = 0
    for path in source.rglob("*.json"):
        try:
            doc = json.loads(path.read_text())
        except ValueError:
            continue  # unreadable: its shapes cannot be counted, the file itself is reported
        total += len(doc["shapes"]) if fmt == "labelme" else len(doc["markResult"]["features"])
    return total


def test_every_demo_export_accounts_for_every_shape(demo_exports, tmp_path):
    sources = {"platform": (demo_exports / "platform", {}),
               "labelme": (demo_exports / "labelme", {}),
               "coco": (demo_exports / "coco" / "instances.json", {"coco": {"images": str(demo_exports / "coco" / "images")}}),
               "labelme_coco": (demo_exports / "labelme_coco.json", {"coco": {"images": str(demo_exports / "labelme")}})}
    seen_reasons = set()
    for name, (source, options) in sources.items():
        fmt = "coco" if name.endswith("coco") else name
        report = convert_into(fmt, source, tmp_path / name, {"val_fraction": 0.25, **options})
        shapes = report["shapes"]
        assert shapes["in"] == raw_shapes(fmt, source) > 0, name
        assert shapes["converted"] + shapes["reported"] == shapes["in"], name
        assert shapes["reported"] == sum(1 for issue in report["issues"] if issue["ref"] and issue["reason"] != "all_shapes_reported"), name
        seen_reasons |= set(report["issues_by_reason"])
    # the demo's broken cases are among them: a truncated LabelMe file, an object whose image is gone, a point
    assert {"unreadable_export", "unknown_image", "unsupported_point", "unsupported_geometry"} <= seen_reasons
    labelme = records_by_image(tmp_path / "labelme")
    assert "images/panel0003.png" in labelme  # its only copy of the image is the embedded imageData
    assert (tmp_path / "labelme" / "images" / "panel0003.png").is_file()


def test_a_converter_that_loses_a_shape_raises_naming_the_file(tmp_path, monkeypatch):
    import visionqc.convert.labelme as labelme

    make_image(tmp_path / "src" / "a.png", size=(40, 40))
    doc = {"shapes": [{"label": "BBU", "points": [[1, 1], [9, 9]], "shape_type": "rectangle"}] * 2, "imagePath": "a.png"}
    (tmp_path / "src" / "a.json").write_text(json.dumps(doc))
    real_read = labelme.read

    def losing_read(root, options):
        for item in real_read(root, options):
            item.shapes.pop()
            yield item

    monkeypatch.setattr("visionqc.convert.READERS", {"labelme": losing_read})
    with pytest.raises(RuntimeError, match=r"a\.json: 2 input shapes but 1 converted \+ 0 reported"):
        convert_into("labelme", tmp_path / "src", tmp_path / "out", {})
    assert not (tmp_path / "out" / "report.json").exists()


def write_grouped_labelme(folder: Path) -> None:
    """One image: a 标签 in two parts (group_id 7), a box, and a cable in two pieces (group_id 3)."""
    make_image(folder / "a.png", size=(100, 80))
    _outline, (left, right) = split_label(40, 20)
    shapes = [
        {"label": "标签", "points": left, "group_id": 7, "shape_type": "polygon"},
        {"label": "BBU", "points": [[2, 2], [20, 30]], "group_id": None, "shape_type": "rectangle"},
        {"label": "标签", "points": right, "group_id": 7, "shape_type": "polygon"},
        {"label": "线缆", "points": [[0, 70], [30, 60]], "group_id": 3, "shape_type": "line"},
        {"label": "线缆", "points": [[40, 55], [90, 40]], "group_id": 3, "shape_type": "line"},
    ]
    (folder / "a.json").write_text(json.dumps({"shapes": shapes, "imagePath": "a.png", "imageWidth": 100, "imageHeight": 80},
                                              ensure_ascii=False))


@pytest.mark.parametrize("policy", ["hull", "largest", "union_bbox"])
def test_multipart_instances_count_once_under_every_policy(tmp_path, policy):
    write_grouped_labelme(tmp_path / "src")
    report = convert_into("labelme", tmp_path / "src", tmp_path / "out", {"val_fraction": 0, "multipart": policy})
    (record,) = records_by_image(tmp_path / "out").values()
    assert json.loads(record["summary"])["统计"] == [{"类别": "BBU", "数量": 1}, {"类别": "标签", "数量": 1}, {"类别": "线缆", "数量": 1}]
    assert report["shapes"] == {"in": 5, "converted": 5, "reported": 0} and report["multipart_instances"] == 2
    label, box, cable = record["objects"]
    assert box == {"bbox_2d": [2, 2, 20, 30], "desc": "类别=BBU"}
    outline, (left, right) = split_label(40, 20)
    if policy == "hull":
        assert label["poly"] == contract.canonical_polygon([c for p in outline for c in p])
        assert cable["line"] == [0, 70, 30, 60, 40, 55, 90, 40]
        assert report["notes_by_reason"] == {}
    elif policy == "largest":
        assert label["poly"] == contract.canonical_polygon([c for p in left for c in p])  # the parts are equal: the first wins
        assert cable["line"] == [40, 55, 90, 40]  # the longer piece
        notes = {note["ref"]: note["detail"] for note in report["notes"]}
        assert set(notes) == {"shapes[2]", "shapes[3]"}
        assert "50.0% of the instance" in notes["shapes[2]"]
    else:
        xs, ys = [p[0] for p in left + right], [p[1] for p in left + right]
        assert label == {"bbox_2d": [min(xs), min(ys), max(xs), max(ys)], "desc": "类别=标签"}
        assert cable["bbox_2d"] == [0, 40, 90, 70]


@pytest.mark.parametrize("policy", ["hull", "largest", "union_bbox"])
def test_labelme_and_its_coco_export_convert_to_identical_records(demo_exports, tmp_path, policy):
    """The same annotations as LabelMe files and as the COCO file labelme's converter writes for them."""
    cases = {"demo": (demo_exports / "labelme", demo_exports / "labelme_coco.json")}
    # the default demo's 60 LabelMe scenes, written as rule generate_demo_data writes them
    stems = write_labelme(tmp_path / "labelme60", np.random.default_rng([17, 1]), 60)
    labelme_as_coco(tmp_path / "labelme60", tmp_path / "labelme60_coco.json", stems)
    assert len(stems) == 12
    cases["demo60"] = (tmp_path / "labelme60", tmp_path / "labelme60_coco.json")
    reference = REFERENCE / "labelme-instance-seg"
    labelme_as_coco(reference, tmp_path / "reference_coco.json")
    cases["reference"] = (reference, tmp_path / "reference_coco.json")
    for name, (folder, coco_file) in cases.items():
        options = {"val_fraction": 0, "multipart": policy}
        convert_into("labelme", folder, tmp_path / f"{name}-labelme", options)
        coco_report = convert_into("coco", coco_file, tmp_path / f"{name}-coco", {**options, "coco": {"images": str(folder)}})
        from_labelme, from_coco = records_by_image(tmp_path / f"{name}-labelme"), records_by_image(tmp_path / f"{name}-coco")
        assert from_coco and coco_report["multipart_instances"] >= 2, name
        for image, record in from_coco.items():
            assert from_labelme[image] == record, (name, image)


def test_a_part_with_a_non_finite_point_reports_its_whole_instance(tmp_path):
    make_image(tmp_path / "src" / "a.png", size=(40, 40))
    shapes = [{"label": "标签", "points": [[1, 1], [9, 1], [9, 9], [1, 9]], "group_id": 2, "shape_type": "polygon"},
              {"label": "标签", "points": [[20, 20], ["nan", 30], [30, 30]], "group_id": 2, "shape_type": "polygon"}]
    (tmp_path / "src" / "a.json").write_text(json.dumps({"shapes": shapes, "imagePath": "a.png"}, ensure_ascii=False))
    make_image(tmp_path / "src" / "b.png", size=(40, 40))
    (tmp_path / "src" / "b.json").write_text(json.dumps({"shapes": shapes[:1], "imagePath": "b.png"}, ensure_ascii=False))
    report = convert_into("labelme", tmp_path / "src", tmp_path / "out", {"val_fraction": 0})
    # a.png lost its only instance: no record that would say it shows nothing
    assert report["issues_by_reason"] == {"non_finite": 1, "all_shapes_reported": 1}
    assert report["shapes"] == {"in": 3, "converted": 1, "reported": 2}
    assert list(records_by_image(tmp_path / "out")) == ["images/b.png"]


def test_platform_multipolygon_is_one_instance(tmp_path):
    src = tmp_path / "export"
    make_image(src / "s.jpg", size=(100, 60))
    outline, parts = split_label(10, 10)
    feature = {"type": "Feature", "geometry": {"type": "MultiPolygon", "coordinates": [[[list(p) for p in part]] for part in parts]},
               "properties": {"objectId": "x", "content": {"label": "标签"}, "quality": {"qualityStatus": "passed"}}}
    (src / "s.json").write_text(json.dumps({"info": {"width": 100, "height": 60}, "markResult": {"features": [feature]}}))
    report = convert_into("platform", src, tmp_path / "out", {"val_fraction": 0})
    (record,) = records_by_image(tmp_path / "out").values()
    assert record["objects"] == [{"poly": contract.canonical_polygon([c for p in outline for c in p]), "poly_points": 4, "desc": "类别=标签"}]
    assert report["shapes"] == {"in": 1, "converted": 1, "reported": 0}


def png_bytes(size=(30, 20)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), 90, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_labelme_image_fallbacks(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    box = [{"label": "BBU", "points": [[2, 2], [12, 12]], "shape_type": "rectangle"}]
    embedded = base64.b64encode(png_bytes()).decode()
    docs = {
        "embedded": {"shapes": box, "imagePath": "", "imageData": embedded},  # the only copy of the image
        "declared_missing": {"shapes": box, "imagePath": "gone/x.png", "imageData": embedded},
        "beside": {"shapes": box, "imagePath": ""},
        "nothing": {"shapes": box * 2, "imagePath": "nowhere.png", "imageData": None},
        "bad_data": {"shapes": box, "imageData": "not base64!"},
    }
    make_image(src / "beside.jpg", size=(30, 20))
    for stem, doc in docs.items():
        (src / f"{stem}.json").write_text(json.dumps(doc))
    (src / "truncated.json").write_text(json.dumps(docs["nothing"])[:40])
    report = convert_into("labelme", src, tmp_path / "out", {"val_fraction": 0})
    records = records_by_image(tmp_path / "out")
    assert set(records) == {"images/embedded.png", "images/x.png", "images/beside.jpg"}
    assert (tmp_path / "out" / "images" / "embedded.png").read_bytes() == png_bytes()
    issues = {issue["file"]: issue for issue in report["issues"]}
    assert set(issues) == {"nothing.json", "bad_data.json", "truncated.json"}
    assert issues["nothing.json"]["reason"] == "missing_image" and "nothing.json" in issues["nothing.json"]["detail"]
    assert "imagePath 'nowhere.png'" in issues["nothing.json"]["detail"]
    assert "imageData does not decode" in issues["bad_data.json"]["detail"]
    assert issues["truncated.json"]["reason"] == "unreadable_export"  # and not also missing_image
    assert report["shapes"] == {"in": 6, "converted": 3, "reported": 3}


# --- no traceback on any input ------------------------------------------------------------------


def _valid(fmt: str, folder: Path) -> bytes:
    """A valid one-image export of `fmt` in `folder` (its image written there); returns the annotation bytes."""
    make_image(folder / "a.png", size=(40, 30))
    if fmt == "labelme":
        doc = {"shapes": [{"label": "标签", "points": [[1, 1], [20, 1], [20, 20], [1, 20]], "shape_type": "polygon", "group_id": 1,
                           "flags": {"occluded": True}, "description": "half"}],
               "imagePath": "a.png", "imageWidth": 40, "imageHeight": 30}
    elif fmt == "platform":
        doc = {"info": {"width": 40, "height": 30}, "markResult": {"features": [
            {"geometry": {"type": "ExtentPolygon", "coordinates": [[[1, 1], [9, 1], [9, 9], [1, 9], [1, 1]]]},
             "properties": {"content": {"label": "标签"}}}]}}
    elif fmt == "coco":
        doc = {"images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 30}], "categories": [{"id": 1, "name": "标签"}],
               "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 9, 9], "segmentation": [[1, 1, 9, 1, 9, 9, 1, 9]]}]}
    elif fmt == "label_studio":
        doc = [{"id": 1, "data": {"image": "/data/upload/1/0a1b2c3d-a.png"}, "annotations": [{"id": 5, "result": [
            {"id": "r", "type": "rectanglelabels", "original_width": 40, "original_height": 30,
             "value": {"x": 10, "y": 10, "width": 50, "height": 50, "rotation": 0, "rectanglelabels": ["标签"]}},
            {"id": "r", "type": "choices", "from_name": "color", "value": {"choices": ["blue"]}},
            {"id": "s", "type": "choices", "from_name": "scene", "value": {"choices": ["room"]}}]}]}]
    elif fmt == "cvat":
        return ('<?xml version="1.0" encoding="utf-8"?><annotations><version>1.1</version><meta><task><labels><label><name>标签</name>'
                '</label></labels></task></meta><image id="0" name="a.png" width="40" height="30"><box label="标签" occluded="1" xtl="1" '
                'ytl="1" xbr="9" ybr="9"><attribute name="color">blue</attribute></box><polygon label="标签" points="1,1;20,1;20,20;1,20"/>'
                '</image></annotations>').encode()
    elif fmt == "voc":
        return ("<annotation><filename>a.png</filename><size><width>40</width><height>30</height></size><object><name>标签</name>"
                "<difficult>1</difficult><bndbox><xmin>2</xmin><ymin>2</ymin><xmax>9</xmax><ymax>9</ymax></bndbox></object></annotation>").encode()
    elif fmt == "yolo":
        (folder / "classes.txt").write_text("标签\n", "utf-8")
        return b"0 0.5 0.5 0.25 0.3\n0 0.1 0.1 0.3 0.1 0.3 0.5 0.1 0.5\n"
    elif fmt == "jsonl":
        return (json.dumps({"images": ["a.png"], "width": 40, "height": 30, "objects": []}) + "\n").encode()
    else:
        (folder / "t.csv").write_text("0.1\n0.2\n0.3\n")
        return "path,sampling_rate,label\nt.csv,10,标签\n".encode()
    return json.dumps(doc, ensure_ascii=False).encode()


def _broken_variants(valid: bytes) -> dict[str, bytes]:
    text = valid.decode()
    rng = np.random.default_rng(0)
    variants = {f"truncated_at_{cut}": valid[:cut] for cut in sorted({1, len(valid) // 2, len(valid) - 2, *rng.integers(1, len(valid) - 1, 4).tolist()})}
    variants |= {
        "empty": b"",
        "a_list": b"[1, 2]",
        "a_number": b"42",
        "a_string": b'"labels"',
        "null": b"null",
        "utf16": text.encode("utf-16"),
        "latin1": text.replace("标签", "étiquette").encode("latin-1"),
        "missing_image": valid.replace(b"a.png", b"gone.png").replace(b"t.csv", b"gone.csv"),
    }
    try:  # every value of the document, in turn, replaced by a value of the wrong type
        doc = json.loads(text)
    except ValueError:
        return variants
    def paths(value, path=()):
        yield path
        children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for key, child in children:
            yield from paths(child, (*path, key))
    def original(path):
        value = doc
        for key in path:
            value = value[key]
        return value
    for n, path in enumerate(p for p in paths(doc) if p):
        for wrong in ("x", {"k": 1}, [[None]], -1e308 * 10):
            if type(wrong) is type(original(path)):
                continue  # a same-type change (a relabel) is not a broken input
            mutated = json.loads(text)
            holder = mutated
            for key in path[:-1]:
                holder = holder[key]
            holder[path[-1]] = wrong
            variants[f"wrong_type_{n}_{type(wrong).__name__}"] = json.dumps(mutated, ensure_ascii=False).encode()
    return variants


def _records_of(out: Path, source: Path) -> list[str]:
    """The converted records as text, with the variant's own folders named alike."""
    text = "".join((out / f"{split}.jsonl").read_text("utf-8") for split in ("train", "val") if (out / f"{split}.jsonl").exists())
    return text.replace(str(out), "OUT").replace(str(source), "SOURCE").replace(out.name, "OUT").replace(source.name, "SOURCE").splitlines()


@pytest.mark.parametrize("fmt", ["labelme", "platform", "coco", "cvat", "label_studio", "yolo", "voc", "jsonl", "signals"])
def test_no_broken_input_ends_in_a_traceback(tmp_path, fmt, capsys):
    """Each broken variant ends in a report entry naming its file, or in a one-line error naming it."""
    suffix = {"labelme": ".json", "platform": ".json", "coco": ".json", "cvat": ".xml", "label_studio": ".json", "yolo": ".txt",
              "voc": ".xml", "jsonl": ".jsonl", "signals": ".csv"}[fmt]
    valid = _valid(fmt, tmp_path / "template")
    variants = {"valid": valid, **_broken_variants(valid)}
    converted = {}
    for name, content in variants.items():
        folder = tmp_path / name
        _valid(fmt, folder)
        annotation = folder / f"a{suffix}"
        annotation.write_bytes(content)
        out = tmp_path / f"out-{name}"
        source = folder if fmt in ("labelme", "platform", "yolo", "voc") else annotation
        argv = ["convert", "--format", fmt, "--source", str(source), "--train", str(out / "train.jsonl"), "--val", str(out / "val.jsonl"),
                "--report", str(out / "report.json"), "--media", str(out / "media"), "--name", name, "--tracking-uri", ""]
        argv += ["--examples", str(out / "traces.png")] if fmt == "signals" else ["--overlays", str(out / "overlays")]
        code = main(argv)
        err = capsys.readouterr().err
        assert "Traceback" not in err, (name, err)
        if code == 0:
            report = json.loads((out / "report.json").read_text())
            if fmt in ("jsonl", "signals"):  # these pass lines on; validate rejects them with their line numbers
                continue
            mentioned = [issue for issue in report["issues"] + report["notes"] if issue["file"] == annotation.name]
            converted[name] = _records_of(out, folder)
            if name == "valid" or (fmt, name) == ("yolo", "empty"):  # an empty YOLO file is how YOLO says "no objects"
                assert not mentioned and report["records_out"] == 1, report
            else:  # silence is allowed only when the change touched nothing convert reads
                assert mentioned or converted[name] == converted["valid"], (name, report, converted[name])
            assert report["shapes"]["converted"] + report["shapes"]["reported"] == report["shapes"]["in"], name
        else:
            assert code == 1, name
            errors = [line for line in err.splitlines() if line.startswith("visionqc convert: error:")]  # tqdm shares stderr
            assert len(errors) == 1 and str(annotation) in errors[0], (name, err)
            assert not (out / "report.json").exists(), name
