"""Stage eval_ts: held-out traces scored by ranking candidate answers, no generate() needed.

For every held-out record, each candidate answer (the distinct answers of the training cache)
replaces the record's own answer, and the model's teacher-forced log-likelihood of the answer
tokens (sum over the answer and its <|im_end|>) ranks them. The top candidate is the prediction.
All candidates of a few records are packed into one sequence per forward pass (XTuner's
block-diagonal attention keeps them apart).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from visionqc.arrow_cache import CacheRef
from visionqc.io import atomic_write, write_json
from visionqc.options import options_from
from visionqc.plots import plot_confusion
from visionqc.timeseries.collate import pack
from visionqc.timeseries.dataset import TimeSeriesCacheDataset
from visionqc.timeseries.model import load_model
from visionqc.timeseries.tokenize import TimeSeriesDataItem, assistant_ids, load_tokenizer
from visionqc.tracking import StageResult

IGNORE_INDEX = -100


@dataclass
class TimeSeriesEvalOptions:
    device: str = "auto"
    records_per_forward: int = 2  # held-out records per forward pass, each with all candidate answers

    @classmethod
    def from_dict(cls, options: dict) -> TimeSeriesEvalOptions:
        return options_from(cls, options, "timeseries.eval")


def with_answer(item: TimeSeriesDataItem, answer_ids: list[int]) -> TimeSeriesDataItem:
    """The item with its labelled tail (the answer turn) replaced by `answer_ids`, all labelled."""
    labels = item["labels"]
    first = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    input_ids = list(item["input_ids"][:first]) + answer_ids
    return {**item, "input_ids": input_ids, "labels": [IGNORE_INDEX] * first + answer_ids, "num_tokens": len(input_ids)}


@torch.no_grad()
def answer_log_likelihoods(model, items: list[TimeSeriesDataItem], device: str) -> list[float]:
    """Sum of log p(answer token) per item, items packed into one sequence."""
    batch = pack(items, device)
    logits = model(seq_ctx=batch["seq_ctx"], loss_ctx=None)["logits"][0].float()
    labels = batch["shifted_labels"][0]
    picked = torch.log_softmax(logits, dim=-1).gather(1, labels.clamp(min=0)[:, None])[:, 0]
    picked = torch.where(labels == IGNORE_INDEX, torch.zeros_like(picked), picked)
    bounds = torch.cumsum(torch.tensor([0] + [item["num_tokens"] for item in items]), 0)
    # shifted labels drop the first token: document i covers positions bounds[i]-1+1 .. bounds[i+1]-1 after the shift
    return [float(picked[max(0, int(bounds[i]) - 1): int(bounds[i + 1]) - 1].sum()) for i in range(len(items))]


def evaluate_ts(model_dir: str | Path, val_cache: str | Path, train_cache: str | Path, *, metrics_out: str | Path,
                predictions_out: str | Path, confusion_out: str | Path, examples: str | Path | None = None,
                options: dict | None = None) -> StageResult:
    """Score every held-out record; writes the metrics, the predictions and the confusion-matrix PNG."""
    from visionqc.launch import resolve_device

    opts = TimeSeriesEvalOptions.from_dict(dict(options or {}))
    device, records_per_forward = resolve_device(opts.device), opts.records_per_forward
    model = load_model(model_dir).to(device).eval()
    tokenizer = load_tokenizer(Path(model_dir) / "llm")
    candidates = CacheRef.read(train_cache).manifest["answers"]
    if len(candidates) < 2:
        raise ValueError(f"the training cache holds {len(candidates)} distinct answer(s); ranking needs at least two")
    candidate_ids = [assistant_ids(tokenizer, text) for text in candidates]
    val_ref = CacheRef.read(val_cache)
    dataset = TimeSeriesCacheDataset.read(val_ref)
    table = dataset.table
    rows = table.select(["answer", "label", "line"]).to_pylist()
    label_of = {row["answer"]: row["label"] or row["answer"] for row in rows}
    predictions = []
    for start in range(0, len(dataset), records_per_forward):
        indices = range(start, min(len(dataset), start + records_per_forward))
        items = [with_answer(dataset[i], ids) for i in indices for ids in candidate_ids]
        scores = answer_log_likelihoods(model, items, device)
        for offset, index in enumerate(indices):
            own = scores[offset * len(candidates): (offset + 1) * len(candidates)]
            best = max(range(len(candidates)), key=lambda c: own[c])
            truth = rows[index]
            predictions.append({"line": truth["line"], "answer": truth["answer"], "label": label_of[truth["answer"]],
                                "predicted": candidates[best], "predicted_label": label_of.get(candidates[best], candidates[best]),
                                "correct": candidates[best] == truth["answer"],
                                "log_likelihoods": {c: round(s, 4) for c, s in zip(candidates, own, strict=True)}})
    confusion = Counter(f"{p['label']}->{p['predicted_label']}" for p in predictions)
    classes = sorted({p["label"] for p in predictions} | {p["predicted_label"] for p in predictions})
    per_class = {c: round(sum(p["correct"] for p in predictions if p["label"] == c) / max(1, sum(p["label"] == c for p in predictions)), 4)
                 for c in classes}
    metrics = {"records": len(predictions), "accuracy": round(sum(p["correct"] for p in predictions) / max(1, len(predictions)), 4),
               "chance": round(1 / len(candidates), 4), "candidates": candidates, "classes": classes,
               "accuracy_by_class": per_class, "confusion": dict(sorted(confusion.items())), "device": device}
    with atomic_write(predictions_out) as handle:
        handle.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions)
    write_json(metrics_out, metrics)
    plot_confusion(metrics["confusion"], Path(confusion_out), title="Held-out traces", classes=tuple(classes))
    artifacts = [metrics_out, predictions_out, confusion_out] + ([examples] if examples and Path(examples).exists() else [])
    return StageResult(
        report=metrics, artifacts=artifacts,
        metrics={"accuracy": metrics["accuracy"], "chance": metrics["chance"], "records": metrics["records"],
                 **{f"accuracy.{k}": v for k, v in per_class.items()}},
        inputs={"model": model_dir, "val_cache": val_ref.folder}, outputs={"metrics": metrics_out},
    )
