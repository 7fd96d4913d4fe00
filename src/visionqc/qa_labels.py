"""qa_labels: the records whose annotation the model most likely disputes, ranked for a reviewer.

Every record of a dataset (its clean train and val splits, or the first `max_records`) is asked its
question (the prompt named by `prompt`; text and pixel budget from the training cache) and answered
greedily. A record is a suspect when the model's own answer disagrees with the annotation:

- summary mode: the per-category counts differ (an answer that misses the summary contract is no
  alternative label: it is counted as `own_invalid`, not as a suspect);
- dense mode: the objects do not match one to one (same class, IoU >= 0.5).

For each suspect the deployed model scores, by teacher forcing, the log-likelihood of the annotated
answer and of its own (the sum of log p over the answer tokens and <|im_end|>, the tokens training
puts labels on). Suspects are ranked by the margin log p(own) - log p(annotated), largest first:
the model strongly prefers its own answer. A record whose answer agrees cannot be a suspect, so
its likelihoods are not computed (they would double the stage's time for nothing it reports). With `truth` (the demo's injected label errors, read by nothing else),
the report gives precision and recall of the injected errors among the top k = 2x their number.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from visionqc import contract, dense
from visionqc.arrow_cache import CacheRef
from visionqc.inference import Question
from visionqc.io import atomic_directory, read_jsonl, write_json, write_jsonl
from visionqc.messages import dense_answer
from visionqc.options import options_from
from visionqc.plots import draw_suspect
from visionqc.tracking import StageResult, numbers_of

TABLE_ROWS = 200  # suspects in the MLflow table (all of them are in suspects.jsonl)


@dataclass
class QaLabelsOptions:
    mode: str = "summary"  # summary | dense: which annotated answer is checked
    prompt: str = ""  # the prompt asked (a name the cache was built with); empty: the mode's name
    batch_size: int = 32
    max_new_tokens: int = 96
    gallery: int = 12  # overlays of the top suspects
    max_records: int = 0  # 0: every record of both splits; else the first N (train first)

    @classmethod
    def from_dict(cls, options: dict) -> QaLabelsOptions:
        made = options_from(cls, options, "qa_labels")
        if made.mode not in ("summary", "dense"):
            raise ValueError(f"qa_labels.mode must be summary or dense, got {made.mode!r}")
        made.prompt = made.prompt or made.mode
        return made


def annotated_answer(record: dict, mode: str) -> str:
    """The answer training teaches for this record: its summary, or its dense JSON."""
    if mode == "summary":
        return record.get("summary") or contract.build_summary(record.get("objects", []))
    return dense_answer(record.get("objects", []), record["width"], record["height"], list(range(1, len(record["images"]) + 1)))


def disagreement(record: dict, own: str, mode: str) -> str | None:
    """None when the model's answer says what the annotation says; else "differs" or "own_invalid"."""
    if mode == "summary":
        mine = contract.parse_summary(own)
        if not mine.valid:
            return "own_invalid"
        theirs = contract.parse_summary(annotated_answer(record, mode))
        counts = theirs.counts if theirs.valid else contract.parse_summary(contract.build_summary(record.get("objects", []))).counts
        return None if mine.counts == counts else "differs"
    objects, problem = dense.parse_dense(own, len(record["images"]), record["width"], record["height"])
    if problem:
        return "own_invalid"
    return None if dense.same_objects(record.get("objects", []), objects) else "differs"


def rank_suspects(items: list[dict]) -> list[dict]:
    """Items that disagree, by margin (own minus annotated log-likelihood) largest first; ties by split and line."""
    suspects = [item for item in items if item["disagreement"] == "differs"]
    suspects.sort(key=lambda item: (-item["margin"], item["split"], item["line"]))
    return [{"rank": rank, **item} for rank, item in enumerate(suspects, start=1)]


def recall_at_k(suspects: list[dict], injected: set[str], k: int) -> dict:
    """Precision and recall of the injected errors (by source file) among the top k suspects."""
    top = [item["source_file"] for item in suspects[:k]]
    hits = sum(source in injected for source in top)
    found = {item["source_file"]: item["rank"] for item in suspects if item["source_file"] in injected}
    return {"injected": len(injected), "k": k, "hits_at_k": hits, "precision_at_k": hits / k if k else None,
            "recall_at_k": hits / len(injected) if injected else None, "recall_all_suspects": len(found) / len(injected) if injected else None,
            "missed": sorted(injected - {source for source in top})}


def read_injected(truth: str | Path) -> set[str]:
    return {row["source_file"] for _, row in read_jsonl(truth)}


def load_items(splits: dict[str, str | Path], max_records: int = 0) -> list[dict]:
    items = []
    for split, path in splits.items():
        base = Path(path).parent
        for line, record in read_jsonl(path):
            if "messages" in record or not record.get("images"):
                continue
            items.append({"split": split, "line": line, "source_file": (record.get("metadata") or {}).get("source_file"),
                          "images": [str(base / p) for p in record["images"]], "record": record, "ll_annotated": None,
                          "ll_predicted": None, "margin": None})
            if max_records and len(items) == max_records:
                return items
    return items


def score_disputed(generator, requests: list[dict], items: list[dict]) -> None:
    """Both log-likelihoods, and their margin, for the items whose answer differs from the annotation."""
    disputed = [i for i, item in enumerate(items) if item["disagreement"] == "differs"]
    if not disputed:
        return
    asked = [requests[i] for i in disputed]
    scores = generator.log_likelihoods(asked + asked, [items[i]["annotated"] for i in disputed] + [items[i]["predicted"] for i in disputed])
    for n, i in enumerate(disputed):
        items[i].update(ll_annotated=round(scores[n], 4), ll_predicted=round(scores[len(disputed) + n], 4))
        items[i]["margin"] = round(items[i]["ll_predicted"] - items[i]["ll_annotated"], 4)


def run_qa_labels(model_dir: str | Path, splits: dict[str, str | Path], cache: str | Path, *, suspects_out: str | Path,
                  report_out: str | Path, gallery_out: str | Path, truth: str | Path | None = None, options: dict | None = None,
                  device: str = "auto", generator=None) -> StageResult:
    """Score every record of `splits` ({split: clean JSONL}); write the ranked suspects, the report and the gallery."""
    opts = QaLabelsOptions.from_dict(dict(options or {}))
    question = Question.from_cache(CacheRef.read(cache), opts.prompt, "qa_labels.prompt")
    items = load_items(splits, opts.max_records)
    if not items:
        raise ValueError(f"no image records in {', '.join(str(p) for p in splits.values())}")
    if generator is None:
        from visionqc.inference import Generator

        generator = Generator(model_dir, device, question.budget, opts.max_new_tokens)
    began = time.perf_counter()
    for start in tqdm(range(0, len(items), opts.batch_size), desc="qa_labels", unit="batch"):
        batch = items[start : start + opts.batch_size]
        requests = [{"images": item["images"], "prompt": question.prompt} for item in batch]
        for item, own in zip(batch, generator.generate(requests), strict=True):
            item.update(annotated=annotated_answer(item["record"], opts.mode), predicted=own,
                        disagreement=disagreement(item["record"], own, opts.mode))
        score_disputed(generator, requests, batch)
    seconds = time.perf_counter() - began
    suspects = rank_suspects(items)
    rows = [{key: item[key] for key in ("rank", "split", "line", "source_file", "images", "annotated", "predicted", "ll_annotated",
                                         "ll_predicted", "margin")} for item in suspects]
    write_jsonl(suspects_out, rows)
    report = {"records": len(items), "suspects": len(suspects), "agree": sum(item["disagreement"] is None for item in items),
              "own_invalid": sum(item["disagreement"] == "own_invalid" for item in items), "mode": opts.mode,
              "seconds": round(seconds, 3), "records_per_second": round(len(items) / seconds, 3) if seconds else None}
    if truth and Path(truth).exists():
        injected = read_injected(truth) & {item["source_file"] for item in items}  # the known errors among the scored records
        report["injected_errors"] = recall_at_k(suspects, injected, 2 * len(injected))
    write_json(report_out, report)
    with atomic_directory(gallery_out) as work:
        for item in suspects[: opts.gallery]:
            draw_suspect(item["images"][0], item["record"].get("objects", []), item["annotated"], item["predicted"],
                         work / f"{item['rank']:03d}.png", caption=f"#{item['rank']} {item['source_file']} margin {item['margin']:.1f}")
    table = {column: [row[column] for row in rows[:TABLE_ROWS]]
             for column in ("rank", "source_file", "split", "line", "annotated", "predicted", "margin")}
    return StageResult(
        report=report, metrics=numbers_of(report), artifacts=[report_out, suspects_out, (gallery_out, "gallery")],
        inputs={"model": model_dir, **{f"records.{split}": path for split, path in splits.items()}},
        outputs={"suspects": suspects_out}, tables={"suspects_table.json": table},
    )
