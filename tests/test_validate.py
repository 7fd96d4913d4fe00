import base64
import json
from pathlib import Path

import pytest

from visionqc.validate import ValidationError, validate

from conftest import REFERENCE, make_image, read_jsonl, write_lines


def good(name="good.jpg", **overrides):
    record = {
        "images": [f"img/{name}"],
        "width": 64,
        "height": 48,
        "objects": [{"bbox_2d": [1, 2, 30, 40], "desc": "类别=BBU"}, {"line": [0, 0, 63, 47], "line_points": 2, "desc": "类别=线缆"}],
        "summary": '{"统计":[{"类别":"BBU","数量":1},{"类别":"线缆","数量":1}]}',
    }
    record.update(overrides)
    return record


def obj(**geometry):
    return {"desc": "类别=x", **geometry}


@pytest.fixture
def data_dir(tmp_path) -> Path:
    root = tmp_path / "data"
    make_image(root / "img" / "good.jpg")
    make_image(root / "img" / "good2.png")
    make_image(root / "img" / "other_size.jpg", size=(50, 50))
    make_image(root / "img" / "rotated.jpg", exif_orientation=6)
    full = (root / "img" / "good.jpg").read_bytes()
    (root / "img" / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (root / "img" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg" * 10)
    make_image(tmp_path / "outside.jpg")
    return root


# (reason, line content): each a bad line that must be rejected with that reason
BAD_LINES = [
    ("malformed_json", '{"images": ["img/good.jpg"], "width": 64,'),
    ("malformed_json", "not json at all"),
    ("missing_key", {k: v for k, v in good().items() if k != "height"}),
    ("missing_key", good(objects=[{"bbox_2d": [1, 2, 3, 4]}])),
    ("geometry_count", good(objects=[obj(bbox_2d=[1, 2, 3, 4], poly=[0, 0, 9, 0, 9, 9, 0, 9])])),
    ("geometry_count", good(objects=[obj()])),
    ("poly_odd_length", good(objects=[obj(poly=[0, 0, 9, 0, 9, 9, 0])])),
    ("poly_too_few_points", good(objects=[obj(poly=[0, 0, 9, 0, 9, 9])])),
    ("poly_points_mismatch", good(objects=[obj(poly=[0, 0, 9, 0, 9, 9, 0, 9], poly_points=3)])),
    ("line_too_few_points", good(objects=[obj(line=[4, 4])])),
    ("line_points_mismatch", good(objects=[obj(line=[0, 0, 5, 5], line_points=4)])),
    ("bbox_order", good(objects=[obj(bbox_2d=[30, 2, 10, 40])])),
    ("bbox_order", good(objects=[obj(bbox_2d=[1, 20, 30, 20])])),
    ("wrong_length", good(objects=[obj(bbox_2d=[1, 2, 3])])),
    ("non_finite", '{"images":["img/good.jpg"],"width":64,"height":48,"objects":[{"bbox_2d":[1,2,NaN,40],"desc":"类别=x"}]}'),
    ("non_finite", '{"images":["img/good.jpg"],"width":64,"height":48,"objects":[{"line":[0,0,Infinity,4],"desc":"类别=x"}]}'),
    ("out_of_bounds", good(objects=[obj(bbox_2d=[1, 2, 1e12, 40])])),
    ("out_of_bounds", good(objects=[obj(poly=[-5, 0, 9, 0, 9, 9, 0, 9])])),
    ("empty_desc", good(objects=[{"bbox_2d": [1, 2, 3, 4], "desc": ""}])),
    ("empty_desc", good(objects=[{"bbox_2d": [1, 2, 3, 4], "desc": "   "}])),
    ("wrong_type", good(width="64")),
    ("wrong_type", [1, 2, 3]),
    ("wrong_length", good(images=[])),
    ("empty_value", good(summary="")),
    ("missing_image", good(name="nope.jpg")),
    ("corrupt_image", good(name="truncated.jpg")),
    ("corrupt_image", good(name="corrupt.jpg")),
    ("size_mismatch", good(name="other_size.jpg")),
    ("exif_rotated", good(name="rotated.jpg")),
    ("non_utf8", b'{"images":["img/good.jpg"],"width":64,"height":48,"objects":[],"summary":"\xff\xfe bad"}'),
    ("path_escapes_root", good(images=["../outside.jpg"])),
    ("duplicate_record", good()),  # the first good line is identical
]


def test_bad_input_corpus(data_dir, tmp_path):
    assert len(BAD_LINES) >= 25
    good_lines = [good(), good(images=["img/good2.png"]), good(summary="无关图片", objects=[])]
    lines, expected = [], {}
    for index, (reason, bad) in enumerate(BAD_LINES):
        if index < len(good_lines):
            lines.append(good_lines[index])
        lines.append(bad)
        expected[len(lines)] = reason
    lines.append("")  # a blank line is counted, not a record
    source = write_lines(data_dir / "records.jsonl", lines)
    clean, rejects, report_path = data_dir / "clean.jsonl", data_dir / "rejects.jsonl", data_dir / "report.json"

    report = validate(source, clean, rejects, report_path).report

    rows = read_jsonl(rejects)
    assert {row["line"]: row["reason"] for row in rows} == expected
    for row in rows:
        assert row["file"] == str(source) and row["message"] and row["field"]
        raw = source.read_bytes().split(b"\n")[row["line"] - 1]
        if row["reason"] == "non_utf8":
            assert base64.b64decode(row["original_base64"]) == raw
        else:
            assert row["original"].encode("utf-8") == raw
    # good lines pass through byte for byte
    source_lines = source.read_bytes().split(b"\n")
    good_numbers = [n for n in range(1, len(lines)) if n not in expected]
    assert clean.read_bytes() == b"".join(source_lines[n - 1] + b"\n" for n in good_numbers)
    assert report["records_out"] == len(good_lines) == 3
    assert report["rejected"] == len(BAD_LINES) and report["blank_lines"] == 1
    assert sum(report["rejected_by_reason"].values()) == len(BAD_LINES)
    assert json.loads(report_path.read_text())["rejected_by_reason"]["corrupt_image"] == 2


def test_messages_name_the_field(data_dir):
    source = write_lines(data_dir / "r.jsonl", [good(objects=[obj(bbox_2d=[1, 2, 3, 4]), obj(poly=[0, 0, 1, 0, 1, 1, 0])])])
    validate(source, data_dir / "c.jsonl", data_dir / "x.jsonl", data_dir / "r.json")
    (row,) = read_jsonl(data_dir / "x.jsonl")
    assert row["field"] == "objects[1].poly" and "7 numbers" in row["message"]


def test_empty_file_gives_a_reject(tmp_path):
    source = write_lines(tmp_path / "empty.jsonl", [])
    report = validate(source, tmp_path / "c.jsonl", tmp_path / "x.jsonl", tmp_path / "r.json").report
    assert report["rejected_by_reason"] == {"empty_file": 1}
    assert read_jsonl(tmp_path / "x.jsonl")[0]["reason"] == "empty_file"


def test_fail_fast_names_file_line_and_field(data_dir):
    source = write_lines(data_dir / "r.jsonl", [good(), good(objects=[obj(bbox_2d=[9, 2, 3, 4])])])
    with pytest.raises(ValidationError, match=r"r\.jsonl:2: objects\[0\]\.bbox_2d: .*x1<x2"):
        validate(source, data_dir / "c.jsonl", data_dir / "x.jsonl", data_dir / "r.json", {"mode": "fail_fast"})
    assert not (data_dir / "c.jsonl").exists() and not (data_dir / "r.json").exists()


def test_clip_policy_clips_and_counts(data_dir):
    source = write_lines(data_dir / "r.jsonl", [good(objects=[obj(bbox_2d=[-3, 2, 70, 40])])])
    report = validate(source, data_dir / "c.jsonl", data_dir / "x.jsonl", data_dir / "r.json", {"bounds_policy": "clip"}).report
    assert report["clipped_records"] == 1 and report["rejected"] == 0
    assert read_jsonl(data_dir / "c.jsonl")[0]["objects"][0]["bbox_2d"] == [0, 2, 64, 40]
    report = validate(source, data_dir / "c.jsonl", data_dir / "x.jsonl", data_dir / "r.json", {"bounds_tolerance": 6}).report
    assert report["records_out"] == 1 and report["clipped_records"] == 0


def test_clean_file_elsewhere_rebases_only_image_paths(data_dir, tmp_path):
    source = write_lines(data_dir / "r.jsonl", [good()])
    out = tmp_path / "elsewhere" / "deeper" / "c.jsonl"
    validate(source, out, tmp_path / "x.jsonl", tmp_path / "r.json")
    (record,) = read_jsonl(out)
    assert (out.parent / record["images"][0]).resolve() == (data_dir / "img" / "good.jpg").resolve()
    assert {k: v for k, v in record.items() if k != "images"} == {k: v for k, v in good().items() if k != "images"}


def test_reference_records_validate_with_a_data_root(tmp_path):
    data = REFERENCE / "qwen3vl-demo" / "data" / "train_tiny.jsonl"
    report = validate(data, tmp_path / "c.jsonl", tmp_path / "x.jsonl", tmp_path / "r.json", {"data_root": str(REFERENCE / "qwen3vl-demo")}).report
    assert report["records_out"] == 1 and report["warnings_by_reason"] == {"legacy_desc": 2, "legacy_summary": 1}
    # without the root the ../images paths escape the JSONL's folder
    report = validate(data, tmp_path / "c.jsonl", tmp_path / "x.jsonl", tmp_path / "r.json").report
    assert report["rejected_by_reason"] == {"path_escapes_root": 1}


def test_unknown_option_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"unknown option validate\.strict; valid keys: bounds_policy"):
        validate(tmp_path / "a", tmp_path / "b", tmp_path / "c", tmp_path / "d", {"strict": True})


@pytest.mark.parametrize("summary", ["看起来都正常", "设备×1,标签×1", "设备×一", "BBU: 2", '["统计"]', "设备×1，标签×1\n第二行",
                                     '{"备注":"没有统计"}', '{"统计":[{"类别":"BBU","数量":-1}]}'])
def test_only_the_summary_contract_and_the_legacy_form_pass(data_dir, summary):
    source = write_lines(data_dir / "r.jsonl", [good(summary=summary), good(summary="设备×1，标签×1", images=["img/good2.png"])])
    report = validate(source, data_dir / "c.jsonl", data_dir / "x.jsonl", data_dir / "r.json").report
    assert report["rejected_by_reason"] == {"bad_summary": 1} and report["records_out"] == 1
    assert report["warnings_by_reason"] == {"legacy_summary": 1} and report["warning_lines"] == {"legacy_summary": [2]}
    (reject,) = read_jsonl(data_dir / "x.jsonl")
    assert reject["line"] == 1 and "类别×N" in reject["message"]


BOW_TIE = [0, 0, 40, 40, 40, 0, 0, 40]  # two triangles meeting in the middle
LOOPED = [0, 0, 40, 0, 40, 30, 10, 30, 10, 10, 20, 10, 20, 40, 0, 40]  # an outline whose last legs cross an earlier one


@pytest.mark.parametrize("policy", ["warn", "reject", "repair"])
def test_self_crossing_polygons_are_never_passed_silently(data_dir, policy):
    lines = [good(objects=[obj(poly=[1, 1, 30, 1, 30, 30, 1, 30])]),
             good(objects=[obj(poly=LOOPED)], images=["img/good2.png"]),
             good(objects=[obj(poly=BOW_TIE)], width=64, height=48, summary="无关图片")]
    source = write_lines(data_dir / "r.jsonl", lines)
    report = validate(source, data_dir / "c.jsonl", data_dir / "x.jsonl", data_dir / "r.json", {"self_crossing": policy}).report
    if policy == "warn":
        assert report["records_out"] == 3 and report["warnings_by_reason"] == {"self_crossing_poly": 2}
        assert report["warning_lines"] == {"self_crossing_poly": [2, 3]}
    elif policy == "reject":
        assert report["records_out"] == 1 and report["rejected_by_reason"] == {"self_crossing_poly": 2}
    else:
        from shapely.geometry import LinearRing

        assert report["records_out"] == 2 and report["repaired_polygons"] == 1
        assert report["rejected_by_reason"] == {"self_crossing_poly": 1}  # the bow tie has no single outline
        assert "2 pieces" in read_jsonl(data_dir / "x.jsonl")[0]["message"]
        repaired = read_jsonl(data_dir / "c.jsonl")[1]["objects"][0]
        assert LinearRing(list(zip(repaired["poly"][0::2], repaired["poly"][1::2]))).is_simple
        assert repaired["poly_points"] == len(repaired["poly"]) // 2
