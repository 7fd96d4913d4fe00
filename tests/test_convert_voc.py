"""Pascal VOC XML: boxes, flags as attributes, parts reported, malformed files named."""

import json

from conftest import convert_into, make_image, read_jsonl

VOC = """<annotation>
  <folder>VOC</folder><filename>{name}.jpg</filename>
  <size><width>100</width><height>50</height><depth>3</depth></size>
  <object><name>BBU</name><pose>Unspecified</pose><truncated>1</truncated><difficult>0</difficult>
    <bndbox><xmin>11</xmin><ymin>6</ymin><xmax>40</xmax><ymax>30</ymax></bndbox></object>
  <object><name>标签</name><difficult>1</difficult>
    <bndbox><xmin>51</xmin><ymin>11</ymin><xmax>60</xmax><ymax>20</ymax></bndbox>
    <part><name>hand</name><bndbox><xmin>52</xmin><ymin>12</ymin><xmax>55</xmax><ymax>15</ymax></bndbox></part></object>
  <object><name>线缆</name><bndbox><xmin>a</xmin><ymin>1</ymin><xmax>2</xmax><ymax>3</ymax></bndbox></object>
</annotation>"""


def voc_export(root, names=("a", "b")):
    for name in names:
        (root / "Annotations").mkdir(parents=True, exist_ok=True)
        (root / "Annotations" / f"{name}.xml").write_text(VOC.format(name=name), "utf-8")
        make_image(root / "JPEGImages" / f"{name}.jpg", size=(100, 50))
    return root


def test_voc_boxes_flags_and_parts(tmp_path):
    report = convert_into("voc", voc_export(tmp_path / "voc"), tmp_path / "out", {"val_fraction": 0.0, "overlays": 0})
    records = read_jsonl(tmp_path / "out" / "train.jsonl")
    assert len(records) == 2
    objects = {o["desc"]: o for o in records[0]["objects"]}
    assert objects["类别=BBU,截断=是"]["bbox_2d"] == [10, 5, 40, 30]  # 1-based inclusive → 0-based
    assert objects["类别=标签,难例=是"]["bbox_2d"] == [50, 10, 60, 20]
    reasons = sorted(issue["reason"] for issue in report["issues"])
    assert reasons == ["bad_points", "bad_points", "unsupported_part", "unsupported_part"]
    # every shape of the input (3 objects + 1 part per file) is converted or reported
    assert sum(len(r["objects"]) for r in records) + len(report["issues"]) == 2 * 4


def test_truncated_voc_xml_names_its_line(tmp_path):
    export = voc_export(tmp_path / "voc", names=("a",))
    (export / "Annotations" / "cut.xml").write_text(VOC.format(name="cut")[:200], "utf-8")
    report = convert_into("voc", export, tmp_path / "out", {"val_fraction": 0.0, "overlays": 0})
    (issue,) = [i for i in report["issues"] if i["reason"] == "unreadable_export"]
    assert issue["file"] == "Annotations/cut.xml" and issue["detail"].startswith("Annotations/cut.xml:")
    assert json.dumps(report)  # the report stays JSON


def test_a_voc_file_without_its_image_reports_every_object(tmp_path):
    export = voc_export(tmp_path / "voc", names=("a",))
    (export / "Annotations" / "gone.xml").write_text(VOC.format(name="gone"), "utf-8")
    report = convert_into("voc", export, tmp_path / "out", {"val_fraction": 0.0, "overlays": 0})
    (missing,) = [i for i in report["issues"] if i["reason"] == "missing_image"]
    assert missing["file"] == "Annotations/gone.xml" and "JPEGImages/gone.jpg" in missing["detail"]
    assert report["records_out"] == 1
    assert report["shapes"]["converted"] + report["shapes"]["reported"] == report["shapes"]["in"] == 8
