"""Stage-B: a two-line verdict per group from its Stage-A summaries, scored against the folder labels.

The model (the same merged checkpoint as Stage-A) reads the output contract, the mission guidance
and the per-image summaries, and must answer exactly two lines: `通过` or `不通过`, then
`理由: <reason>`. Anything else is unparseable: it is counted, kept raw, and the group is judged
`不通过` (fail closed) with `parsed: false`.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from visionqc.io import read_jsonl, write_json, write_jsonl
from visionqc.messages import VERDICT_FAIL, VERDICT_PASS, verdict_prompt
from visionqc.options import options_from
from visionqc.plots import plot_confusion
from visionqc.tracking import StageResult, numbers_of

REASON = re.compile(r"^理由\s*[:：]\s*(\S.*)$")


@dataclass
class StageBOptions:
    batch_size: int = 8
    max_new_tokens: int = 64

    @classmethod
    def from_dict(cls, options: dict) -> "StageBOptions":
        return options_from(cls, options, "stage_b")


def parse_verdict(raw: str) -> tuple[str, str, bool]:
    """Strict two-line parse → (verdict, reason, parsed). Unparseable output fails closed."""
    lines = [line.strip() for line in raw.strip().splitlines()]
    if len(lines) == 2 and lines[0] in (VERDICT_PASS, VERDICT_FAIL):
        match = REASON.match(lines[1])
        if match:
            return lines[0], match.group(1).strip(), True
    return VERDICT_FAIL, "无法解析模型输出，按不通过处理", False


def score(rows: list[dict], labels: dict[str, str]) -> dict:
    """Label match and fail precision/recall (fail is the positive class), plus the confusion counts."""
    counts = {(truth, predicted): 0 for truth in ("pass", "fail") for predicted in ("pass", "fail")}
    for row in rows:
        predicted = "pass" if row["verdict"] == VERDICT_PASS else "fail"
        counts[(labels[row["ticket_key"]], predicted)] += 1
    total = sum(counts.values())
    tp, fp, fn = counts[("fail", "fail")], counts[("pass", "fail")], counts[("fail", "pass")]
    return {
        "groups": total,
        "label_match": (counts[("pass", "pass")] + tp) / total if total else None,
        "fail_precision": tp / (tp + fp) if tp + fp else None,
        "fail_recall": tp / (tp + fn) if tp + fn else None,
        "unparseable": sum(not row["parsed"] for row in rows),
        "confusion": {f"{t}->{p}": n for (t, p), n in counts.items()},
    }


def run_stage_b(stage_a_path: str | Path, guidance_path: str | Path, model_dir: str | Path, *, verdicts_out: str | Path,
                metrics_out: str | Path, confusion_out: str | Path, options: dict | None = None, device: str = "auto",
                generator=None) -> StageResult:
    """Judge every group; write the verdicts, the metrics and the confusion-matrix PNG."""
    opts = StageBOptions.from_dict(dict(options or {}))
    guidance = Path(guidance_path).read_text("utf-8")
    groups = [record for _, record in read_jsonl(stage_a_path)]
    if not groups:
        raise ValueError(f"{stage_a_path}: no groups to judge")
    if generator is None:
        from visionqc.inference import Generator

        generator = Generator(model_dir, device, None, opts.max_new_tokens)
    rows, seconds = [], 0.0
    for start in tqdm(range(0, len(groups), opts.batch_size), desc="stage_b", unit="batch"):
        batch = groups[start : start + opts.batch_size]
        began = time.perf_counter()
        answers = generator.generate([{"prompt": verdict_prompt(guidance, g["per_image"])} for g in batch])
        seconds += time.perf_counter() - began
        for group, raw in zip(batch, answers, strict=True):
            verdict, reason, parsed = parse_verdict(raw)
            rows.append({"ticket_key": f"{group['group_id']}::{group['label']}", "verdict": verdict, "reason": reason,
                         "raw": raw, "parsed": parsed})
    write_jsonl(verdicts_out, rows)
    labels = {f"{g['group_id']}::{g['label']}": g["label"] for g in groups}
    metrics = {**score(rows, labels), "generation_seconds": round(seconds, 3)}
    write_json(metrics_out, metrics)
    plot_confusion(metrics["confusion"], Path(confusion_out))
    return StageResult(
        report=metrics, metrics=numbers_of(metrics), artifacts=[metrics_out, confusion_out, guidance_path],
        inputs={"summaries": stage_a_path, "guidance": guidance_path, "model": model_dir}, outputs={"verdicts": verdicts_out},
    )
