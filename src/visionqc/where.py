"""`visionqc where`: each stage's results folder (from the stage table), its headline figures, and the MLflow UI."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from visionqc.stages import STAGES


def _summaries(folder: Path) -> Iterator[str]:
    for report in sorted(folder.glob("*.report.json")):
        values = json.loads(report.read_text())
        if "valid_rate" in values:
            exact = f", exact match {values['exact_match']:.2f}" if values.get("exact_match") is not None else ""
            yield (f"Summaries: {report.with_name(report.name.replace('.report.json', '.jsonl'))}  "
                   f"valid {values['valid_rate']:.2f} ({values['images']} images){exact}")


def _verdicts(folder: Path) -> Iterator[str]:
    for metrics in sorted(folder.glob("*.metrics.json")):
        values = json.loads(metrics.read_text())
        scored = (f", label match {values['label_match']:.2f} over {values['groups_scored']} reviewed"
                  if values.get("label_match") is not None else "")
        yield (f"Verdicts:  {metrics.with_name(metrics.name.replace('.metrics.json', '.jsonl'))}  "
               f"{values['groups_failed']} of {values['groups_judged']} groups fail{scored}, unparseable {values['unparseable']}")


def _pages(folder: Path) -> Iterator[str]:
    for page in sorted(folder.glob("*.html")):
        yield f"Report:    {page}  (open it in a browser; {page.with_suffix('.csv').name} has the same rows)"


def _dense(folder: Path) -> Iterator[str]:
    for metrics in sorted(folder.glob("*/metrics.json")):
        values = json.loads(metrics.read_text())
        overall, coco = values["overall"], values["coco"]
        aps = ", ".join(f"{kind} AP {coco[kind]['AP']:.2f}" for kind in ("bbox", "segm") if coco.get(kind))
        shapes = "".join(f", {kind} {row['f1'] or 0:.2f}" for kind, row in values.get("per_kind", {}).items())
        counts = values.get("count_match") or {}
        counted = f", counts right {counts['right']}/{counts['images']}" if counts.get("images") else ""
        yield (f"Dense:     {metrics.parent / 'predictions.jsonl'}  F1@{values['iou_threshold']} {overall['f1'] or 0:.2f}"
               f"{shapes}{', ' + aps if aps else ''}{counted}, unparseable {values['unparseable']}/{values['records']}")


def _suspects(folder: Path) -> Iterator[str]:
    for report in sorted(folder.glob("*/report.json")):
        values = json.loads(report.read_text())
        known = values.get("injected_errors") or {}
        found = (f"; known errors in the top {known['k']}: {known['hits_at_k']}/{known['injected']}"
                 if known.get("injected") else "")
        yield f"Label QA:  {report.parent / 'suspects.jsonl'}  {values['suspects']} suspects in {values['records']} records{found}"


def _traces(folder: Path) -> Iterator[str]:
    for metrics in sorted(folder.glob("*/metrics.json")):
        values = json.loads(metrics.read_text())
        yield (f"Traces:    {metrics.parent / 'predictions.jsonl'}  held-out accuracy {values['accuracy']:.2f} "
               f"({values['records']} traces, chance {values['chance']:.2f})")


# The figures a stage's results are judged by.
HEADLINES = {"stage_a": _summaries, "stage_b": _verdicts, "verdict_report": _pages, "eval_dense": _dense, "qa_labels": _suspects, "eval_ts": _traces}


def print_where(results: Path) -> None:
    print("Results:")
    found = [stage for stage in STAGES if stage.results and (results / stage.results).exists()]
    for stage in found:
        print(f"  {stage.results:10s} {results / stage.results}/")
    for stage in found:
        for line in HEADLINES.get(stage.name, lambda folder: ())(results / stage.results):
            print(line)
    store = results / "mlflow" / "mlflow.db"
    if store.exists():
        print(f"MLflow UI: mlflow ui --backend-store-uri sqlite:///{store}")
        print("           then open http://127.0.0.1:5000/#/experiments/1/runs?workflowType=machine_learning")
