"""eval_dense: detection quality of a trained run's dense answers on the held-out split of its fusion.

Every image record of the split is asked the dense prompt (text and pixel budget from the training
cache), batched and left-padded like Stage-A. The answer must be the dense form that training
teaches, `{"图片_1": [{"bbox_2d"|"poly"|"line": [0-1000 coordinates], "desc": "类别=…"}]}`, and is
read strictly: anything else is unparseable, its truth objects all count as misses, and the reason
is counted. Predictions are mapped back to pixels and matched to the truth per class (the 类别 of
desc):

- boxes and polygons: COCO AP and AR from pycocotools' COCOeval, `bbox` for the classes whose truth
  is boxes and `segm` for the classes whose truth is polygons (a prediction in the other shape is
  converted). A prediction ranks by its `score` when it carries one; generation gives none, so a
  generated answer scores 1: the AP describes the single operating point the model answers at, and
  ties keep our order (record, then answer order);
- lines: our own measure. Each polyline is buffered by `line_tolerance` pixels and the IoU of the
  two buffers is the overlap (two strokes that run within the tolerance of each other overlap
  well); `lines.mean_iou` is its mean over the matched pairs;
- every class: precision, recall and F1 at IoU >= `iou_threshold` from one-to-one matching
  (scipy's linear_sum_assignment on the IoU of shapely shapes, lines buffered), and `desc`
  accuracy: the share of matched pairs whose whole desc (class and attributes) is right;
- `count_match`: the share of images whose answer names as many objects of every class as the
  truth, wherever it puts them. With F1 it tells a model that cannot see what from one that cannot
  see where.
"""

from __future__ import annotations

import contextlib
import io
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from shapely.geometry import Polygon
from tqdm import tqdm

from visionqc import contract
from visionqc.arrow_cache import CacheRef
from visionqc.dense import LINE_TOLERANCE, MATCH_IOU, by_class, match_class, parse_dense
from visionqc.inference import Question
from visionqc.io import atomic_directory, read_jsonl, write_json, write_jsonl
from visionqc.messages import record_mode
from visionqc.options import options_from
from visionqc.plots import draw_comparison
from visionqc.tracking import StageResult, numbers_of


@dataclass
class EvalDenseOptions:
    prompt: str = "dense"  # the name of a prompt the cache was built with
    batch_size: int = 16
    max_new_tokens: int = 256
    max_records: int = 0  # 0: every image record of the held-out split
    iou_threshold: float = MATCH_IOU
    line_tolerance: float = LINE_TOLERANCE  # pixels each side of a line
    overlays_per_class: int = 2

    @classmethod
    def from_dict(cls, options: dict) -> EvalDenseOptions:
        made = options_from(cls, options, "eval_dense")
        if not 0 < made.iou_threshold <= 1:
            raise ValueError(f"eval_dense.iou_threshold must lie in (0, 1], got {made.iou_threshold}")
        if made.line_tolerance <= 0:
            raise ValueError(f"eval_dense.line_tolerance must be > 0 pixels, got {made.line_tolerance}")
        return made


def class_kinds(images: list[dict]) -> dict[str, str]:
    """Each class's evaluation kind from its truth: bbox_2d, poly or line (the most common shape; ties by that order)."""
    counts: dict[str, dict[str, int]] = {}
    for image in images:
        for obj in image["truth"]:
            kind = contract.geometry_key(obj)
            per = counts.setdefault(contract.desc_category(obj["desc"]), {})
            per[kind] = per.get(kind, 0) + 1
    return {name: max(contract.GEOMETRY_KEYS, key=lambda k: (per.get(k, 0), -contract.GEOMETRY_KEYS.index(k)))
            for name, per in counts.items()}


def score_images(images: list[dict], threshold: float, line_tolerance: float) -> dict:
    """Per-class, per-shape (bbox_2d, poly, line) and overall precision, recall, F1 at `threshold`, desc accuracy,
    mean line IoU, and the share of images with every class counted right.

    `images`: {"images", "truth", "predicted": objects, or None when unparseable (every truth object a miss)}.
    Fills each image's "matches" (image number, class, truth and prediction index within the class, IoU).
    """
    kinds = class_kinds(images)
    tally: dict[str, dict[str, int]] = {}
    line_ious, counted_right, seen = [], 0, 0
    for image in images:
        image["matches"] = []
        for number, view in enumerate(views([image]), start=1):
            truth, predicted = by_class(view["truth"]), by_class(view["predicted"])
            seen += 1
            counted_right += _counts(truth) == _counts(predicted)
            for name in sorted(set(truth) | set(predicted)):
                t, p = truth.get(name, []), predicted.get(name, [])
                pairs = match_class(t, p, threshold, line_tolerance)
                row = tally.setdefault(name, {"truth": 0, "predicted": 0, "matched": 0, "desc_right": 0})
                row["truth"] += len(t)
                row["predicted"] += len(p)
                row["matched"] += len(pairs)
                row["desc_right"] += sum(t[i]["desc"] == p[j]["desc"] for i, j, _ in pairs)
                if kinds.get(name) == "line":
                    line_ious += [value for _, _, value in pairs]
                image["matches"] += [{"image": number, "class": name, "truth": i, "predicted": j, "iou": round(value, 4)}
                                     for i, j, value in pairs]
    per_class = {name: _rates(row) | {"kind": kinds.get(name, "unknown")} for name, row in sorted(tally.items())}
    totals = ("truth", "predicted", "matched", "desc_right")
    overall = {key: sum(row[key] for row in tally.values()) for key in totals}
    per_kind = {kind: _rates({key: sum(row[key] for name, row in tally.items() if kinds.get(name) == kind) for key in totals})
                for kind in contract.GEOMETRY_KEYS if kind in kinds.values()}
    return {"per_class": per_class, "per_kind": per_kind, "overall": _rates(overall),
            "lines": {"mean_iou": round(float(np.mean(line_ious)), 4) if line_ious else None, "matched": len(line_ious),
                      "tolerance_px": line_tolerance},
            "count_match": {"images": seen, "right": counted_right, "rate": counted_right / seen if seen else None}}


def _counts(grouped: dict[str, list[dict]]) -> dict[str, int]:
    return {name: len(objects) for name, objects in grouped.items()}


def _rates(row: dict) -> dict:
    precision = row["matched"] / row["predicted"] if row["predicted"] else None
    recall = row["matched"] / row["truth"] if row["truth"] else None
    f1 = 2 * row["matched"] / (row["truth"] + row["predicted"]) if row["truth"] + row["predicted"] else None
    desc = row["desc_right"] / row["matched"] if row["matched"] else None
    return {"truth": int(row["truth"]), "predicted": int(row["predicted"]), "matched": int(row["matched"]),
            "precision": precision, "recall": recall, "f1": f1, "desc_accuracy": desc}


# --- COCOeval -----------------------------------------------------------------------------------


def _as_kind(obj: dict, kind: str) -> list[float]:
    """The object's coordinates as a box [x1,y1,x2,y2] (kind bbox_2d) or a flat polygon ring (kind poly) for COCO.

    A polygon stays itself; any other shape becomes its bounding box, or that box's four corners.
    """
    key = contract.geometry_key(obj)
    flat = obj[key]
    if kind == "poly" and key == "poly":
        return flat
    x1, y1, x2, y2 = contract.bbox_of(list(zip(flat[0::2], flat[1::2], strict=True)))
    return [x1, y1, x2, y2] if kind == "bbox_2d" else [x1, y1, x2, y1, x2, y2, x1, y2]


def views(images: list[dict]) -> list[dict]:
    """One entry per (record, image): its size and the truth and predicted objects drawn on it."""
    out = []
    for image in images:
        for index in range(len(image["images"])):
            out.append({"width": image["width"], "height": image["height"],
                        "truth": [o for o in image["truth"] if o.get("image_index", 0) == index],
                        "predicted": [o for o in image["predicted"] or [] if o.get("image_index", 0) == index]})
    return out


def coco_scores(images: list[dict], kind: str) -> dict:
    """COCOeval AP/AR (iouType bbox for kind bbox_2d, segm for poly) over the classes of that kind."""
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    kinds = class_kinds(images)
    names = sorted(name for name, k in kinds.items() if k == kind)
    if not names:
        return {}
    category = {name: i + 1 for i, name in enumerate(names)}
    gt = {"images": [], "annotations": [], "categories": [{"id": i, "name": n} for n, i in category.items()]}
    detections = []
    for image_id, image in enumerate(views(images), start=1):
        width, height = image["width"], image["height"]
        gt["images"].append({"id": image_id, "width": width, "height": height})
        for obj in image["truth"]:
            name = contract.desc_category(obj["desc"])
            if name in category:
                gt["annotations"].append(_coco_annotation(_as_kind(obj, kind), kind, image_id, category[name], len(gt["annotations"]) + 1))
        for obj in image["predicted"]:
            name = contract.desc_category(obj["desc"])
            if name not in category:
                continue
            flat = _as_kind(obj, kind)
            found = {"image_id": image_id, "category_id": category[name], "score": float(obj.get("score", 1.0))}
            if kind == "bbox_2d":
                found["bbox"] = [flat[0], flat[1], flat[2] - flat[0], flat[3] - flat[1]]
            else:
                found["segmentation"] = mask_utils.merge(mask_utils.frPyObjects([flat], height, width))
            detections.append(found)
    if not detections:
        return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0, "AR100": 0.0, "per_class_AP": dict.fromkeys(names, 0.0), "detections": 0}
    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO()
        truth.dataset = gt
        truth.createIndex()
        evaluator = COCOeval(truth, truth.loadRes(detections), "bbox" if kind == "bbox_2d" else "segm")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = [max(0.0, float(v)) for v in evaluator.stats]
    precision = evaluator.eval["precision"]  # [iou thresholds, recall points, classes, areas, max dets]
    per_class = {}
    for k, name in enumerate(names):
        values = precision[:, :, k, 0, -1]
        per_class[name] = round(float(values[values > -1].mean()), 4) if (values > -1).any() else 0.0
    return {"AP": round(stats[0], 4), "AP50": round(stats[1], 4), "AP75": round(stats[2], 4), "AR100": round(stats[8], 4),
            "per_class_AP": per_class, "detections": len(detections)}


def _coco_annotation(flat: list[float], kind: str, image_id: int, category_id: int, annotation_id: int) -> dict:
    if kind == "bbox_2d":
        x1, y1, x2, y2 = flat
        return {"id": annotation_id, "image_id": image_id, "category_id": category_id, "bbox": [x1, y1, x2 - x1, y2 - y1],
                "area": (x2 - x1) * (y2 - y1), "iscrowd": 0}
    ring = Polygon(list(zip(flat[0::2], flat[1::2], strict=True)))
    xs, ys = flat[0::2], flat[1::2]
    return {"id": annotation_id, "image_id": image_id, "category_id": category_id, "segmentation": [flat],
            "area": float(ring.area), "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)], "iscrowd": 0}


# --- the stage ----------------------------------------------------------------------------------


def held_out_images(records_path: str | Path, max_records: int) -> list[dict]:
    """The image records of a split (chat records skipped), as items to ask: one per record."""
    base = Path(records_path).parent
    items = []
    for line, record in read_jsonl(records_path):
        if record_mode(record, "dense") == "chat" or not record.get("images"):
            continue
        items.append({"line": line, "source": (record.get("metadata") or {}).get("source_file"),
                      "images": [str(base / p) for p in record["images"]], "width": record["width"], "height": record["height"],
                      "truth": record.get("objects", [])})
        if max_records and len(items) == max_records:
            break
    return items


def evaluate(images: list[dict], options: EvalDenseOptions) -> dict:
    """Metrics of images whose "raw" answers are in; fills "predicted", "problem" and "matches" of each."""
    problems: dict[str, int] = {}
    for image in images:
        image["predicted"], image["problem"] = parse_dense(image["raw"], len(image["images"]), image["width"], image["height"])
        if image["problem"]:
            problems[image["problem"]] = problems.get(image["problem"], 0) + 1
    scores = score_images(images, options.iou_threshold, options.line_tolerance)
    return {"records": len(images), "unparseable": sum(problems.values()), "unparseable_by_problem": dict(sorted(problems.items())),
            **scores, "coco": {"bbox": coco_scores(images, "bbox_2d"), "segm": coco_scores(images, "poly")},
            "iou_threshold": options.iou_threshold}


def run_eval_dense(model_dir: str | Path, records: str | Path, cache: str | Path, *, metrics_out: str | Path,
                   predictions_out: str | Path, overlays_out: str | Path, options: dict | None = None, device: str = "auto",
                   generator=None) -> StageResult:
    """Ask the dense prompt of every held-out image record; write metrics, per-record predictions and overlays."""
    opts = EvalDenseOptions.from_dict(dict(options or {}))
    question = Question.from_cache(CacheRef.read(cache), opts.prompt, "eval_dense.prompt")
    images = held_out_images(records, opts.max_records)
    if not images:
        raise ValueError(f"{records}: no image records to evaluate (the held-out split holds only chat records)")
    if generator is None:
        from visionqc.inference import Generator

        generator = Generator(model_dir, device, question.budget, opts.max_new_tokens)
    seconds = 0.0
    for start in tqdm(range(0, len(images), opts.batch_size), desc="eval_dense", unit="batch"):
        batch = images[start : start + opts.batch_size]
        began = time.perf_counter()
        answers = generator.generate([{"images": image["images"], "prompt": question.prompt} for image in batch])
        seconds += time.perf_counter() - began
        for image, answer in zip(batch, answers, strict=True):
            image["raw"] = answer
    metrics = {**evaluate(images, opts), "generation_seconds": round(seconds, 3), "prompt": opts.prompt}
    write_jsonl(predictions_out, [{key: image[key] for key in ("line", "source", "images", "raw", "problem", "predicted", "matches")}
                                  for image in images])
    write_json(metrics_out, metrics)
    with atomic_directory(overlays_out) as work:
        drawn = draw_overlays(images, work, opts.overlays_per_class)
    return StageResult(
        report=metrics, metrics=numbers_of(metrics, skip=("options", "kind", "tolerance_px")),
        artifacts=[metrics_out, predictions_out, (overlays_out, "overlays")],
        inputs={"model": model_dir, "records": records}, outputs={"metrics": metrics_out, "predictions": predictions_out},
        params={"overlays": drawn},
    )


def draw_overlays(images: list[dict], folder: Path, per_class: int) -> int:
    """Truth against prediction for the first `per_class` images holding each class; returns how many were drawn."""
    chosen: dict[int, None] = {}
    for name in sorted({contract.desc_category(o["desc"]) for image in images for o in image["truth"]}):
        holding = [i for i, image in enumerate(images) if any(contract.desc_category(o["desc"]) == name for o in image["truth"])]
        chosen.update(dict.fromkeys(holding[:per_class]))
    for number, index in enumerate(sorted(chosen), start=1):
        image = images[index]
        draw_comparison(image["images"][0], [o for o in image["truth"] if o.get("image_index", 0) == 0],
                        [o for o in image["predicted"] or [] if o.get("image_index", 0) == 0],
                        folder / f"{number:03d}.png", note=image["problem"])
    return len(chosen)
