"""qa_labels: disagreement, ranking by margin, recall of known errors at k, and the stage's files."""

import json
from pathlib import Path

import pytest

from visionqc import contract
from visionqc.qa_labels import disagreement, rank_suspects, recall_at_k, run_qa_labels

from conftest import CACHE, cache_pointers, make_image, read_jsonl, train_into

BBU, LABEL = "类别=BBU", "类别=标签"


def record(objects, summary=None, width=200, height=100):
    made = {"images": ["x.jpg"], "width": width, "height": height, "objects": objects}
    made["summary"] = summary if summary is not None else contract.build_summary(objects)
    return made


TWO_BBU = [{"bbox_2d": [10, 10, 50, 40], "desc": BBU}, {"bbox_2d": [120, 20, 180, 90], "desc": BBU}]


def test_summary_disagreement_compares_counts_not_text():
    annotated = record(TWO_BBU)
    assert disagreement(annotated, '{"统计":[{"类别":"BBU","数量":2}]}', "summary") is None
    assert disagreement(annotated, ' {"统计": [{"数量": 2, "类别": "BBU"}]} ', "summary") is None  # same counts, other spelling
    assert disagreement(annotated, '{"统计":[{"类别":"BBU","数量":1}]}', "summary") == "differs"
    assert disagreement(annotated, '{"统计":[{"类别":"BBU","数量":2},{"类别":"标签","数量":1}]}', "summary") == "differs"
    assert disagreement(annotated, '","数量":', "summary") == "own_invalid"
    legacy = record(TWO_BBU, summary="BBU×2")  # a legacy annotation is compared through its objects
    assert disagreement(legacy, '{"统计":[{"类别":"BBU","数量":2}]}', "summary") is None


def test_dense_disagreement_needs_a_one_to_one_match():
    annotated = record(TWO_BBU)
    same = '{"图片_1":[{"bbox_2d":[50,100,250,400],"desc":"类别=BBU"},{"bbox_2d":[600,200,900,900],"desc":"类别=BBU"}]}'
    assert disagreement(annotated, same, "dense") is None
    assert disagreement(annotated, '{"图片_1":[{"bbox_2d":[50,100,250,400],"desc":"类别=BBU"}]}', "dense") == "differs"
    relabelled = same.replace('900],"desc":"类别=BBU"', '900],"desc":"类别=标签"')
    assert disagreement(annotated, relabelled, "dense") == "differs"
    assert disagreement(annotated, "{", "dense") == "own_invalid"


def test_suspects_rank_by_margin_and_recall_is_counted_at_k():
    items = [{"split": "train", "line": n, "source_file": f"s{n}.json", "disagreement": d, "margin": m}
             for n, (d, m) in enumerate([("differs", 1.0), (None, 9.0), ("differs", 7.5), ("own_invalid", 8.0), ("differs", 3.0),
                                         ("differs", 0.5)], start=1)]
    suspects = rank_suspects(items)
    assert [(s["rank"], s["line"]) for s in suspects] == [(1, 3), (2, 5), (3, 1), (4, 6)]
    found = recall_at_k(suspects, {"s3.json", "s6.json", "s2.json"}, k=2)
    assert found["hits_at_k"] == 1 and found["precision_at_k"] == 0.5 and found["recall_at_k"] == pytest.approx(1 / 3)
    assert found["recall_all_suspects"] == pytest.approx(2 / 3) and found["missed"] == ["s2.json", "s6.json"]


class Reviewer:
    """A stand-in model that knows each image's true counts: it answers them, and scores an answer by how far its
    counts are from the truth (0 when right, -4 per category count that is off)."""

    def __init__(self, truth):
        self.truth = truth
        self.scored = 0

    def _counts(self, request):
        return self.truth[request["images"][0].rsplit("/", 1)[1]]

    def generate(self, requests):
        return [contract.build_summary([{"desc": f"类别={c}"} for c, n in self._counts(r).items() for _ in range(n)]) for r in requests]

    def log_likelihoods(self, requests, answers):
        self.scored += len(answers)
        scores = []
        for request, answer in zip(requests, answers, strict=True):
            counts = contract.parse_summary(answer).counts or {}
            truth = self._counts(request)
            scores.append(-4.0 * sum(counts.get(c, 0) != truth.get(c, 0) for c in set(counts) | set(truth)))
        return scores


def test_the_stage_ranks_the_corrupted_records_first(tmp_path):
    """The stage's bookkeeping (what is scored, ranked, counted and drawn) with a reviewer that knows the truth, so its
    recall here says nothing of a model's: test_demo_learns measures that with the trained demo model (recall at
    k = 2× the injected errors ≥ 0.9; 1.00 measured)."""
    truth, lines = {}, {"train": [], "val": []}
    for n in range(10):
        name = f"{n}.jpg"
        make_image(tmp_path / "images" / name, size=(200, 100), color=(200, 200, 200))
        objects = [{"bbox_2d": [10 + 20 * i, 10, 25 + 20 * i, 30], "desc": BBU} for i in range(n % 3 + 1)]
        truth[name] = {"BBU": len(objects)}
        annotated = objects[:-1] if n in (2, 7) else objects  # two annotations lost an object
        if n == 5:
            annotated = [dict(annotated[0], desc=LABEL)] + annotated[1:]  # one was given the wrong class
        row = {"images": [f"images/{name}"], "width": 200, "height": 100, "objects": annotated,
               "summary": contract.build_summary(annotated), "metadata": {"source_file": f"site{n}.json"}}
        lines["val" if n >= 8 else "train"].append(json.dumps(row, ensure_ascii=False))
    splits = {}
    for split, rows in lines.items():
        splits[split] = tmp_path / f"{split}.clean.jsonl"
        splits[split].write_text("\n".join(rows) + "\n", "utf-8")
    (tmp_path / "injected.jsonl").write_text("".join(json.dumps({"source_file": f"site{n}.json"}) + "\n" for n in (2, 5, 7)))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "manifest.json").write_text(json.dumps({"options": {"prompts": {"summary": "统计"}, "image_max_tokens": 64,
                                                                              "image_min_tokens": 4}}))
    (tmp_path / "pointer.json").write_text(json.dumps({"key": "k", "path": str(tmp_path / "cache"), "records": "r.jsonl"}))

    out, reviewer = tmp_path / "qa", Reviewer(truth)
    result = run_qa_labels(tmp_path / "model", splits, tmp_path / "pointer.json", suspects_out=out / "suspects.jsonl",
                           report_out=out / "report.json", gallery_out=out / "gallery", truth=tmp_path / "injected.jsonl",
                           generator=reviewer, options={"batch_size": 4, "gallery": 2})
    assert reviewer.scored == 2 * 3  # both likelihoods of the three disputed records only
    suspects = read_jsonl(out / "suspects.jsonl")
    assert {s["source_file"] for s in suspects} == {"site2.json", "site5.json", "site7.json"}
    assert suspects[0]["source_file"] == "site5.json" and suspects[0]["margin"] == 8.0  # two counts off beats one
    assert suspects[0]["annotated"] != suspects[0]["predicted"] and suspects[0]["split"] == "train" and suspects[0]["line"] == 6
    report = json.loads((out / "report.json").read_text())
    assert report["records"] == 10 and report["suspects"] == 3 and report["agree"] == 7
    assert report["injected_errors"]["recall_at_k"] == 1.0 and report["injected_errors"]["k"] == 6
    assert sorted(p.name for p in (out / "gallery").iterdir()) == ["001.png", "002.png"]
    assert result.tables["suspects_table.json"]["source_file"][0] == "site5.json"

    # the first 5 records only: one known error (site2) is among them, and recall counts that one
    part = run_qa_labels(tmp_path / "model", splits, tmp_path / "pointer.json", suspects_out=out / "s5.jsonl",
                         report_out=out / "r5.json", gallery_out=out / "g5", truth=tmp_path / "injected.jsonl",
                         generator=Reviewer(truth), options={"max_records": 5}).report
    assert part["records"] == 5 and part["injected_errors"]["injected"] == 1 and part["injected_errors"]["recall_at_k"] == 1.0


@pytest.mark.slow
def test_batched_answer_likelihoods_equal_a_plain_forward_pass(merged_model, demo_exports, caches):
    """Left-padded batches, logits_to_keep and the answer slicing give, for every row, the sum of log p over the answer's
    tokens and <|im_end|> that one unpadded forward pass over prompt + answer gives."""
    import torch

    from visionqc.arrow_cache import CacheRef
    from visionqc.inference import Generator
    from visionqc.vision import PixelBudget

    budget = PixelBudget.from_cache_options(CacheRef.read(caches["train"]).options)
    generator = Generator(merged_model[0], "cpu", budget, max_new_tokens=12)
    images = sorted((demo_exports / "platform").glob("*.jpg"))[:3]
    requests = [{"images": [str(p)], "prompt": "统计图中各类别的数量，输出一行JSON。"} for p in images]
    answers = ['{"统计":[{"类别":"BBU","数量":2},{"类别":"标签","数量":1}]}', "无关图片", '{"统计":[]}']  # three lengths
    batched = generator.log_likelihoods(requests, answers)
    assert generator.log_likelihoods(requests, answers, rows_per_forward=2) == pytest.approx(batched, abs=1e-4)
    for request, answer, score in zip(requests, answers, batched, strict=True):
        texts, pictures = generator._texts_and_images([request])
        prompt = generator.processor(text=texts, images=pictures, return_tensors="pt", do_resize=False)["input_ids"].shape[1]
        full = generator.processor(text=[texts[0] + answer + "<|im_end|>"], images=pictures, return_tensors="pt", do_resize=False)
        with torch.no_grad():
            logits = generator.model(**full).logits[0].float()
        ids = full["input_ids"][0]
        expected = sum(float(torch.log_softmax(logits[t - 1], -1)[ids[t]]) for t in range(prompt, len(ids)))
        assert score == pytest.approx(expected, abs=1e-3) and score < 0


SCENES = {"red": ((200, 40, 40), {"BBU": 1}), "green": ((40, 200, 40), {"BBU": 2}), "blue": ((40, 40, 200), {"标签": 1})}


def scene_records(folder: Path) -> tuple[Path, Path]:
    """A small summary fusion: 12 photos of each of three scenes, each scene its own counts; the first photo of each
    scene lost an object in its annotation (the injected errors, listed in injected.jsonl). Returns (records, truth)."""
    rows, injected = [], []
    for name, (colour, counts) in SCENES.items():
        for k in range(12):
            make_image(folder / "images" / f"{name}{k}.png", size=(64, 64), color=colour)
            objects = [{"bbox_2d": [4 + 10 * i, 4, 12 + 10 * i, 12], "desc": f"类别={c}"} for c, m in counts.items() for i in range(m)]
            if k == 0:
                objects = objects[:-1] or [{"bbox_2d": [4, 4, 12, 12], "desc": "类别=线缆"}]
                injected.append(f"{name}{k}.json")
            rows.append({"images": [f"images/{name}{k}.png"], "width": 64, "height": 64, "objects": objects,
                         "summary": contract.build_summary(objects), "metadata": {"source_file": f"{name}{k}.json", "_fusion_mode": "summary"}})
    records, truth = folder / "train.clean.jsonl", folder / "injected.jsonl"
    records.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), "utf-8")
    truth.write_text("".join(json.dumps({"source_file": name}) + "\n" for name in injected))
    return records, truth


@pytest.mark.slow
def test_a_tiny_model_trained_on_the_records_finds_their_label_errors(tiny_model, tmp_path):
    """Trained for real (40 steps of full fine-tuning on the records, errors included, as a team would), the tiny model
    answers each scene's counts, and the three annotations that lost an object are the records it disputes. Measured:
    recall 3/3 at k = 6, 33 of 36 records agree. The untrained model, the control, disputes nothing it can parse."""
    records, truth = scene_records(tmp_path)
    caches = cache_pointers(tmp_path / "cache", {"train": records}, tiny_model, CACHE)
    recipe = {"tuner_type": "full", "learning_rate": 2e-3, "max_steps": 40, "per_device_train_batch_size": 8, "max_length": 1024,
              "gradient_checkpointing": False, "save_steps": 40, "logging_steps": 10, "warmup_ratio": 0.0, "eval_strategy": "no"}
    train_into(tiny_model, caches, tmp_path / "run", recipe)

    def qa(model, out):
        return run_qa_labels(model, {"train": records}, caches["train"], suspects_out=out / "suspects.jsonl", report_out=out / "report.json",
                             gallery_out=out / "gallery", truth=truth, options={"batch_size": 8, "gallery": 2}, device="cpu").report

    trained = qa(tmp_path / "run" / "model", tmp_path / "qa")
    assert trained["injected_errors"]["recall_at_k"] >= 2 / 3 and trained["agree"] >= 30, trained
    untrained = qa(tiny_model, tmp_path / "qa_untrained")
    assert untrained["injected_errors"]["hits_at_k"] == 0 and untrained["own_invalid"] > 30, untrained
