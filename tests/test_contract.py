import json

import jsonschema
import pytest
from shapely.geometry import Polygon

from visionqc import contract

from conftest import REFERENCE


def dense(**overrides):
    record = {"images": ["a.jpg"], "width": 100, "height": 80, "objects": [{"bbox_2d": [1, 2, 30, 40], "desc": "类别=BBU"}]}
    record.update(overrides)
    return record


def test_record_schema_is_a_valid_json_schema():
    jsonschema.Draft7Validator.check_schema(contract.record_schema())


@pytest.mark.parametrize("name", ["train_tiny.jsonl", "val_tiny.jsonl"])
def test_reference_records_validate_with_legacy_warnings(name):
    for line in (REFERENCE / "qwen3vl-demo" / "data" / name).read_text("utf-8").splitlines():
        errors, warnings = contract.check_record(json.loads(line))
        assert errors == []
        assert {w.reason for w in warnings} == {"legacy_summary", "legacy_desc"}


def test_reference_records_rejected_when_legacy_forms_are_refused():
    line = (REFERENCE / "qwen3vl-demo" / "data" / "train_tiny.jsonl").read_text("utf-8").splitlines()[0]
    errors, warnings = contract.check_record(json.loads(line), legacy="reject")
    assert warnings == [] and {e.reason for e in errors} == {"legacy_summary", "legacy_desc"}


def test_jsonschema_and_contract_agree_on_a_good_record():
    record = dense(summary=contract.IRRELEVANT_SUMMARY, metadata={"k": 1})
    jsonschema.validate(record, contract.record_schema())
    assert contract.check_record(record) == ([], [])


@pytest.mark.parametrize(
    "record, field, reason",
    [
        (dense(objects=[{"bbox_2d": [1, 2, 3, 4], "line": [1, 2, 3, 4], "desc": "类别=x"}]), "objects[0]", "geometry_count"),
        (dense(objects=[{"desc": "类别=x"}]), "objects[0]", "geometry_count"),
        (dense(objects=[{"bbox_2d": [5, 2, 5, 4], "desc": "类别=x"}]), "objects[0].bbox_2d", "bbox_order"),
        (dense(objects=[{"poly": [0, 0, 4, 0, 4, 4, 0], "desc": "类别=x"}]), "objects[0].poly", "poly_odd_length"),
        (dense(objects=[{"poly": [0, 0, 4, 0, 4, 4], "desc": "类别=x"}]), "objects[0].poly", "poly_too_few_points"),
        (dense(objects=[{"poly": [0, 0, 4, 0, 4, 4, 0, 4], "poly_points": 5, "desc": "类别=x"}]), "objects[0].poly_points", "poly_points_mismatch"),
        (dense(objects=[{"line": [0, 0], "desc": "类别=x"}]), "objects[0].line", "line_too_few_points"),
        (dense(objects=[{"line": [0, 0, 3, 3], "line_points": 3, "desc": "类别=x"}]), "objects[0].line_points", "line_points_mismatch"),
        (dense(objects=[{"bbox_2d": [1, 2, 3, 4], "desc": " "}]), "objects[0].desc", "empty_desc"),
        (dense(width="100"), "width", "wrong_type"),
        (dense(summary=""), "summary", "empty_value"),
        ({"images": ["a.jpg"], "width": 1, "objects": []}, "height", "missing_key"),
        ({"messages": [{"role": "user"}]}, "messages[0].content", "missing_key"),
    ],
)
def test_contract_errors_name_field_and_reason(record, field, reason):
    errors, _ = contract.check_record(record)
    assert [(e.field, e.reason) for e in errors][:1] == [(field, reason)]
    assert errors[0].message


def test_chat_record_passes():
    record = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "通过\n理由: ok"}]}
    assert contract.check_record(record) == ([], [])


def test_bounds_and_clip():
    record = dense(objects=[{"poly": [-3, 0, 104, 0, 104, 80, -3, 80], "desc": "类别=x"}])
    assert [p.reason for p in contract.check_bounds(record)] == ["out_of_bounds"]
    assert contract.check_bounds(record, tolerance=4) == []
    assert contract.clip_to_bounds(record) == 4
    assert record["objects"][0]["poly"] == [0, 0, 100, 0, 100, 80, 0, 80]


class TestCanonicalPolygon:
    def test_drops_closing_vertex_orders_clockwise_and_starts_top_left(self):
        # counter-clockwise on screen, closed, starting bottom-right
        ring = [10, 10, 10, 0, 0, 0, 0, 10, 10, 10]
        assert contract.canonical_polygon(ring) == [0, 0, 10, 0, 10, 10, 0, 10]

    def test_canonical_form_is_a_fixed_point(self):
        once = contract.canonical_polygon([3, 9, 8, 2, 15, 6, 12, 14])
        assert contract.canonical_polygon(once) == once

    def test_top_most_then_left_most_start(self):
        diamond = [16, 29, 3, 16, 16, 3, 29, 16]
        assert contract.canonical_polygon(diamond)[:2] == [16, 3]
        flat_top = [10, 0, 20, 10, 0, 10, 0, 0]
        assert contract.canonical_polygon(flat_top)[:2] == [0, 0]

    def test_clockwise_on_screen(self):
        flat = contract.canonical_polygon([0, 0, 0, 10, 10, 10, 10, 0])
        xs, ys = flat[0::2], flat[1::2]
        # shoelace in image axes (y down): positive means clockwise on screen
        area = sum(xs[i] * ys[(i + 1) % 4] - xs[(i + 1) % 4] * ys[i] for i in range(4))
        assert area > 0

    def test_crossing_quad_is_reordered(self):
        bowtie = [0, 0, 10, 10, 10, 0, 0, 10]
        assert contract.canonical_polygon(bowtie) == [0, 0, 10, 0, 10, 10, 0, 10]

    def test_non_convex_outline_keeps_its_shape(self):
        # an L shape: angle sorting would change it, canonicalisation must not
        ell = [0, 0, 4, 0, 4, 6, 10, 6, 10, 10, 0, 10]
        out = contract.canonical_polygon(ell)
        before = Polygon(list(zip(ell[0::2], ell[1::2], strict=True)))
        after = Polygon(list(zip(out[0::2], out[1::2], strict=True)))
        assert after.is_valid and after.equals(before)


def test_desc_and_summary_forms():
    desc = contract.format_desc("BBU/华为", {"颜色": "红,蓝", "编号": "a=b", "空": ""})
    assert desc == "类别=BBU/华为,颜色=红，蓝,编号=a＝b"
    assert contract.desc_category(desc) == "BBU/华为"
    assert contract.desc_category("设备/示例") == "设备"
    objects = [{"desc": "类别=线缆"}, {"desc": "类别=BBU"}, {"desc": "类别=BBU,厂商=中兴"}]
    summary = contract.build_summary(objects)
    assert json.loads(summary) == {"统计": [{"类别": "BBU", "数量": 2}, {"类别": "线缆", "数量": 1}]}
    assert contract.build_summary(list(reversed(objects))) == summary
    assert contract.parse_summary(summary).counts == {"BBU": 2, "线缆": 1}
    assert contract.build_summary([]) == contract.IRRELEVANT_SUMMARY
    assert contract.parse_summary("设备×1，标签×1").problem == "legacy_form"


def test_rebase_images(tmp_path):
    record = {"images": ["images/a.jpg", "/abs/b.jpg"]}
    contract.rebase_media(record, tmp_path / "convert" / "ds", tmp_path / "fuse" / "f")
    assert record["images"] == ["../../convert/ds/images/a.jpg", "/abs/b.jpg"]


@pytest.mark.parametrize(
    "text, problem, counts",
    [
        ('{"统计":[{"类别":"BBU","数量":2},{"类别":"标签","数量":0}]}', None, {"BBU": 2, "标签": 0}),
        ('  {"统计":[],"备注":"其它键可以有"}\n', None, {}),
        ("无关图片", None, {}),
        ("", "empty", None),
        ("   ", "empty", None),
        (None, "empty", None),
        ('{"统计":[]}\n{"统计":[]}', "multi_line", None),
        ("设备×1，标签×1", "legacy_form", None),
        ('","数量":","数量":', "not_json", None),
        ('{"统计":[{"类别":"BBU","数量":1}', "not_json", None),
        ('[{"类别":"BBU","数量":1}]', "not_object", None),
        ('{"counts":[]}', "no_counts", None),
        ('{"统计":{"BBU":1}}', "no_counts", None),
        ('{"统计":[{"类别":"BBU"}]}', "bad_entry", None),
        ('{"统计":[{"类别":"BBU","数量":1,"颜色":"红"}]}', "bad_entry", None),
        ('{"统计":[{"类别":" ","数量":1}]}', "bad_entry", None),
        ('{"统计":["BBU"]}', "bad_entry", None),
        ('{"统计":[{"类别":"BBU","数量":-1}]}', "bad_count", None),
        ('{"统计":[{"类别":"BBU","数量":1.0}]}', "bad_count", None),
        ('{"统计":[{"类别":"BBU","数量":"2"}]}', "bad_count", None),
        ('{"统计":[{"类别":"BBU","数量":true}]}', "bad_count", None),
        ('{"统计":[{"类别":"BBU","数量":1},{"类别":"BBU","数量":2}]}', "duplicate_category", None),
    ],
)
def test_summary_contract(text, problem, counts):
    check = contract.parse_summary(text)
    assert check.problem == problem and check.counts == counts and check.valid == (problem is None)
    assert check.detail if problem else True
    assert check.irrelevant == (text == "无关图片")
    if problem:
        assert problem in contract.SUMMARY_PROBLEMS
