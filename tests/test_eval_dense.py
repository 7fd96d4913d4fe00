"""eval_dense: strict parsing of dense answers, one-to-one matching, COCOeval AP, and the stage's files."""

import json

import pytest

from visionqc.dense import parse_dense
from visionqc.eval_dense import EvalDenseOptions, coco_scores, evaluate, run_eval_dense
from visionqc.messages import dense_answer
from visionqc.where import print_where

from conftest import make_image, read_jsonl

BBU, LABEL, CABLE = "类别=BBU", "类别=标签", "类别=线缆"


def image(truth, raw, width=200, height=100):
    return {"images": ["x.jpg"], "width": width, "height": height, "truth": truth, "raw": raw}


def answer(objects, width=200, height=100):
    """The dense answer training teaches for these objects (0-1000 coordinates)."""
    return dense_answer(objects, width, height, [1])


def test_a_dense_answer_lists_objects_in_reading_order_whatever_order_they_were_drawn_in():
    cable = {"line": [150, 95, 0, 5], "desc": CABLE}  # top-left corner (0, 5): first, though it starts bottom right
    label = {"poly": [60, 10, 90, 10, 90, 40, 60, 40], "desc": LABEL}
    right = {"bbox_2d": [120, 10, 180, 90], "desc": BBU}  # the same top as the label, further right
    low = {"bbox_2d": [10, 50, 50, 90], "desc": BBU}
    orders = [[cable, label, right, low], [low, right, label, cable], [right, low, cable, label]]
    answers = {answer(objects) for objects in orders}
    assert len(answers) == 1
    listed = json.loads(answers.pop())["图片_1"]
    assert [next(iter(o)) for o in listed] == ["line", "poly", "bbox_2d", "bbox_2d"]
    assert [o["bbox_2d"][0] for o in listed[2:]] == [600, 50]


TRUTH = [
    [{"bbox_2d": [10, 10, 50, 40], "desc": BBU + ",厂商=华为"}, {"bbox_2d": [120, 20, 180, 90], "desc": BBU + ",厂商=中兴"}],
    [{"poly": [60, 10, 90, 10, 90, 40, 60, 40], "poly_points": 4, "desc": LABEL}, {"line": [0, 95, 200, 95], "line_points": 2, "desc": CABLE}],
    [],
]


def test_truth_fed_back_scores_perfectly():
    images = [image(objects, answer(objects)) for objects in TRUTH]
    metrics = evaluate(images, EvalDenseOptions())
    assert metrics["unparseable"] == 0
    assert metrics["overall"] == {"truth": 4, "predicted": 4, "matched": 4, "precision": 1.0, "recall": 1.0, "f1": 1.0,
                                  "desc_accuracy": 1.0}
    assert {name: row["f1"] for name, row in metrics["per_class"].items()} == {"BBU": 1.0, "标签": 1.0, "线缆": 1.0}
    assert metrics["per_class"]["线缆"]["kind"] == "line" and metrics["lines"]["mean_iou"] == 1.0
    assert {kind: row["f1"] for kind, row in metrics["per_kind"].items()} == {"bbox_2d": 1.0, "poly": 1.0, "line": 1.0}
    assert metrics["coco"]["bbox"]["AP"] == 1.0 and metrics["coco"]["bbox"]["AR100"] == 1.0
    assert metrics["coco"]["segm"]["AP"] == 1.0 and metrics["coco"]["segm"]["per_class_AP"] == {"标签": 1.0}


def test_known_perturbations_give_the_numbers_worked_out_by_hand():
    shifted = {"bbox_2d": [14, 10, 54, 40], "desc": BBU + ",厂商=中兴"}  # IoU 36*30 / (2*40*30 - 36*30) = 0.818; wrong 厂商
    wrong_class = {"poly": [60, 10, 90, 10, 90, 40, 60, 40], "desc": CABLE}  # the 标签 square, called a cable
    images = [
        image(TRUTH[0], answer([shifted])),  # BBU: one found (shifted), one missing
        image(TRUTH[1][:1], answer([wrong_class])),  # 标签 missed, one false 线缆
        image([{"bbox_2d": [10, 10, 30, 30], "desc": BBU}], '{"图片_1":[{"bbox_2d":[50,100,'),  # broken JSON: a miss
    ]
    metrics = evaluate(images, EvalDenseOptions())
    assert metrics["unparseable"] == 1 and metrics["unparseable_by_problem"] == {"not_json": 1}
    bbu, label, cable = (metrics["per_class"][name] for name in ("BBU", "标签", "线缆"))
    assert (bbu["truth"], bbu["predicted"], bbu["matched"]) == (3, 1, 1)
    assert bbu["precision"] == 1.0 and bbu["recall"] == pytest.approx(1 / 3) and bbu["f1"] == pytest.approx(0.5)
    assert bbu["desc_accuracy"] == 0.0  # matched, but 中兴 where the truth says 华为
    assert (label["recall"], label["f1"], label["precision"]) == (0.0, 0.0, None)
    assert (cable["precision"], cable["f1"], cable["recall"], cable["kind"]) == (0.0, 0.0, None, "unknown")
    assert metrics["overall"]["precision"] == 0.5 and metrics["overall"]["recall"] == 0.25
    assert metrics["overall"]["f1"] == pytest.approx(1 / 3)
    # by the shape of each class's truth: the false 线缆 has no truth class, so only the overall figure counts it
    assert metrics["per_kind"]["bbox_2d"]["f1"] == pytest.approx(0.5) and metrics["per_kind"]["poly"]["recall"] == 0.0
    assert "line" not in metrics["per_kind"]
    # COCOeval, BBU: 3 truths, one detection that matches up to IoU 0.8 -> precision 1 for recall <= 1/3 at thresholds
    # 0.50 ... 0.80 (7 of 10): 34 of the 101 recall points each
    assert metrics["coco"]["bbox"]["AP50"] == pytest.approx(34 / 101, abs=1e-4)
    assert metrics["coco"]["bbox"]["AP"] == pytest.approx(0.7 * 34 / 101, abs=1e-4)
    assert metrics["coco"]["segm"]["AP"] == 0.0  # no 标签 was predicted


def test_where_prints_the_dense_f1_overall_and_by_shape(tmp_path, capsys):
    images = [image(TRUTH[0], answer(TRUTH[0][:1])), image(TRUTH[1], answer(TRUTH[1]))]
    (tmp_path / "eval_dense/demo").mkdir(parents=True)
    (tmp_path / "eval_dense/demo/metrics.json").write_text(json.dumps(evaluate(images, EvalDenseOptions())))
    print_where(tmp_path)
    # F1 6/7 overall; BBU 1 of 2 found: F1 2/3, AP 51/101 (found at precision 1 up to recall 0.5)
    out = capsys.readouterr().out
    assert "F1@0.5 0.86, bbox_2d 0.67, poly 1.00, line 1.00, bbox AP 0.51, segm AP 1.00, counts right 1/2, unparseable 0/2" in out


def test_count_match_tells_an_answer_that_sees_what_but_not_where():
    moved = [{"bbox_2d": [110, 10, 150, 40], "desc": BBU + ",厂商=华为"}, {"bbox_2d": [10, 50, 70, 95], "desc": BBU + ",厂商=中兴"}]
    label_twice = [TRUTH[1][0], {**TRUTH[1][0], "poly": [100, 10, 130, 10, 130, 40, 100, 40]}]
    images = [image(TRUTH[0], answer(moved)),  # both BBU named, neither where it is: counted right
              image(TRUTH[1], answer(label_twice)),  # two objects, as in the truth, but the cable called a 标签
              image(TRUTH[0], answer(TRUTH[0][:1])),  # one BBU of two
              image(TRUTH[2], answer([]))]  # nothing there, nothing named: counted right
    metrics = evaluate(images, EvalDenseOptions())
    assert metrics["per_class"]["BBU"]["matched"] == 1
    assert metrics["count_match"] == {"images": 4, "right": 2, "rate": 0.5}


def test_lines_match_within_the_tolerance_only():
    truth = [{"line": [0, 50, 200, 50], "desc": CABLE}]
    near = {"line": [0, 52, 200, 52], "desc": CABLE}  # 2 px away: the 4-px buffers overlap for most of their area
    far = {"line": [0, 60, 200, 60], "desc": CABLE}  # 10 px away: more than twice the tolerance, the buffers are disjoint
    metrics = evaluate([image(truth, answer([near])), image(truth, answer([far]))], EvalDenseOptions(line_tolerance=4))
    assert metrics["per_class"]["线缆"]["matched"] == 1 and metrics["per_class"]["线缆"]["predicted"] == 2
    assert 0.5 < metrics["lines"]["mean_iou"] < 1


def test_our_bbox_ap_agrees_with_cocoeval_on_the_same_input(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    truth = [[{"bbox_2d": [10, 10, 50, 40], "desc": BBU}, {"bbox_2d": [100, 10, 150, 60], "desc": BBU}],
             [{"bbox_2d": [5, 5, 25, 25], "desc": BBU}, {"bbox_2d": [60, 20, 90, 80], "desc": "类别=机柜"}],
             [{"bbox_2d": [30, 30, 70, 90], "desc": "类别=机柜"}]]
    predicted = [[{"bbox_2d": [12, 10, 52, 42], "desc": BBU}, {"bbox_2d": [0, 0, 20, 20], "desc": BBU}],
                 [{"bbox_2d": [5, 5, 25, 25], "desc": BBU}, {"bbox_2d": [60, 30, 90, 80], "desc": "类别=机柜"}],
                 [{"bbox_2d": [40, 30, 70, 90], "desc": "类别=机柜"}, {"bbox_2d": [100, 10, 150, 60], "desc": BBU}]]
    images = [{"images": ["x.jpg"], "width": 200, "height": 100, "truth": t, "predicted": p} for t, p in zip(truth, predicted)]
    ours = coco_scores(images, "bbox_2d")

    names = {"BBU": 1, "机柜": 2}
    gt = {"images": [{"id": i + 1, "width": 200, "height": 100} for i in range(3)], "categories": [{"id": v, "name": k} for k, v in names.items()],
          "annotations": []}
    dt = []
    for i, (t, p) in enumerate(zip(truth, predicted), start=1):
        for obj in t:
            x1, y1, x2, y2 = obj["bbox_2d"]
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": i, "category_id": names[obj["desc"].split("=")[1]],
                                      "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
        for obj in p:
            x1, y1, x2, y2 = obj["bbox_2d"]
            dt.append({"image_id": i, "category_id": names[obj["desc"].split("=")[1]], "bbox": [x1, y1, x2 - x1, y2 - y1], "score": 1.0})
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dt.json").write_text(json.dumps(dt))
    reference = COCO(str(tmp_path / "gt.json"))
    direct = COCOeval(reference, reference.loadRes(str(tmp_path / "dt.json")), "bbox")
    direct.evaluate()
    direct.accumulate()
    direct.summarize()
    assert ours["AP"] == pytest.approx(direct.stats[0], abs=1e-4) and ours["AP50"] == pytest.approx(direct.stats[1], abs=1e-4)
    assert ours["AR100"] == pytest.approx(direct.stats[8], abs=1e-4)
    assert 0 < ours["AP"] < 1


# COCO written by hand (xywh boxes, ids, scores), not converted from ours: two images, BBU and 机柜
HAND_GT = {"images": [{"id": 1, "width": 200, "height": 100}, {"id": 2, "width": 200, "height": 100}],
           "categories": [{"id": 1, "name": "BBU"}, {"id": 2, "name": "机柜"}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 30], "area": 1200, "iscrowd": 0},
                           {"id": 2, "image_id": 1, "category_id": 1, "bbox": [100, 10, 50, 50], "area": 2500, "iscrowd": 0},
                           {"id": 3, "image_id": 2, "category_id": 1, "bbox": [5, 5, 20, 20], "area": 400, "iscrowd": 0},
                           {"id": 4, "image_id": 2, "category_id": 2, "bbox": [60, 20, 30, 60], "area": 1800, "iscrowd": 0}]}
HAND_DT = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 20, 20], "score": 0.95},  # a false BBU ranked first
           {"image_id": 2, "category_id": 1, "bbox": [5, 5, 20, 20], "score": 0.9},
           {"image_id": 2, "category_id": 2, "bbox": [0, 50, 30, 30], "score": 0.85},  # a false 机柜 above the true one
           {"image_id": 2, "category_id": 2, "bbox": [60, 30, 30, 50], "score": 0.8},
           {"image_id": 1, "category_id": 1, "bbox": [12, 10, 40, 32], "score": 0.6},
           {"image_id": 1, "category_id": 1, "bbox": [100, 10, 50, 50], "score": 0.3}]


def test_scored_predictions_rank_like_a_direct_cocoeval_run(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    (tmp_path / "gt.json").write_text(json.dumps(HAND_GT, ensure_ascii=False), "utf-8")
    (tmp_path / "dt.json").write_text(json.dumps(HAND_DT), "utf-8")
    reference = COCO(str(tmp_path / "gt.json"))
    direct = COCOeval(reference, reference.loadRes(str(tmp_path / "dt.json")), "bbox")
    direct.evaluate()
    direct.accumulate()
    direct.summarize()

    # the same scene in our form, each image's answers in an order unrelated to their scores
    images = [{"images": ["a.jpg"], "width": 200, "height": 100,
               "truth": [{"bbox_2d": [10, 10, 50, 40], "desc": BBU}, {"bbox_2d": [100, 10, 150, 60], "desc": BBU}],
               "predicted": [{"bbox_2d": [100, 10, 150, 60], "desc": BBU, "score": 0.3},
                             {"bbox_2d": [12, 10, 52, 42], "desc": BBU, "score": 0.6},
                             {"bbox_2d": [0, 0, 20, 20], "desc": BBU, "score": 0.95}]},
              {"images": ["b.jpg"], "width": 200, "height": 100,
               "truth": [{"bbox_2d": [5, 5, 25, 25], "desc": BBU}, {"bbox_2d": [60, 20, 90, 80], "desc": "类别=机柜"}],
               "predicted": [{"bbox_2d": [60, 30, 90, 80], "desc": "类别=机柜", "score": 0.8},
                             {"bbox_2d": [5, 5, 25, 25], "desc": BBU, "score": 0.9},
                             {"bbox_2d": [0, 50, 30, 80], "desc": "类别=机柜", "score": 0.85}]}]
    ours = coco_scores(images, "bbox_2d")
    assert ours["AP"] == pytest.approx(direct.stats[0], abs=1e-4) and ours["AP50"] == pytest.approx(direct.stats[1], abs=1e-4)
    assert ours["AP75"] == pytest.approx(direct.stats[2], abs=1e-4) and ours["AR100"] == pytest.approx(direct.stats[8], abs=1e-4)
    assert 0.3 < ours["AP50"] < 0.9
    # without their scores the false answers no longer rank first: another AP, so the scores were used
    unscored = [{**image, "predicted": [{k: v for k, v in o.items() if k != "score"} for o in image["predicted"]]} for image in images]
    assert coco_scores(unscored, "bbox_2d")["AP50"] != pytest.approx(ours["AP50"], abs=1e-3)


@pytest.mark.parametrize("raw, problem", [
    ("", "not_json"),
    ('{"统计":[]}', "bad_image_key"),
    ('{"图片_2":[]}', "bad_image_key"),
    ('["图片_1"]', "not_object"),
    ('{"图片_1":{"bbox_2d":[1,2,3,4],"desc":"类别=BBU"}}', "bad_object"),
    ('{"图片_1":[{"bbox_2d":[1,2,3],"desc":"类别=BBU"}]}', "bad_object"),
    ('{"图片_1":[{"bbox_2d":[1,2,3,1001],"desc":"类别=BBU"}]}', "bad_object"),
    ('{"图片_1":[{"bbox_2d":[30,2,3,40],"desc":"类别=BBU"}]}', "bad_object"),
    ('{"图片_1":[{"bbox_2d":[1,2,3,4],"poly":[1,2,3,4,5,6,7,8],"desc":"类别=BBU"}]}', "bad_object"),
    ('{"图片_1":[{"bbox_2d":[1,2,3,4]}]}', "bad_object"),
    ('{"图片_1":[{"line":[1,2],"desc":"类别=线缆"}]}', "bad_object"),
    ('{"图片_1":[{"poly":[1,2,3,4,5,6],"desc":"类别=标签"}]}', "bad_object"),
    ('{"图片_1":[{"bbox_2d":[1,2,3,true],"desc":"类别=BBU"}]}', "bad_object"),
])
def test_dense_answers_are_read_strictly(raw, problem):
    assert parse_dense(raw, 1, 200, 100) == (None, problem)


def test_a_good_answer_maps_back_to_pixels():
    objects, problem = parse_dense('{"图片_1":[{"bbox_2d":[100,200,500,1000],"desc":"类别=BBU"}],"图片_2":[]}', 2, 200, 100)
    assert problem is None and objects == [{"bbox_2d": [20.0, 20.0, 100.0, 100.0], "desc": "类别=BBU", "image_index": 0}]


def test_the_stage_writes_metrics_predictions_and_overlays(tmp_path):
    for n in range(3):
        make_image(tmp_path / "images" / f"{n}.jpg", size=(200, 100), color=(200, 200, 200))
    records = [{"images": [f"images/{n}.jpg"], "width": 200, "height": 100, "objects": objects, "metadata": {"source_file": f"{n}.json"}}
               for n, objects in enumerate(TRUTH)]
    records.append({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), "utf-8")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "manifest.json").write_text(json.dumps({"options": {"prompts": {"dense": "找出", "summary": "统计"},
                                                                              "image_max_tokens": 64, "image_min_tokens": 4}}))
    (tmp_path / "pointer.json").write_text(json.dumps({"key": "k", "path": str(tmp_path / "cache"), "records": "r.jsonl"}))
    answers = {f"{n}.jpg": answer(objects) for n, objects in enumerate(TRUTH)}
    answers["1.jpg"] = "我看到一个标签"

    class Answers:
        def generate(self, requests):
            assert {r["prompt"] for r in requests} == {"找出"}
            return [answers[r["images"][0].rsplit("/", 1)[1]] for r in requests]

    out = tmp_path / "eval"
    result = run_eval_dense(tmp_path / "model", tmp_path / "val.jsonl", tmp_path / "pointer.json", metrics_out=out / "metrics.json",
                            predictions_out=out / "predictions.jsonl", overlays_out=out / "overlays", generator=Answers(),
                            options={"batch_size": 2, "overlays_per_class": 1})
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["records"] == 3 and metrics["unparseable"] == 1 and metrics["overall"]["recall"] == 0.5
    predictions = read_jsonl(out / "predictions.jsonl")
    assert [p["problem"] for p in predictions] == [None, "not_json", None] and predictions[1]["raw"] == "我看到一个标签"
    assert predictions[0]["line"] == 1 and len(predictions[0]["matches"]) == 2
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["001.png", "002.png"]  # BBU on image 0; 标签, 线缆 on 1
    assert result.metrics["overall.f1"] == metrics["overall"]["f1"] and "per_class.BBU.f1" in result.metrics
