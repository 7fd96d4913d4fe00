"""Stage-B: a two-line verdict per group from its Stage-A summaries, scored where a folder label exists.

Every group gets a verdict; only reviewed groups (label pass/fail) are scored, and the metrics say
how many groups were judged and how many scored. A group with a photo Stage-A could not read is
`不通过` without asking the model (`judged_by: policy`): it could not be judged, so it fails closed.

The model (the same merged checkpoint as Stage-A) reads the output contract, the mission guidance
and the per-image summaries, and must answer exactly two lines: `通过` or `不通过`, then
`理由: <reason>`. Anything else is unparseable: it is counted, kept raw, and the group is judged
`不通过` (fail closed) with `parsed: false`.

A group whose Stage-A summaries miss the summary contract (`contract.parse_summary`) is judged by
`invalid_summaries`: `fail` (default) gives `不通过` without asking the model, as a reviewer would
send back a group whose photos could not be read; `judge` asks the model anyway. Either way the
row says `summaries_valid: false` and the metrics count such groups apart.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from visionqc.contract import parse_summary
from visionqc.io import read_jsonl, write_json, write_jsonl
from visionqc.messages import LABEL_FOLDERS, VERDICT_FAIL, VERDICT_PASS, parse_verdict, ticket_key, verdict_prompt
from visionqc.options import options_from
from visionqc.plots import plot_confusion
from visionqc.tracking import StageResult, numbers_of


@dataclass
class StageBOptions:
    batch_size: int = 8
    max_new_tokens: int = 64
    invalid_summaries: str = "fail"  # fail: 不通过 without asking the model; judge: the model reads them as they are

    @classmethod
    def from_dict(cls, options: dict) -> StageBOptions:
        made = options_from(cls, options, "stage_b")
        if made.invalid_summaries not in ("fail", "judge"):
            raise ValueError(f"stage_b.invalid_summaries must be fail or judge, got {made.invalid_summaries!r}")
        return made


def score(rows: list[dict], labels: dict[str, str | None]) -> dict:
    """Label match and fail precision/recall (fail is the positive class), plus the confusion counts, over
    the groups with a label; `groups_judged` counts every group.

    Groups with an invalid Stage-A summary are in every figure and also counted apart:
    `invalid_summary_groups`, and `label_match_valid_summaries` over the other groups.
    """
    counts = {(truth, predicted): 0 for truth in ("pass", "fail") for predicted in ("pass", "fail")}
    valid_hits = valid_total = 0
    judged, rows = rows, [row for row in rows if labels[row["ticket_key"]]]  # every group; the reviewed ones
    for row in rows:
        predicted = "pass" if row["verdict"] == VERDICT_PASS else "fail"
        counts[(labels[row["ticket_key"]], predicted)] += 1
        if row.get("summaries_valid", True):
            valid_total += 1
            valid_hits += labels[row["ticket_key"]] == predicted
    total = sum(counts.values())
    tp, fp, fn = counts[("fail", "fail")], counts[("pass", "fail")], counts[("fail", "pass")]
    return {
        "groups_judged": len(judged),
        "groups_failed": sum(row["verdict"] != VERDICT_PASS for row in judged),
        "groups_unreadable": sum(bool(row.get("unreadable_photos")) for row in judged),
        "groups_scored": total,
        "label_match": (counts[("pass", "pass")] + tp) / total if total else None,
        "fail_precision": tp / (tp + fp) if tp + fp else None,
        "fail_recall": tp / (tp + fn) if tp + fn else None,
        "unparseable": sum(row["parsed"] is False for row in rows),
        "invalid_summary_groups": total - valid_total,
        "label_match_valid_summaries": valid_hits / valid_total if valid_total else None,
        "confusion": {f"{t}->{p}": n for (t, p), n in counts.items()},
    }


def invalid_images(per_image: dict[str, str]) -> dict[str, str]:
    """image key → problem code, for the summaries that miss the contract."""
    checks = {key: parse_summary(summary).problem for key, summary in per_image.items()}
    return {key: problem for key, problem in checks.items() if problem}


def run_stage_b(stage_a_path: str | Path, guidance_path: str | Path, model_dir: str | Path, *, verdicts_out: str | Path,
                metrics_out: str | Path, confusion_out: str | Path, options: dict | None = None, device: str = "auto",
                generator=None) -> StageResult:
    """Judge every group; write the verdicts, the metrics and the confusion-matrix PNG."""
    opts = StageBOptions.from_dict(dict(options or {}))
    guidance = Path(guidance_path).read_text("utf-8")
    groups = [record for _, record in read_jsonl(stage_a_path)]
    if not groups:
        raise ValueError(f"{stage_a_path}: no groups to judge")
    keys = [ticket_key(g) for g in groups]
    unreadable = {key: g.get("unreadable") or {} for key, g in zip(keys, groups)}
    invalid = {key: invalid_images({k: v for k, v in g["per_image"].items() if k not in unreadable[key]})
               for key, g in zip(keys, groups)}
    judged = [g for key, g in zip(keys, groups) if not unreadable[key] and (opts.invalid_summaries == "judge" or not invalid[key])]
    if generator is None and judged:
        from visionqc.inference import Generator

        generator = Generator(model_dir, device, None, opts.max_new_tokens)
    answers, seconds = {}, 0.0
    for start in tqdm(range(0, len(judged), opts.batch_size), desc="stage_b", unit="batch"):
        batch = judged[start : start + opts.batch_size]
        began = time.perf_counter()
        raw = generator.generate([{"prompt": verdict_prompt(guidance, g["per_image"])} for g in batch])
        seconds += time.perf_counter() - began
        answers.update(zip(map(ticket_key, batch), raw, strict=True))
    rows = []
    for group in groups:
        key = ticket_key(group)
        problems = invalid[key]
        if unreadable[key]:
            listed = "，".join(f"{image}: {why}" for image, why in unreadable[key].items())
            row = {"ticket_key": key, "verdict": VERDICT_FAIL, "reason": f"图片无法读取（{listed}），无法判定，按不通过处理",
                   "raw": None, "parsed": None, "judged_by": "policy"}
        elif key in answers:
            verdict, reason, parsed = parse_verdict(answers[key])
            row = {"ticket_key": key, "verdict": verdict, "reason": reason, "raw": answers[key], "parsed": parsed,
                   "judged_by": "model"}
        else:
            listed = "，".join(f"{image}: {problem}" for image, problem in problems.items())
            row = {"ticket_key": key, "verdict": VERDICT_FAIL, "reason": f"图片摘要无效（{listed}），按不通过处理", "raw": None,
                   "parsed": None, "judged_by": "policy"}
        rows.append({**row, "summaries_valid": not problems and not unreadable[key], "invalid_summaries": problems,
                     "unreadable_photos": unreadable[key]})
    write_jsonl(verdicts_out, rows)
    labels = {ticket_key(g): g["label"] for g in groups}
    metrics = {**score(rows, labels), "generation_seconds": round(seconds, 3)}
    write_json(metrics_out, metrics)
    plot_confusion(metrics["confusion"], Path(confusion_out), truth={label: folder for folder, label in LABEL_FOLDERS.items()},
                   predicted={"pass": VERDICT_PASS, "fail": VERDICT_FAIL})
    return StageResult(
        report=metrics, metrics=numbers_of(metrics), artifacts=[metrics_out, confusion_out, guidance_path],
        inputs={"summaries": stage_a_path, "guidance": guidance_path, "model": model_dir}, outputs={"verdicts": verdicts_out},
    )
